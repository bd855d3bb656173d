"""A broken or hostile server: no key in any file, no wedged probe, no crashed worker.

Issue 10, items 5 and 6; docs/design.md §8 ("Bounds"). The server is tests/fakeapi.py
answering what tests/hostile.py builds; daemons run in this process (``backoff_base``
0.05: every backoff 20x shorter), except where the log and ``sfwatch status`` must be
the real ones.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from structlog.testing import capture_logs

from sfwatch import cli
from sfwatch.config import Secret
from sfwatch.errors import FileRejected, TranscribeError, TransientError, UnusableResponse
from sfwatch.transcribe import (
    MAX_RESPONSE,
    REDACTED,
    Transcriber,
    api_message,
    too_deep,
)
from tests.audiogen import wav_bytes
from tests.conftest import (
    API_KEY,
    daemon_process,
    run_cli,
    running_daemon,
    wait_until,
    write_config,
)
from tests.fakeapi import R401, FakeAPI, Reply
from tests.hostile import HOSTILE_200, deep_json, echo_authorization, endless, gzip_bomb

FAST = {"backoff_base": 0.05}
MIB = 1 << 20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/self/status")


@contextmanager
def rss_growth() -> Iterator[Callable[[], int]]:
    """Yield a function: the peak RSS (bytes) of this process since entry, over its RSS then."""
    try:  # reset VmHWM to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs)")
    baseline = _status_kib("VmRSS")
    yield lambda: (_status_kib("VmHWM") - baseline) * 1024


def upload(client: Transcriber, tmp_path: Path) -> TranscribeError:
    """One upload of a small file, expected to fail; its error."""
    path = tmp_path / "a.mp3"
    path.write_bytes(os.urandom(2000))
    with pytest.raises(TranscribeError) as info:
        client.transcribe(path, path.name, "m")
    return info.value


# -- the boundary: one Transcriber against each hostile answer -----------------------------


@pytest.mark.parametrize("name", sorted(HOSTILE_200))
def test_hostile_200_is_an_unusable_response(name: str, fake_api: FakeAPI, tmp_path: Path) -> None:
    """Deep JSON, a lone surrogate, an endless body, a gzip bomb: UnusableResponse, quickly."""
    reply = HOSTILE_200[name]()
    fake_api.script(reply)
    with Transcriber(fake_api.url, Secret(API_KEY), timeout_seconds=10) as client:
        started = time.monotonic()
        exc = upload(client, tmp_path)
    assert type(exc) is UnusableResponse
    assert (exc.reason, exc.http_status) == ("unusable_response", 200)
    assert exc.trace_id == fake_api.wait_for_uploads(1)[0].trace_id
    assert time.monotonic() - started < 5
    json.dumps(vars(exc), ensure_ascii=False).encode()  # every field fits a UTF-8 file


def test_gzip_bomb_is_cut_at_the_cap(fake_api: FakeAPI, tmp_path: Path) -> None:
    """A 2 MB answer inflating to 2 GiB costs about two caps of memory, not gigabytes."""
    fake_api.script(gzip_bomb())
    with Transcriber(fake_api.url, Secret(API_KEY), timeout_seconds=10) as client:
        tracemalloc.start()
        try:
            exc = upload(client, tmp_path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert isinstance(exc, UnusableResponse)
    assert "larger than 8 MiB" in exc.message
    assert peak < 3 * MAX_RESPONSE, f"peak {peak >> 20} MiB"


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (deep_json(30_000), "nested deeper"),  # under the probe's size cap: the depth guard
        (deep_json(), "larger than 64 KiB"),
        (endless(), "larger than 64 KiB"),
        (gzip_bomb(), "larger than 64 KiB"),
    ],
    ids=["deep-json", "deep-and-large", "endless", "gzip-bomb"],
)
def test_hostile_user_info_is_a_transient_error(reply: Reply, why: str, fake_api: FakeAPI) -> None:
    """The account probe turns each hostile 200 into a TransientError, never a crash."""
    fake_api.info_reply = reply
    with (
        Transcriber(fake_api.url, Secret(API_KEY)) as client,
        pytest.raises(TransientError) as info,
    ):
        client.check_account()
    assert (info.value.reason, info.value.http_status) == ("bad_response", 200)
    assert why in info.value.message


def test_user_info_strings_are_cleaned(fake_api: FakeAPI) -> None:
    """Strings of a /user/info answer come back without the key, lone surrogates or controls."""
    data = {"name": "a\ud800b\x1b[31m", "balance": f"Bearer {API_KEY}", "n": 1}
    fake_api.info_reply = Reply(200, json.dumps({"data": data}).encode())  # \ud800 escaped
    with Transcriber(fake_api.url, Secret(API_KEY)) as client:
        info = client.check_account()
    assert info == {"name": "a\ufffdb\ufffd[31m", "balance": f"Bearer {REDACTED}", "n": 1}


def test_probe_deadline_cuts_a_server_that_never_finishes_its_headers() -> None:
    """``100 Continue`` for ever, or headers a byte at a time: the probe ends at its deadline."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def flood(conn: socket.socket, trickle: bool) -> None:
        with conn:
            conn.recv(65536)
            message = (
                b"HTTP/1.1 200 OK\r\nX-Slow: " if trickle else b"HTTP/1.1 100 Continue\r\n\r\n"
            )
            conn.sendall(message)
            while not stop.wait(0.02):
                try:
                    conn.sendall(b"a" if trickle else message)
                except OSError:
                    return

    def serve() -> None:
        for trickle in (False, True):
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=flood, args=(conn, trickle), daemon=True).start()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    try:
        with Transcriber(url, Secret(API_KEY), probe_timeout=0.5) as client:
            for _ in ("flood", "trickle"):
                started = time.monotonic()
                with pytest.raises(TransientError) as info:
                    client.check_account()
                assert info.value.reason == "timeout"
                assert 0.4 < time.monotonic() - started < 2.5
    finally:
        stop.set()
        listener.close()
        server.join(5)


