"""Tests of the transcribe stage: one real HTTP upload to the fake API, one outcome."""

from __future__ import annotations

import email.utils
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
import tracemalloc
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from sfwatch.backoff import MAX_RETRY_AFTER
from sfwatch.config import Secret
from sfwatch.errors import (
    AccountError,
    FileRejected,
    RateLimited,
    TranscribeError,
    TransientError,
    UnusableResponse,
)
from sfwatch.transcribe import Transcriber, Transcript, api_message, audio_mime
from tests import fakeapi
from tests.conftest import API_KEY
from tests.fakeapi import (
    DROP,
    R200_EMPTY_TEXT,
    R200_NOT_JSON,
    R400_UNKNOWN_MODEL,
    R401,
    R429,
    R500,
    R503_OVERLOADED,
    RESET,
    FakeAPI,
    Reply,
    Upload,
    stall,
)

MODEL = "FunAudioLLM/SenseVoiceSmall"


@pytest.fixture
def transcriber(fake_api: FakeAPI) -> Iterator[Transcriber]:
    """A Transcriber talking to the fake API with the right key."""
    with Transcriber(fake_api.url, Secret(API_KEY), timeout_seconds=5) as client:
        yield client


@pytest.fixture
def audio(tmp_path: Path) -> Path:
    """A small file of random bytes standing in for audio (the fake does not decode it)."""
    path = tmp_path / "job-0001.mp3"
    path.write_bytes(os.urandom(20_000))
    return path


