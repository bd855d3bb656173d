"""Tests of the fake SiliconFlow API that the other tests rely on."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakeapi import (
    DROP,
    R401_ALT,
    R403_BALANCE,
    R429_RETRY_AFTER,
    R503_OVERLOADED,
    RESET,
    FakeAPI,
    Reply,
    Upload,
    stall,
)
from tests.hostile import echo_authorization, endless, gzip_bomb

KEY = "sk-test-key"
MODEL = "FunAudioLLM/SenseVoiceSmall"
TRACE = "x-siliconcloud-trace-id"


@pytest.fixture
def api() -> Iterator[FakeAPI]:
    with FakeAPI(KEY) as fake:
        yield fake


def client_for(api: FakeAPI, timeout: float = 5.0, key: str = KEY) -> httpx.Client:
    return httpx.Client(
        base_url=api.url, timeout=timeout, headers={"Authorization": f"Bearer {key}"}
    )


def transcribe(client: httpx.Client, data: bytes, name: str = "a.mp3") -> httpx.Response:
    return client.post(
        "/audio/transcriptions", data={"model": MODEL}, files={"file": (name, data, "audio/mpeg")}
    )


def test_streamed_file_upload_is_recorded(api: FakeAPI, tmp_path: Path) -> None:
    """An open file streamed by httpx is hashed and recorded with its filename and model."""
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "语音 1.mp3"
    path.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    with client_for(api) as client, path.open("rb") as f:
        resp = client.post(
            "/audio/transcriptions",
            data={"model": MODEL, "language": "zh"},
            files={"file": (path.name, f, "audio/mpeg")},
        )
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    assert resp.json() == {"text": FakeAPI.text_for(sha)}
    assert "语音" in resp.json()["text"]
    (up,) = api.uploads_of(sha)
    assert (up.filename, up.content_type, up.model, up.size) == (
        path.name,
        "audio/mpeg",
        MODEL,
        len(data),
    )
    assert (up.status, up.chunked, up.authorization) == (200, False, f"Bearer {KEY}")
    assert up.extra_fields == {"language": "zh"}
    assert up.trace_id == resp.headers[TRACE]
    assert up.started <= up.ended
    assert api.in_flight == 0
    assert api.max_concurrent == 1


def test_chunked_upload_is_recorded(api: FakeAPI) -> None:
    """A hand-built multipart body sent with Transfer-Encoding: chunked is parsed and hashed."""
    boundary = "b0undary-x"
    data = os.urandom(200_000) + b"\r\n--b0undary" + os.urandom(1000)  # a near-boundary
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{MODEL}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="c.wav"\r\n'
            f"Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def pieces() -> Iterator[bytes]:
        for i in range(0, len(body), 7001):  # chunk edges fall inside the boundaries
            yield body[i : i + 7001]

    with client_for(api) as client:
        resp = client.post(
            "/audio/transcriptions",
            content=pieces(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
    assert resp.status_code == 200
    (up,) = api.uploads
    assert up.chunked
    assert (up.sha256, up.size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert (up.filename, up.content_type, up.model) == ("c.wav", "audio/wav", MODEL)


def test_bad_key_missing_file_and_unknown_path(api: FakeAPI) -> None:
    """A bad key gets 401 with a bare JSON string; no file part gets 400; other paths 404."""
    with client_for(api, key="sk-wrong") as client:
        resp = transcribe(client, b"abc")
        assert resp.status_code == 401
        assert resp.headers["content-type"] == "application/json"
        assert resp.content == b'"Invalid token"'
        assert resp.json() == "Invalid token"
        assert client.get("/models").status_code == 401
    with client_for(api) as client:
        resp = client.post(
            "/audio/transcriptions", data={"model": MODEL}, files={"other": ("x", b"x")}
        )
        assert resp.status_code == 400
        assert resp.json() == {"code": 20015, "message": "file is required", "data": None}
        resp = client.get("/nope")
        assert (resp.status_code, resp.text) == (404, "404 page not found")
        assert resp.headers[TRACE].startswith("ti_")
    assert [u.status for u in api.uploads] == [401, 400]
    assert api.uploads[0].sha256 == hashlib.sha256(b"abc").hexdigest()
    assert api.requests_total == 4


def test_scripted_replies_in_order_with_trace_ids(api: FakeAPI) -> None:
    """Scripted replies are used in order, then the default; every answer has a trace id."""
    api.script(R429_RETRY_AFTER, R503_OVERLOADED, R401_ALT, Reply(200, {"text": "你好"}))
    with client_for(api) as client:
        resps = [transcribe(client, b"x%d" % i) for i in range(5)]
    assert [r.status_code for r in resps] == [429, 503, 401, 200, 200]
    assert resps[0].headers["retry-after"] == "1"
    assert "rate limiting" in resps[0].json()["message"]
    assert resps[1].json()["code"] == 50505
    assert resps[2].json() == "Api key is invalid"
    assert resps[3].json() == {"text": "你好"}
    assert resps[4].json()["text"] == FakeAPI.text_for(hashlib.sha256(b"x4").hexdigest())
    traces = [r.headers[TRACE] for r in resps]
    assert len(set(traces)) == 5
    assert [u.trace_id for u in api.uploads] == traces


def test_rate_limit_and_responder(api: FakeAPI) -> None:
    """Beyond the rate limit come 429s with Retry-After; the responder decides by content."""
    bad = hashlib.sha256(b"bad").hexdigest()
    api.responder = lambda up: Reply(415, {"detail": "nope"}) if up.sha256 == bad else None
    api.rate_limit(3, retry_after=1.5)
    with client_for(api) as client:
        statuses = [transcribe(client, d).status_code for d in (b"bad", b"a", b"b", b"c")]
        limited = transcribe(client, b"d")
    assert statuses == [415, 200, 200, 429]
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "1.5"
    assert "code" not in limited.json()


def test_concurrency_is_counted(api: FakeAPI) -> None:
    """max_concurrent counts transcription requests in progress at the same time."""
    barrier = threading.Barrier(4, timeout=5)

    def responder(_: Upload) -> Reply | None:
        barrier.wait()  # all four must be in flight at once to get past this
        return None

    api.responder = responder
    with client_for(api) as client:
        threads = [threading.Thread(target=transcribe, args=(client, b"%d" % i)) for i in range(4)]
        for t in threads:
            t.start()
        api.wait_for_uploads(4)
        for t in threads:
            t.join()
    assert api.max_concurrent == 4
    assert api.in_flight == 0


def test_stall_times_out_and_stop_is_quick() -> None:
    """A stall makes the client time out; stop() ends a stall in progress at once."""
    before = set(threading.enumerate())
    api = FakeAPI(KEY).start()
    api.script(stall(30), stall(30))
    with client_for(api, timeout=0.3) as client, pytest.raises(httpx.ReadTimeout):
        transcribe(client, b"slow")
    assert api.wait_for_uploads(1)[0].status == 0  # noticed the client hanging up
    host, port = api.url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port))) as sock:
        body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="s"\r\n\r\nz\r\n--b--'
        sock.sendall(
            b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        t0 = time.monotonic()
        api.stop()
        assert time.monotonic() - t0 < 2
        sock.settimeout(2)
        assert sock.recv(1) == b""
    assert [u.status for u in api.uploads] == [0, 0]
    # Handler threads end promptly once their sockets are shut (a loaded machine may lag).
    deadline = time.monotonic() + 5
    while not set(threading.enumerate()) <= before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert set(threading.enumerate()) <= before


def test_drop_and_reset(api: FakeAPI) -> None:
    """DROP and RESET make httpx fail; both are recorded with status 0; the pool recovers."""
    api.script(DROP, RESET)
    big = os.urandom(4 * 1024 * 1024)
    with client_for(api) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            transcribe(client, b"dropped")
        with pytest.raises((httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)):
            transcribe(client, big)
        assert transcribe(client, b"fine").status_code == 200
    dropped, reset, fine = api.uploads
    assert (dropped.status, dropped.sha256) == (0, hashlib.sha256(b"dropped").hexdigest())
    assert (reset.status, reset.sha256, reset.body_complete) == (0, "", False)
    assert fine.status == 200
    assert api.errors == []


def test_user_info_and_models(api: FakeAPI) -> None:
    """user/info answers the balance for a good key, 401 for a bad one, or the scripted reply."""
    with client_for(api) as client:
        info = client.get("/user/info")
        assert info.status_code == 200
        assert info.json()["data"]["balance"] == "0.88"
        assert info.json()["code"] == 20000
        models = client.get("/models", params={"type": "audio"}).json()
        assert [m["id"] for m in models["data"]] == [
            "FunAudioLLM/SenseVoiceSmall",
            "TeleAI/TeleSpeechASR",
        ]
        api.info_reply = R403_BALANCE
        resp = client.get("/user/info")
        assert (resp.status_code, resp.json()["code"]) == (403, 30001)
    with client_for(api, key="sk-bad") as client:
        api.info_reply = None
        resp = client.get("/user/info")
        assert (resp.status_code, resp.json()) == (401, "Invalid token")
        assert resp.headers[TRACE]
    assert api.uploads == []


def test_hostile_replies(api: FakeAPI) -> None:
    """tests/hostile.py: an echo of the header, a correct gzip bomb, a stream the client can cut."""
    api.script(echo_authorization(), gzip_bomb(64 << 20))
    with client_for(api) as client:
        echoed = transcribe(client, b"x")
        assert (echoed.status_code, echoed.json()["data"]) == (400, f"Bearer {KEY}")
        bomb = transcribe(client, b"x")
        assert bomb.headers["content-encoding"] == "gzip"
        assert len(bomb.content) == 64 << 20  # httpx inflates it whole: what sfwatch must not do
        assert not bomb.content.strip(b"\0")
        api.info_reply = endless(seconds=5)
        started = time.monotonic()
        with client.stream("GET", "/user/info") as response:
            received = 0
            for chunk in response.iter_raw():
                received += len(chunk)
                if received > 1 << 20:
                    break
        assert response.headers["transfer-encoding"] == "chunked"
    assert api.info_requests == 1
    deadline = time.monotonic() + 5  # the hung-up stream's handler ends by itself
    while api._conns and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not api._conns
    assert time.monotonic() - started < 5
    assert api.errors == []