def test_echoed_key_is_redacted_everywhere_in_the_error(fake_api: FakeAPI, tmp_path: Path) -> None:
    """The key echoed in a 400's message and in a header leaves as [REDACTED], never cut."""
    fake_api.script(
        echo_authorization(),
        Reply(400, {"message": "x" * 490 + API_KEY}, headers={"x-siliconcloud-trace-id": API_KEY}),
    )
    with Transcriber(fake_api.url, Secret(API_KEY)) as client:
        echoed = upload(client, tmp_path)
        cut = upload(client, tmp_path)
    assert isinstance(echoed, FileRejected)
    assert echoed.api_message == f"invalid request, you sent: Bearer {REDACTED}"
    assert echoed.message == f"HTTP 400: invalid request, you sent: Bearer {REDACTED}"
    assert cut.trace_id is not None
    assert REDACTED in cut.trace_id
    for exc in (echoed, cut):
        for text in (str(exc), repr(vars(exc))):
            assert API_KEY[8:16] not in text  # no piece of it either
            assert API_KEY not in text


def test_key_in_a_transcript_is_redacted(fake_api: FakeAPI, tmp_path: Path) -> None:
    """A 200 whose text holds the key (plain, or spelt with JSON escapes) carries [REDACTED]."""
    escaped = "".join(f"\\u{ord(c):04x}" for c in API_KEY)
    fake_api.script(
        Reply(200, {"text": f"said {API_KEY}."}),
        Reply(200, f'{{"text": "said {escaped}."}}'.encode(), content_type="application/json"),
    )
    path = tmp_path / "a.mp3"
    path.write_bytes(os.urandom(2000))
    with Transcriber(fake_api.url, Secret(API_KEY)) as client:
        texts = [client.transcribe(path, path.name, "m").text for _ in range(2)]
    assert texts == [f"said {REDACTED}."] * 2


def test_control_characters_of_a_message_are_replaced(fake_api: FakeAPI, tmp_path: Path) -> None:
    """A message that would drive a terminal (ESC, BEL) is made harmless; newlines stay."""
    fake_api.script(Reply(400, {"message": "bad\x1b]0;owned\x07 file\nsecond line"}))
    with Transcriber(fake_api.url, Secret(API_KEY)) as client:
        exc = upload(client, tmp_path)
    assert exc.api_message == "bad\ufffd]0;owned\ufffd file\nsecond line"


@pytest.mark.parametrize(
    ("encoding", "packed"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data)[2:-4]),  # raw deflate, no zlib header
    ],
    ids=["gzip", "deflate", "raw-deflate"],
)
def test_compressed_answers_are_decoded(
    encoding: str, packed: Callable[[bytes], bytes], fake_api: FakeAPI, tmp_path: Path
) -> None:
    """Ordinary compressed answers still decode (Content-Encoding is undone here, not in httpx)."""
    body = json.dumps({"text": "压缩 " * 5000}, ensure_ascii=False).encode()
    fake_api.script(Reply(200, packed(body), headers={"Content-Encoding": encoding}))
    path = tmp_path / "a.mp3"
    path.write_bytes(os.urandom(2000))
    with Transcriber(fake_api.url, Secret(API_KEY)) as client:
        assert client.transcribe(path, path.name, "m").text == "压缩 " * 5000


def test_stacked_encodings_are_a_bad_response(fake_api: FakeAPI, tmp_path: Path) -> None:
    """``Content-Encoding: gzip, gzip`` is refused (no server sends it; a bomb could nest)."""
    body = gzip.compress(gzip.compress(b'{"text": "x"}'))
    fake_api.script(Reply(200, body, headers={"Content-Encoding": "gzip, gzip"}))
    with Transcriber(fake_api.url, Secret(API_KEY)) as client:
        exc = upload(client, tmp_path)
    assert (type(exc), exc.reason) == (TransientError, "bad_response")