def sha256_of(path: Path) -> str:
    """The hex SHA-256 of a file's content."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def upload_error(client: Transcriber, path: Path) -> TranscribeError:
    """Upload ``path`` expecting a TranscribeError, and return it."""
    with pytest.raises(TranscribeError) as info:
        client.transcribe(path, path.name, MODEL)
    return info.value


def last_upload(api: FakeAPI) -> Upload:
    """The one upload the fake has recorded (waiting for it to be recorded)."""
    (upload,) = api.wait_for_uploads(1)
    return upload


# -- every canned reply of the fake -> the right outcome ---------------------------------

#: reply name -> (expected class, reason, substring of api_message, retry_after)
ERROR_CASES: dict[str, tuple[type[TranscribeError], str, str, float | None]] = {
    "R400_UNKNOWN_MODEL": (FileRejected, "api_rejected", "Model does not exist", None),
    "R400_DATA_STRING": (FileRejected, "api_rejected", "Invalid audio", None),
    "R400_MISSING_FILE": (FileRejected, "api_rejected", "file is required", None),
    "R400_OPENAI": (FileRejected, "api_rejected", "Invalid file format.", None),
    "R401": (AccountError, "unauthorized", "Invalid token", None),
    "R401_ALT": (AccountError, "unauthorized", "Api key is invalid", None),
    "R402_BALANCE": (AccountError, "no_balance", "balance is insufficient", None),
    "R403_FORBIDDEN": (AccountError, "forbidden", "Forbidden", None),
    "R403_MODEL_DISABLED": (AccountError, "forbidden", "Model disabled.", None),
    "R403_BALANCE": (AccountError, "no_balance", "balance is insufficient", None),
    "R404": (AccountError, "not_found", "404 page not found", None),
    "R413": (FileRejected, "api_rejected", "Request Entity Too Large", None),
    "R415": (FileRejected, "api_rejected", "Unsupported Media Type", None),
    "R422": (FileRejected, "api_rejected", "field required", None),
    "R429": (RateLimited, "rate_limited", "TPM limit reached", None),
    "R429_RETRY_AFTER": (RateLimited, "rate_limited", "TPM limit reached", 1.0),
    "R500": (TransientError, "server_error", "Internal Server Error", None),
    "R500_WHISPERCPP": (TransientError, "server_error", "failed to process audio", None),
    "R502": (TransientError, "server_error", "502 Bad Gateway", None),
    "R503_OVERLOADED": (TransientError, "overloaded", "Model service overloaded", None),
    "R504": (TransientError, "timeout", "Gateway Timeout", None),
    "R200_NOT_JSON": (UnusableResponse, "unusable_response", "<html>oops</html>", None),
    "R200_NO_TEXT": (UnusableResponse, "unusable_response", '"result"', None),
}
#: canned replies that are not errors with an HTTP status, tested on their own below
OTHER_CASES = {"R200_EMPTY_TEXT", "DROP", "RESET"}
#: the message exactly, where the body is structured and only the message must come out
EXACT_MESSAGES = {
    "R400_OPENAI": "Invalid file format.",
    "R500_WHISPERCPP": "failed to process audio",
    "R401": "Invalid token",
    "R403_MODEL_DISABLED": "Model disabled.",
    "R415": "Unsupported Media Type: audio could not be decoded",
    "R503_OVERLOADED": "Model service overloaded. Please try again later.",
}


def test_every_canned_reply_is_covered() -> None:
    """Each canned Reply in tests/fakeapi.py has a case here, so a new one cannot be missed."""
    canned = {name for name, value in vars(fakeapi).items() if isinstance(value, Reply)}
    assert canned == set(ERROR_CASES) | OTHER_CASES


@pytest.mark.parametrize("name", sorted(ERROR_CASES))
def test_canned_error_reply_maps_to_its_error(
    name: str, fake_api: FakeAPI, transcriber: Transcriber, audio: Path
) -> None:
    """A canned error reply becomes its error class, status, reason, message and trace ID."""
    reply: Reply = getattr(fakeapi, name)
    cls, reason, message, retry_after = ERROR_CASES[name]
    fake_api.script(reply)
    exc = upload_error(transcriber, audio)
    assert type(exc) is cls
    assert exc.http_status == reply.status
    assert exc.reason == reason
    assert exc.api_message is not None
    assert message in exc.api_message
    if name in EXACT_MESSAGES:
        assert exc.api_message == EXACT_MESSAGES[name]
    upload = last_upload(fake_api)
    assert upload.status == reply.status
    assert exc.trace_id is not None
    assert exc.trace_id == upload.trace_id
    if isinstance(exc, TransientError):
        assert exc.retry_after == retry_after


@pytest.mark.parametrize(
    ("status", "cls", "reason"),
    [
        (408, TransientError, "timeout"),
        (502, TransientError, "server_error"),
        (507, TransientError, "server_error"),
        (405, AccountError, "not_found"),
        (301, AccountError, "unexpected_status"),
        (418, AccountError, "unexpected_status"),
    ],
)
def test_other_statuses_are_classified(
    *,
    status: int,
    cls: type[TranscribeError],
    reason: str,
    fake_api: FakeAPI,
    transcriber: Transcriber,
    audio: Path,
) -> None:
    """Statuses without a canned body: never a file's fault, and a redirect is not followed."""
    headers = {"Location": "https://elsewhere.invalid/v1/audio/transcriptions"}
    fake_api.script(Reply(status, headers=headers if status == 301 else {}))
    exc = upload_error(transcriber, audio)
    assert (type(exc), exc.http_status, exc.reason) == (cls, status, reason)
    assert exc.trace_id == last_upload(fake_api).trace_id
    assert len(fake_api.uploads) == 1


def test_wrong_base_url_pauses_as_not_found(fake_api: FakeAPI, audio: Path) -> None:
    """A base URL with the wrong path gets the real plain-text 404: an account-wide fault."""
    with Transcriber(fake_api.url[: -len("/v1")] + "/v2", Secret(API_KEY)) as client:
        exc = upload_error(client, audio)
    assert type(exc) is AccountError
    assert (exc.http_status, exc.reason, exc.api_message) == (
        404,
        "not_found",
        "404 page not found",
    )
    assert exc.trace_id is not None
    assert exc.trace_id.startswith("ti_")
    assert fake_api.uploads == []


# -- success -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("upload_name", "mime"),
    [("会议 记录.mp3", "audio/mpeg"), ("memo.WAV", "audio/wav"), ("voice.m4a", "audio/mp4")],
)
def test_success_returns_transcript_and_sends_the_right_upload(
    upload_name: str, mime: str, fake_api: FakeAPI, transcriber: Transcriber, audio: Path
) -> None:
    """A 200 gives the text and trace ID; the upload has the given name, model, MIME, content."""
    sha = sha256_of(audio)
    result = transcriber.transcribe(audio, upload_name, MODEL)
    assert isinstance(result, Transcript)
    assert result.text == FakeAPI.text_for(sha)
    assert result.http_status == 200
    assert result.bytes_sent == audio.stat().st_size == 20_000
    assert result.seconds >= 0
    upload = last_upload(fake_api)
    assert result.trace_id == upload.trace_id
    assert upload.trace_id.startswith("ti_")
    assert (upload.filename, upload.model, upload.content_type) == (upload_name, MODEL, mime)
    assert (upload.sha256, upload.size, upload.status) == (sha, 20_000, 200)
    assert upload.authorization == f"Bearer {API_KEY}"
    assert upload.extra_fields == {}
    assert not upload.chunked  # streamed with a Content-Length from fstat


#: transcribes each file named on the command line (run under strace below)
UPLOAD_SCRIPT = """
import sys
from pathlib import Path
from sfwatch.config import Secret
from sfwatch.transcribe import Transcriber
with Transcriber(sys.argv[1], Secret(sys.argv[2]), timeout_seconds=20) as client:
    for name in sys.argv[3:]:
        client.transcribe(Path(name), Path(name).name, "m")
"""


def socket_writes(fake_api: FakeAPI, audio: Path, trace: Path) -> int:
    """How many socket writes a new process makes to upload ``audio`` once."""
    strace = ["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=sendto,sendmsg,write"]
    subprocess.run(
        [*strace, sys.executable, "-c", UPLOAD_SCRIPT, fake_api.url, API_KEY, str(audio)],
        check=True,
        timeout=60,
    )
    lines = trace.read_text().splitlines()
    return sum(1 for line in lines if "sendto(" in line or "sendmsg(" in line)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_request_body_is_sent_in_few_writes(fake_api: FakeAPI, tmp_path: Path) -> None:
    """A short recording goes out in two writes (headers, body); a large one in 64 KiB ones."""
    short = tmp_path / "short.mp3"
    short.write_bytes(os.urandom(20_000))
    large = tmp_path / "large.mp3"
    large.write_bytes(os.urandom(1_000_000))
    assert socket_writes(fake_api, short, tmp_path / "short.trace") == 2
    # 1,000,000 bytes in writes of 64 KiB: 16, with the fields and boundaries around them
    assert 2 + 15 <= socket_writes(fake_api, large, tmp_path / "large.trace") <= 2 + 17
    uploads = fake_api.wait_for_uploads(2)
    assert [(u.sha256, u.size) for u in uploads] == [
        (sha256_of(short), 20_000),
        (sha256_of(large), 1_000_000),
    ]


def test_base_url_with_trailing_slash_works(fake_api: FakeAPI, audio: Path) -> None:
    """``https://host/v1/`` (a trailing slash) reaches the same endpoint."""
    with Transcriber(fake_api.url + "/", Secret(API_KEY)) as client:
        result = client.transcribe(audio, "a.mp3", "TeleAI/TeleSpeechASR")
    assert result.text == FakeAPI.text_for(sha256_of(audio))
    assert last_upload(fake_api).model == "TeleAI/TeleSpeechASR"


def test_empty_text_is_a_valid_transcript(
    fake_api: FakeAPI, transcriber: Transcriber, audio: Path
) -> None:
    """A 200 with ``{"text": ""}`` (silence) is a transcript, not an error."""
    fake_api.script(R200_EMPTY_TEXT)
    result = transcriber.transcribe(audio, audio.name, MODEL)
    assert result.text == ""
    assert result.trace_id == last_upload(fake_api).trace_id


@pytest.mark.parametrize(
    ("name", "mime"),
    [
        ("a.mp3", "audio/mpeg"),
        ("A.MP3", "audio/mpeg"),
        ("b.wav", "audio/wav"),
        ("c.m4a", "audio/mp4"),
        ("d.opus", "audio/ogg"),
        ("e.flac", "audio/flac"),
        ("f.webm", "audio/webm"),
        ("g.mp4", "video/mp4"),
        ("no-suffix", "application/octet-stream"),
    ],
)
def test_audio_mime(name: str, mime: str) -> None:
    """File names map to real audio MIME types, whatever the suffix's case."""
    assert audio_mime(name) == mime


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"code":20012,"message":"Model does not exist.","data":null}', "Model does not exist."),
        (b'{"error":{"message":"Bad file.","type":"invalid_request_error"}}', "Bad file."),
        (b'{"error":"failed to process audio"}', "failed to process audio"),
        (b'{"detail":"Unsupported Media Type"}', "Unsupported Media Type"),
        (b'"Invalid token"', "Invalid token"),
        (b"404 page not found\n", "404 page not found"),
        (b"[1, 2]", "[1, 2]"),
        (b"", ""),
        (b"\xff\xfebad", "\ufffd\ufffdbad"),
        (b"x" * 2000, "x" * 500),
    ],
)
def test_api_message(body: bytes, message: str) -> None:
    """The message comes out of a JSON object, a JSON string or raw text, at most 500 chars."""
    assert api_message(body) == message