@pytest.mark.parametrize(
    ("body", "deep"),
    [
        (b"[" * 33 + b"]" * 33, True),
        (b"[" * 32 + b"]" * 32, False),
        (b'{"a": "' + b"[" * 100 + b'"}', False),  # brackets in a string do not count
        (b'{"a": "\\"' + b"[" * 100 + b'"}', False),  # nor after an escaped quote
        (b'["' + b"{" * 100, False),  # an unclosed string runs to the end
        (b"[]" * 1000, False),
        (b'{"a":' * 40 + b"1" + b"}" * 40, True),
    ],
)
def test_too_deep(body: bytes, deep: bool) -> None:
    """The depth pre-scan counts brackets outside strings only."""
    assert too_deep(body) is deep


def test_api_message_of_deep_json_is_its_text() -> None:
    """An error body nested too deep is not parsed; its start is the message."""
    assert api_message(b"[" * 100_000) == "[" * 500


# -- the daemon: files end as promised, the probe never wedges ----------------------------


@pytest.mark.parametrize("name", sorted(HOSTILE_200))
def test_hostile_200_twice_fails_the_file_as_unusable(
    name: str, tmp_path: Path, fake_api: FakeAPI
) -> None:
    """Each hostile 200, twice: failed/ as unusable_response, 2 uploads, no crash, RSS bounded."""
    make = HOSTILE_200[name]
    config = write_config(tmp_path, fake_api.url, api={"concurrency": 1})
    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        (daemon.inbox / "warm.wav").write_bytes(wav_bytes(1000))  # imports, connections, ledger
        wait_until((daemon.inbox / "done" / "warm.wav").exists, 20, "warm.wav done")
        replies = make(), make()
        with rss_growth() as growth:
            fake_api.script(*replies)
            (daemon.inbox / "a.wav").write_bytes(wav_bytes(1000))
            error_file = daemon.inbox / "failed" / "a.wav.error.json"
            wait_until(error_file.exists, 30, "a.wav failed")
            grown = growth()
    record = json.loads(error_file.read_text(encoding="utf-8"))
    assert (record["reason"], record["http_status"]) == ("unusable_response", 200)
    assert [u.status for u in fake_api.uploads] == [200, 200, 200]  # warm-up, then two paid
    events = {e["event"] for e in logs}
    assert "sfwatch.worker_crashed" not in events
    assert "sfwatch.loop_error" not in events
    assert grown < 100 * MIB, f"RSS grew by {grown >> 20} MiB"
    print(f"{name}: RSS grew by {grown / MIB:.1f} MiB")  # shown with pytest -s


PROBE_REPLIES: dict[str, Callable[[], Reply]] = {
    "deep-json": lambda: deep_json(30_000),
    "endless": endless,
    "gzip-bomb": gzip_bomb,
    "echo": lambda: echo_authorization(403),
}