# -- Retry-After -------------------------------------------------------------------------


def http_date_in(seconds: float) -> str:
    """An HTTP date ``seconds`` from now."""
    return email.utils.formatdate(time.time() + seconds, usegmt=True)


@pytest.mark.parametrize(
    ("reply", "cls", "low", "high"),
    [
        (replace(R429, headers={"retry-after-ms": "2500"}), RateLimited, 2.5, 2.5),
        (
            replace(R429, headers={"Retry-After": "7", "retry-after-ms": "1500"}),
            RateLimited,
            1.5,
            1.5,
        ),
        (
            replace(R429, headers={"Retry-After": "86400"}),
            RateLimited,
            MAX_RETRY_AFTER,
            MAX_RETRY_AFTER,
        ),
        (replace(R503_OVERLOADED, headers={"Retry-After": "7"}), TransientError, 7, 7),
        (replace(R500, headers={"RETRY-AFTER": "3"}), TransientError, 3, 3),
    ],
    ids=["ms", "ms-wins", "capped", "503-seconds", "500-upper-case"],
)
def test_retry_after_is_honoured(
    *,
    reply: Reply,
    cls: type[TransientError],
    low: float,
    high: float,
    fake_api: FakeAPI,
    transcriber: Transcriber,
    audio: Path,
) -> None:
    """``retry-after-ms`` / ``Retry-After`` (seconds or date, capped) become ``retry_after``."""
    fake_api.script(reply)
    exc = upload_error(transcriber, audio)
    assert type(exc) is cls
    assert isinstance(exc, TransientError)
    assert exc.retry_after is not None
    assert low <= exc.retry_after <= high


def test_retry_after_http_date(fake_api: FakeAPI, transcriber: Transcriber, audio: Path) -> None:
    """A Retry-After given as an HTTP date becomes the seconds until then."""
    fake_api.script(replace(R429, headers={"Retry-After": http_date_in(120)}))
    exc = upload_error(transcriber, audio)
    assert isinstance(exc, RateLimited)
    assert exc.retry_after is not None
    assert 115 <= exc.retry_after <= 121


def test_unparsable_retry_after_is_ignored(
    fake_api: FakeAPI, transcriber: Transcriber, audio: Path
) -> None:
    """A Retry-After that is not a number or a date leaves ``retry_after`` unset."""
    fake_api.script(replace(R429, headers={"Retry-After": "soon"}))
    exc = upload_error(transcriber, audio)
    assert isinstance(exc, RateLimited)
    assert exc.retry_after is None


# -- the network failing -----------------------------------------------------------------


def test_stall_longer_than_timeout_is_a_timeout(fake_api: FakeAPI, audio: Path) -> None:
    """A server that answers nothing is abandoned after ``timeout_seconds``: reason timeout."""
    fake_api.script(stall(3))
    with Transcriber(fake_api.url, Secret(API_KEY), timeout_seconds=0.5) as client:
        started = time.monotonic()
        exc = upload_error(client, audio)
        elapsed = time.monotonic() - started
    assert type(exc) is TransientError
    assert exc.reason == "timeout"
    assert (exc.http_status, exc.trace_id) == (None, None)
    assert 0.4 <= elapsed < 2.0
    assert last_upload(fake_api).status == 0


@pytest.mark.parametrize(
    ("reply", "size"),
    [(DROP, 20_000), (RESET, 20_000), (RESET, 2_000_000)],
    ids=["drop", "reset-after-body", "reset-mid-upload"],
)
def test_cut_connection_is_a_connection_error(
    reply: Reply, size: int, fake_api: FakeAPI, transcriber: Transcriber, tmp_path: Path
) -> None:
    """A connection closed (FIN) or reset (RST) without an answer: TransientError connection."""
    path = tmp_path / "a.mp3"
    path.write_bytes(os.urandom(size))
    fake_api.script(reply)
    exc = upload_error(transcriber, path)
    assert type(exc) is TransientError
    assert exc.reason == "connection"
    assert (exc.http_status, exc.trace_id) == (None, None)
    assert last_upload(fake_api).status == 0


def test_connection_refused_is_a_connection_error(audio: Path) -> None:
    """Nothing listening on the port: TransientError connection, at once."""
    with Transcriber(f"http://127.0.0.1:{closed_port()}/v1", Secret(API_KEY)) as client:
        started = time.monotonic()
        exc = upload_error(client, audio)
        with pytest.raises(TransientError) as info:
            client.check_account()
        elapsed = time.monotonic() - started
    assert type(exc) is TransientError
    assert exc.reason == "connection"
    assert info.value.reason == "connection"
    assert elapsed < 5


BAD_GZIP = {"Content-Encoding": "gzip"}


@pytest.mark.parametrize("status", [200, 503])
def test_undecodable_body_is_a_transient_error(
    status: int, fake_api: FakeAPI, transcriber: Transcriber, audio: Path
) -> None:
    """A body that is not what its Content-Encoding says raises our error, not httpx's."""
    fake_api.script(Reply(status, b"not gzip at all", headers=BAD_GZIP))
    exc = upload_error(transcriber, audio)
    assert type(exc) is TransientError
    assert exc.reason == "bad_response"
    assert last_upload(fake_api).status == status


def test_undecodable_account_answer_is_a_transient_error(fake_api: FakeAPI) -> None:
    """The account probe translates an undecodable body too (the daemon catches only ours)."""
    fake_api.info_reply = Reply(200, b"not gzip at all", headers=BAD_GZIP)
    with (
        Transcriber(fake_api.url, Secret(API_KEY)) as client,
        pytest.raises(TransientError) as info,
    ):
        client.check_account()
    assert info.value.reason == "bad_response"


def test_missing_file_is_not_a_service_error(transcriber: Transcriber, tmp_path: Path) -> None:
    """A file that vanished before the upload raises OSError, never a service error."""
    with pytest.raises(FileNotFoundError):
        transcriber.transcribe(tmp_path / "gone.mp3", "gone.mp3", MODEL)


# -- the account check -------------------------------------------------------------------


def test_check_account_ok(transcriber: Transcriber) -> None:
    """``GET /user/info`` with a good key gives the account data (with the balance)."""
    info = transcriber.check_account()
    assert info["balance"] == "0.88"


def test_check_account_bad_key(fake_api: FakeAPI) -> None:
    """A wrong key: AccountError 401 unauthorized with the API's message and trace ID."""
    with (
        Transcriber(fake_api.url, Secret("sk-wrong-key")) as client,
        pytest.raises(AccountError) as info,
    ):
        client.check_account()
    exc = info.value
    assert (exc.http_status, exc.reason, exc.api_message) == (401, "unauthorized", "Invalid token")
    assert exc.trace_id is not None


@pytest.mark.parametrize(
    ("reply", "cls", "reason"),
    [
        (R200_NOT_JSON, AccountError, "not_found"),
        (R503_OVERLOADED, TransientError, "overloaded"),
        (fakeapi.R403_BALANCE, AccountError, "no_balance"),
    ],
    ids=["not-json", "overloaded", "no-balance"],
)
def test_check_account_failures(
    reply: Reply, cls: type[TranscribeError], reason: str, fake_api: FakeAPI
) -> None:
    """A /user/info that is not the API's JSON, or an error, raises the matching error."""
    fake_api.info_reply = reply
    with (
        Transcriber(fake_api.url, Secret(API_KEY)) as client,
        pytest.raises(TranscribeError) as info,
    ):
        client.check_account()
    assert type(info.value) is cls
    assert info.value.reason == reason


# -- the key never leaks -----------------------------------------------------------------


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it was raised from or during."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)