@pytest.mark.parametrize("name", sorted(PROBE_REPLIES))
def test_hostile_user_info_never_wedges_the_probe(
    name: str, tmp_path: Path, fake_api: FakeAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile /user/info: each probe fails and is retried, the watchdog pings, uploads resume."""
    fake_api.script(R401)
    fake_api.info_reply = PROBE_REPLIES[name]()
    config = write_config(tmp_path, fake_api.url)
    pings: list[bool] = []

    def watchdog(healthy: bool) -> bool:
        pings.append(healthy)
        return healthy

    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        monkeypatch.setattr(daemon.daemon.notifier, "watchdog", watchdog)
        (daemon.inbox / "a.wav").write_bytes(wav_bytes(1000))
        wait_until(lambda: fake_api.info_requests >= 3, 30, "three probes")
        assert daemon.daemon.healthy()
        assert not (daemon.inbox / "done" / "a.wav").exists(), "paused while probes fail"
        seen = len(pings)
        wait_until(lambda: len(pings) >= seen + 3, 10, "the loop still reaches the watchdog")
        assert all(pings)
        fake_api.info_reply = None  # the server is sane again
        wait_until((daemon.inbox / "done" / "a.wav").exists, 30, "a.wav done after the pause")
    failed = [e for e in logs if e["event"] == "sfwatch.account_probe_failed"]
    assert len(failed) >= 3
    assert {e["reason"] for e in failed} <= {"bad_response", "forbidden"}
    assert any(e["event"] == "sfwatch.uploads_resumed" for e in logs)
    assert not [e for e in logs if e["event"] == "sfwatch.loop_error"]
    assert not (daemon.inbox / "failed").exists()


def test_a_crashing_probe_is_cleared_and_retried(
    tmp_path: Path, fake_api: FakeAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even an exception outside errors.py (a bug) ends the probe: logged, retried, resumed."""
    fake_api.script(R401)
    config = write_config(tmp_path, fake_api.url)
    crashes = [RecursionError("maximum recursion depth exceeded"), MemoryError()]

    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        real = daemon.daemon.probe.check

        def check_account() -> dict[str, object]:
            if crashes:
                raise crashes.pop(0)
            return real()

        monkeypatch.setattr(daemon.daemon.probe, "check", check_account)
        (daemon.inbox / "a.wav").write_bytes(wav_bytes(1000))
        wait_until((daemon.inbox / "done" / "a.wav").exists, 30, "a.wav done after two crashes")
        assert daemon.daemon.healthy()
    crashed = [e for e in logs if e.get("reason") == "probe_crashed"]
    assert len(crashed) == 2
    assert all(e["event"] == "sfwatch.account_probe_failed" for e in crashed)
    assert not [e for e in logs if e["event"] == "sfwatch.loop_error"]


# -- the key reaches no file, no status, no log --------------------------------------------


def _holding_key(folder: Path) -> list[str]:
    return [
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and API_KEY.encode() in p.read_bytes()
    ]


def test_echoed_key_reaches_no_file_status_or_log(tmp_path: Path, fake_api: FakeAPI) -> None:
    """The key echoed by an upload's 400, a 401 and the probe: in no file, status or log line."""
    fake_api.script(echo_authorization(400), echo_authorization(401))
    fake_api.info_reply = echo_authorization(403)
    config = write_config(tmp_path, fake_api.url)
    inbox = tmp_path / "inbox"
    with daemon_process(config) as daemon:
        daemon.wait_event("sfwatch.daemon_started")
        (inbox / "a.wav").write_bytes(wav_bytes(1000))
        error_file = inbox / "failed" / "a.wav.error.json"
        wait_until(error_file.exists, 20, "a.wav failed")
        (inbox / "b.wav").write_bytes(wav_bytes(1200))
        wait_until(lambda: fake_api.info_requests >= 1, 20, "one probe")  # the first is at 5 s
        fake_api.info_reply = None
        wait_until((inbox / "done" / "b.wav").exists, 30, "b.wav done")
        outputs = [
            run_cli("status", "-c", str(config)),
            run_cli("status", "--json", "-c", str(config)),
        ]
        daemon.signal()
        assert daemon.wait() == 0
    record = json.loads(error_file.read_text(encoding="utf-8"))
    assert record["api_message"] == f"invalid request, you sent: Bearer {REDACTED}"
    assert f"Bearer {REDACTED}" in outputs[0].stdout
    report = json.loads(outputs[1].stdout)
    assert report["recent_failures"][0]["message"] == record["api_message"]
    for result in outputs:
        assert API_KEY not in result.stdout + result.stderr
    assert {e["event"] for e in daemon.lines()} >= {
        "sfwatch.uploads_paused",
        "sfwatch.account_probe_failed",
        "sfwatch.uploads_resumed",
    }
    ledger = tmp_path / "state" / "ledger.sqlite3"
    assert ledger.exists()
    assert API_KEY.encode() not in ledger.read_bytes()
    assert _holding_key(tmp_path) == [], "every file: ledger (+wal), error file, log, transcripts"


def test_check_online_hides_credentials_in_base_url(
    tmp_path: Path,
    fake_api: FakeAPI,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``check --online`` shows base_url without ``user:password@``, passing or failing."""
    monkeypatch.setenv("SILICONFLOW_API_KEY", API_KEY)
    monkeypatch.delenv("SFWATCH_CONFIG", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    secret_url = fake_api.url.replace("http://", "http://alice:s3cret-pw@")
    config = write_config(tmp_path, secret_url)
    fake_api.info_reply = Reply(200, {"data": {"balance": "0.88"}})
    assert cli.main(["check", "--online", "-c", str(config)]) == 0
    passed = capsys.readouterr()
    assert f"online ok: {fake_api.url} accepts the key (balance 0.88)" in passed.out
    fake_api.info_reply = Reply(401, "Invalid token", json_body=True)
    assert cli.main(["check", "--online", "-c", str(config)]) == 1
    failed = capsys.readouterr()
    data = yaml.safe_load(config.read_text())
    data["api"]["base_url"] = "ftp://alice:s3cret-pw@example.invalid/v1"
    config.write_text(yaml.safe_dump(data))
    assert cli.main(["check", "--online", "-c", str(config)]) == 2
    refused = capsys.readouterr()
    assert "ftp://example.invalid/v1" in refused.err
    for output in (passed, failed, refused):
        assert "s3cret-pw" not in output.out + output.err
        assert "alice" not in output.out + output.err
        assert API_KEY not in output.out + output.err