@pytest.mark.parametrize("kind", ["401", "500", "not-json", "drop", "reset", "timeout", "refused"])
def test_api_key_never_in_an_exception(kind: str, fake_api: FakeAPI, tmp_path: Path) -> None:
    """No raised error, its causes or its formatted traceback contain the API key."""
    path = tmp_path / "a.mp3"
    path.write_bytes(os.urandom(200_000))
    replies = {"401": R401, "500": R500, "not-json": R200_NOT_JSON, "drop": DROP, "reset": RESET}
    if kind in replies:
        fake_api.script(replies[kind])
    elif kind == "timeout":
        fake_api.script(stall(3))
    url = f"http://127.0.0.1:{closed_port()}/v1" if kind == "refused" else fake_api.url
    with Transcriber(url, Secret(API_KEY), timeout_seconds=0.5) as client:
        exc = upload_error(client, path)
    chain = list(exception_chain(exc))
    if kind in {"drop", "reset", "timeout", "refused"}:
        assert len(chain) > 1  # the httpx error is kept as the cause, and searched too
    for link in chain:
        assert API_KEY not in str(link)
        assert API_KEY not in repr(link)
        assert API_KEY not in repr(vars(link))
    assert API_KEY not in "".join(traceback.format_exception(exc))


def test_wrong_key_never_in_the_error(fake_api: FakeAPI) -> None:
    """A rejected key is not echoed in the AccountError either."""
    key = "sk-wrong-4c0ffee4c0ffee"
    with Transcriber(fake_api.url, Secret(key)) as client, pytest.raises(AccountError) as info:
        client.check_account()
    assert all(key not in repr(e) and key not in str(e) for e in exception_chain(info.value))
    assert key not in "".join(traceback.format_exception(info.value))


# -- streaming ---------------------------------------------------------------------------


def test_upload_streams_without_holding_the_file_in_memory(
    fake_api: FakeAPI, transcriber: Transcriber, tmp_path: Path
) -> None:
    """A 40 MiB upload arrives intact while the process never allocates more than 5 MB."""
    path = tmp_path / "long.mp3"
    digest = hashlib.sha256()
    chunk = os.urandom(1 << 20)
    with path.open("wb") as out:
        for i in range(40):
            block = chunk[i:] + chunk[:i]  # every MiB different, so order matters to the hash
            digest.update(block)
            out.write(block)
    size = path.stat().st_size
    del chunk, block
    tracemalloc.start()
    try:
        result = transcriber.transcribe(path, path.name, MODEL)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert size == 40 << 20
    assert peak < 5_000_000, f"peak {peak} bytes while uploading {size}"
    assert result.bytes_sent == size
    upload = last_upload(fake_api)
    assert (upload.sha256, upload.size, upload.chunked) == (digest.hexdigest(), size, False)
    assert result.text == FakeAPI.text_for(digest.hexdigest())


def test_client_recovers_after_errors(
    fake_api: FakeAPI, transcriber: Transcriber, audio: Path
) -> None:
    """After an error answer the same client uploads again, and the next answer is its own."""
    fake_api.script(R400_UNKNOWN_MODEL, RESET)
    assert isinstance(upload_error(transcriber, audio), FileRejected)
    assert upload_error(transcriber, audio).reason == "connection"
    result = transcriber.transcribe(audio, audio.name, MODEL)
    uploads = fake_api.wait_for_uploads(3)
    assert [u.status for u in uploads] == [400, 0, 200]
    assert result.trace_id == uploads[2].trace_id
    assert len({u.trace_id for u in uploads}) == 3


def test_a_trickling_answer_is_cut_at_the_whole_request_deadline(tmp_path: Path) -> None:
    """A server sending one byte every 0.2 s never trips a per-read timeout; the deadline does."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            received = b""
            while b"--\r\n" not in received[-200:]:  # the end of the multipart body
                received += conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n{"
            )
            while not stop.wait(0.2):
                try:
                    conn.sendall(b" ")
                except OSError:
                    return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    audio = tmp_path / "a.wav"
    audio.write_bytes(b"RIFF" + b"\0" * 2000)
    started = time.monotonic()
    try:
        with (
            Transcriber(
                f"http://127.0.0.1:{port}/v1", Secret(API_KEY), timeout_seconds=1.0
            ) as client,
            pytest.raises(TransientError) as raised,
        ):
            client.transcribe(audio, "a.wav", "m")
    finally:
        stop.set()
        listener.close()
        thread.join(5)
    assert raised.value.reason == "timeout"
    assert 0.9 <= time.monotonic() - started < 3.0
