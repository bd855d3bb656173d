"""transcribe: one upload to ``POST {base_url}/audio/transcriptions``, one outcome.

The only module that imports httpx. Each call is one attempt: it either returns a
``Transcript`` or raises one of the errors in ``sfwatch.errors`` (retry policy
belongs to the scheduler, so a waiting file holds no upload slot). Every httpx
exception is translated here, at the boundary, with ``raise … from exc``.

The upload streams from an open file: httpx reads the file part in chunks and
sends a Content-Length from ``fstat``, so memory does not grow with file size.
httpx's default 5 s timeout would abort every real transcription (the service
answers only when it is done), so reads wait ``timeout_seconds``; and since
httpx's timeouts bound each read, not the request, sending the file and reading
the answer are each held to ``timeout_seconds`` as a whole, too.

Nothing a server sends may leak the key, wedge the daemon or crash a worker
(docs/design.md §8, "Bounds"). Every answer, the account probe's included, is
read within a whole-request deadline, at most ``MAX_RESPONSE`` bytes on the
wire *and* after decompression (Content-Encoding is undone here, a bounded step
at a time, so a gzip bomb stops at the cap), and parsed only when its JSON nests
at most ``MAX_JSON_DEPTH`` deep. A 200 that breaks a bound is an
``UnusableResponse``; every other surprise becomes an error of ``errors.py``.
Every string the server supplies (body, headers, httpx's messages about them)
has the key replaced by ``REDACTED`` before it leaves this module, the
transcript's text included: a real transcript never holds a 30-character random
key, and one that does must not carry it into a file the share can read.
"""

from __future__ import annotations

import contextlib
import mimetypes
import os
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import httpx

from sfwatch import __version__
from sfwatch.answers import (
    CONTROLS,
    MAX_JSON_DEPTH,
    MAX_RESPONSE,
    MAX_SMALL_RESPONSE,
    SURROGATES,
    JSONTooDeep,
    api_code,
    api_message,
    parse_json,
    read_answer,
    rejected_field,
    shown_size,
    too_deep,
)
from sfwatch.backoff import parse_retry_after
from sfwatch.config import Secret, UploadRequest
from sfwatch.errors import (
    AccountError,
    FieldRejected,
    FileRejected,
    RateLimited,
    TranscribeError,
    TransientError,
    UnusableResponse,
)
from sfwatch.subtitles import Segment, Timing

TRACE_HEADER = "x-siliconcloud-trace-id"
CONNECT_TIMEOUT = 10.0
#: The account probe's whole-request deadline: ``GET /user/info`` answers in well
#: under a second, and a probe that hangs holds every upload paused.
PROBE_TIMEOUT = 15.0
#: What the API key is replaced by in anything a server sent.
REDACTED = "[REDACTED]"
#: Trace IDs are 35 characters; a longer header is cut to this.
MAX_TRACE_ID = 128
#: The encodings undone here (bounded): the only ones asked for in Accept-Encoding.
ACCEPT_ENCODING = "gzip, deflate"
#: MIME types for the file part; the API wants a real audio type, not octet-stream
AUDIO_TYPES = {
    ".mp3": "audio/mpeg",
    ".wav": "audio/wav",
    ".m4a": "audio/mp4",
    ".flac": "audio/flac",
    ".ogg": "audio/ogg",
    ".opus": "audio/ogg",
    ".aac": "audio/aac",
    ".amr": "audio/amr",
    ".wma": "audio/x-ms-wma",
    ".webm": "audio/webm",
    ".mp4": "video/mp4",
    ".mkv": "video/x-matroska",
    ".mov": "video/quicktime",
    ".aiff": "audio/aiff",
}
_FILE_FAULT = {400, 413, 415, 422}
_ACCOUNT = {401, 402, 403, 404, 405}
_TRANSIENT = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Transcript:
    """What a successful upload gave back."""

    text: str
    trace_id: str | None
    http_status: int
    seconds: float
    bytes_sent: int
    #: the answer's segments (times in this upload's audio), when a timed format was asked
    segments: tuple[Segment, ...] | None = None
    #: the language the server says it heard (verbose_json), cleaned
    language: str | None = None
    #: the audio's duration as the server measured it, in seconds
    duration: float | None = None

    @property
    def timing(self) -> Timing | None:
        """Segments, language and duration together; None when no segments came."""
        if self.segments is None:
            return None
        return Timing(self.segments, self.language, self.duration)


def status_class(http_status: int | None) -> str:
    """``2xx``, ``3xx``, ``4xx`` or ``5xx`` for an answer; ``error`` for none (or nonsense)."""
    if http_status is None or not 100 <= http_status <= 599:
        return "error"
    return f"{http_status // 100}xx"


def audio_mime(name: str) -> str:
    """The MIME type to send for a file called ``name``."""
    suffix = Path(name).suffix.lower()
    return AUDIO_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"


def classify(
    status: int, headers: httpx.Headers, body: bytes, request: UploadRequest | None = None
) -> TranscribeError:
    """The error for a non-200 answer (see the retry classes in api-reference.md).

    ``request``: the fields the upload sent; a 400/422 naming one of them is the
    config's fault (``FieldRejected``), not the file's.
    """
    trace_id = headers.get(TRACE_HEADER)
    message = api_message(body)
    kwargs: dict[str, Any] = {"http_status": status, "trace_id": trace_id, "api_message": message}
    what = f"HTTP {status}: {message}" if message else f"HTTP {status}"
    if status in (400, 422) and request is not None:
        field = rejected_field(body, message, request)
        if field is not None:
            key = request.key_of(field) or field
            return FieldRejected(
                f"the server refused the field {field!r} ({key}): {what}",
                field=field,
                key=key,
                **kwargs,
            )
    if status in _FILE_FAULT:
        return FileRejected(what, reason="api_rejected", **kwargs)
    if status == 429:
        return RateLimited(what, retry_after=parse_retry_after(dict(headers)), **kwargs)
    if status in _TRANSIENT or status >= 500:
        reason = "overloaded" if api_code(body) == 50505 else "server_error"
        if status in {408, 504}:
            reason = "timeout"
        return TransientError(
            what, retry_after=parse_retry_after(dict(headers)), reason=reason, **kwargs
        )
    if status in _ACCOUNT:
        reason = {
            401: "unauthorized",
            402: "no_balance",
            403: "forbidden",
            404: "not_found",
            405: "not_found",
        }[status]
        if status == 403 and api_code(body) == 30001:
            reason = "no_balance"
        return AccountError(what, reason=reason, **kwargs)
    # Any other 4xx is unexplained: pause and report rather than fail a file for it.
    return AccountError(what, reason="unexpected_status", **kwargs)


class _DeadlineExceeded(Exception):
    """The attempt's whole-request deadline passed (raised inside httpx's body loop)."""


class _Undecodable(Exception):
    """The body is not what its Content-Encoding says, or stacks several encodings."""


class _DeadlineFile:
    """The upload's file, refusing to be read past the attempt's deadline.

    httpx's timeouts bound each read and write, not the request: a link that
    trickles bytes would keep one upload alive for ever. Reads of the file
    happen as the body is sent, so checking here bounds the upload side.
    """

    def __init__(self, file: BinaryIO, deadline: float) -> None:
        self._file = file
        self._deadline = deadline

    def read(self, size: int = -1) -> bytes:
        """Read like the file does, unless the deadline has passed."""
        if time.monotonic() > self._deadline:
            raise _DeadlineExceeded
        return self._file.read(size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)  # fileno, seek, tell: httpx sizes the part with them


#: The request body goes to the socket in writes of about this size (httpx reads
#: the file part 64 KiB at a time, so a large file is sent as before).
SEND_CHUNK = 64 * 1024


class _JoinedBody(httpx.SyncByteStream):
    """A request body's pieces joined into writes of up to ``SEND_CHUNK`` bytes.

    httpx sends a multipart body piece by piece (boundary, part headers, each field,
    CRLF), and httpcore makes each piece a ``send`` with a ``poll`` and an ``ioctl``
    before it: some 33 system calls for a short recording, each handing the
    interpreter lock to another thread (docs/benchmarks.md). Joined, a recording
    under 64 KiB goes out in one write. Still a stream: memory stays bounded.
    """

    def __init__(self, pieces: httpx.SyncByteStream) -> None:
        self._pieces = pieces

    def __iter__(self) -> Iterator[bytes]:
        buffer = bytearray()
        for piece in self._pieces:
            if not buffer and len(piece) >= SEND_CHUNK:
                yield piece  # (a whole chunk of the file: no copy)
                continue
            buffer += piece
            if len(buffer) >= SEND_CHUNK:
                yield bytes(buffer)
                buffer.clear()
        if buffer:
            yield bytes(buffer)

    def close(self) -> None:
        self._pieces.close()


class _Decoder:
    """Undoes a Content-Encoding a bounded step at a time (httpx would inflate whole chunks).

    gzip and deflate are undone with zlib's ``max_length``, so no step makes more
    than the room left under the cap. An encoding we did not ask for (``br``, …) is
    passed through, as httpx does: it will not parse. Stacked encodings are refused.
    """

    def __init__(self, header: str) -> None:
        codings = [c.strip().lower() for c in header.split(",")]
        codings = [c for c in codings if c not in ("", "identity")]
        if len(codings) > 1:
            raise _Undecodable("more than one Content-Encoding")
        coding = codings[0] if codings else "identity"
        self._zlib: Any = None
        self._first = coding == "deflate"  # deflate may come with or without zlib's header
        if coding in ("gzip", "x-gzip"):
            self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self._zlib = zlib.decompressobj()

    def feed(self, data: bytes, out: bytearray, room: int) -> None:
        """Append what ``data`` decodes to ``out``, stopping after ``room`` bytes (``room > 0``)."""
        if self._zlib is None:
            out += data
            return
        pending = data
        while pending and room > 0:
            try:
                piece = self._zlib.decompress(pending, room)
            except zlib.error as exc:
                if not self._first:
                    raise _Undecodable(f"{type(exc).__name__}: {exc}") from exc
                self._first = False  # raw deflate, without zlib's header (as httpx tries)
                self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
                continue
            self._first = False
            out += piece
            room -= len(piece)
            pending = self._zlib.unconsumed_tail


def _read_body(response: httpx.Response, deadline: float, limit: int) -> tuple[bytes, bool]:
    """The decoded body, read within the deadline; and whether it fit in ``limit`` bytes.

    Both the bytes on the wire and the decoded bytes are counted: a gzip bomb stops
    at ``limit`` decoded bytes, a body that never ends at ``limit`` received ones.
    An answer over the limit is cut there (its connection is then closed, not drained).
    """
    decoder = _Decoder(response.headers.get("content-encoding", ""))
    body = bytearray()
    received = 0
    for chunk in response.iter_raw():
        received += len(chunk)
        if time.monotonic() > deadline:
            raise _DeadlineExceeded
        decoder.feed(chunk, body, limit + 1 - len(body))
        if received > limit or len(body) > limit:
            del body[limit:]
            return bytes(body), False
    return bytes(body), True


def opened_socket(event: str, info: dict[str, Any]) -> socket.socket | None:
    """The socket of a connection httpcore's trace hook reports as just opened, else None."""
    if event not in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
        return None
    stream = info.get("return_value")
    sock = stream.get_extra_info("socket") if stream is not None else None
    return sock if isinstance(sock, socket.socket) else None


class _Cutoff:
    """Ends a request at its deadline, whatever it is waiting for, by shutting its socket.

    httpx's timeouts bound each read, and the body loops check the deadline, but a
    server that trickles header bytes, or sends ``100 Continue`` for ever, is never
    cut by either. The request's socket is learnt from httpcore's ``trace``
    extension when its connection is opened, so the request needs a connection of
    its own (the account probe opens one per call).
    """

    def __init__(self, seconds: float) -> None:
        self.fired = False
        self._armed = True
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace hook: remember the socket of the connection just opened."""
        if (sock := opened_socket(event, info)) is not None:
            with self._lock:
                self._socket = sock
                if self.fired:
                    self._shut()

    def _fire(self) -> None:
        with self._lock:
            if self._armed:
                self.fired = True
                self._shut()

    def _shut(self) -> None:
        if self._socket is not None and self._armed:
            # socket.socket's own shutdown, also for a TLS socket: the reader then sees
            # an end of file, and the TLS object is left for its thread to tear down.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self._socket, socket.SHUT_RDWR)

    def disarm(self) -> None:
        """The request is over: never touch its socket (soon closed, its number reused)."""
        with self._lock:
            self._armed = False
        self._timer.cancel()


@contextlib.contextmanager
def _translated(late: str, cutoff: _Cutoff | _Watchdog | None = None) -> Iterator[None]:
    """Turn every failure of one request into an error of ``errors.py``; ``late``: the
    message for a request that ran past its deadline."""
    try:
        yield
    except _DeadlineExceeded as exc:
        raise TransientError(late, reason="timeout") from exc
    except _Undecodable as exc:
        raise TransientError(f"bad response: {exc}", reason="bad_response") from exc
    except httpx.HTTPError as exc:
        if cutoff is not None and cutoff.fired:
            raise TransientError(late, reason="timeout") from exc
        if isinstance(exc, httpx.TimeoutException):
            raise TransientError(f"timed out: {type(exc).__name__}", reason="timeout") from exc
        if isinstance(exc, httpx.TransportError):
            raise TransientError(
                f"connection failed: {type(exc).__name__}: {exc}", reason="connection"
            ) from exc
        # e.g. a redirect loop or a stream error: the answer, not the file, is at fault
        raise TransientError(
            f"bad response: {type(exc).__name__}: {exc}", reason="bad_response"
        ) from exc


class Transcriber:
    """An HTTP client for the transcription endpoint, shared by all workers."""

    def __init__(
        self,
        base_url: str,
        api_key: Secret,
        *,
        timeout_seconds: float = 600,
        probe_timeout: float = PROBE_TIMEOUT,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # (whole, parsed once: httpx would parse and join a relative one at every upload)
        self._upload_url = httpx.URL(f"{self.base_url}/audio/transcriptions")
        self.timeout_seconds = timeout_seconds
        self.probe_timeout = probe_timeout
        self._key = api_key
        # One client per upload thread: a shared pool's lock is taken and released
        # several times per request, and 32 threads queueing on it cost more than the
        # connections they would share (docs/benchmarks.md). One TLS context for all.
        self._timeout = httpx.Timeout(timeout_seconds, connect=CONNECT_TIMEOUT)
        self._tls = httpx.create_ssl_context()
        self._here = threading.local()
        self._clients: list[httpx.Client] = []
        self._clients_lock = threading.Lock()

    @property
    def _client(self) -> httpx.Client:
        """This thread's client (one kept-alive connection), made on first use."""
        client: httpx.Client | None = getattr(self._here, "client", None)
        if client is None:
            client = self._new_client(self._timeout, httpx.Limits(max_connections=1))
            with self._clients_lock:
                self._clients.append(client)
            self._here.client = client
        return client

    def _new_client(self, timeout: httpx.Timeout, limits: httpx.Limits) -> httpx.Client:
        return httpx.Client(
            verify=self._tls,
            base_url=self.base_url,
            headers={
                "Authorization": f"Bearer {self._key.reveal()}",
                "User-Agent": f"sfwatch/{__version__}",
                "Accept-Encoding": ACCEPT_ENCODING,
            },
            timeout=timeout,
            limits=limits,
            follow_redirects=False,
        )

    def close(self) -> None:
        """Close every thread's connection."""
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()

    def __enter__(self) -> Transcriber:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- the key never leaves in what a server sent ----------------------------------------

    def _scrub_body(self, body: bytes) -> bytes:
        """``body`` with the key replaced, before anything is taken from it."""
        key = self._key.reveal().encode("utf-8", "surrogateescape")
        return body.replace(key, REDACTED.encode()) if key else body

    def _scrub(self, text: str) -> str:
        key = self._key.reveal()
        return text.replace(key, REDACTED) if key else text

    def _clean(self, text: str | None, limit: int | None = None) -> str | None:
        """A server-supplied string fit for a file, a log line and a terminal.

        The key replaced, lone surrogates (which no UTF-8 file, SQLite or log line
        takes) and control characters made U+FFFD, and only then cut to ``limit``,
        so that a cut never leaves a piece of the key behind.
        """
        if text is None:
            return None
        text = CONTROLS.sub("\ufffd", SURROGATES.sub("\ufffd", self._scrub(text)))
        return text[:limit] if limit is not None else text

    def _redact(self, exc: TranscribeError) -> None:
        """Clean every field of an error on its way out (the one place errors leave)."""
        exc.message = self._clean(exc.message) or ""
        exc.args = (exc.message,)
        exc.api_message = self._clean(exc.api_message)
        exc.trace_id = self._clean(exc.trace_id, MAX_TRACE_ID)

    # -- the upload ------------------------------------------------------------------------

    def transcribe(
        self, path: Path, upload_name: str, model: str, request: UploadRequest | None = None
    ) -> Transcript:
        """Upload ``path`` (as ``upload_name``) once; return its transcript or raise.

        ``request``: the form fields to send besides file and model (exactly these),
        and how to read the answer; None sends nothing more and reads ``{"text"}``.
        """
        try:
            return self._transcribe(path, upload_name, model, request or UploadRequest())
        except TranscribeError as exc:
            self._redact(exc)
            raise

    def _transcribe(
        self, path: Path, upload_name: str, model: str, request: UploadRequest
    ) -> Transcript:
        started = time.monotonic()
        deadline = started + self.timeout_seconds
        with (
            _translated(f"no answer within timeout_seconds ({self.timeout_seconds:g} s)"),
            path.open("rb", buffering=0) as raw,  # (httpx reads 64 KiB at a time anyway)
        ):
            size = os.fstat(raw.fileno()).st_size  # (the file opened, not its name again)
            audio = cast("BinaryIO", _DeadlineFile(raw, deadline))
            post = self._client.build_request(
                "POST",
                self._upload_url,
                data={"model": model, **{f.name: f.value for f in request.fields}},
                files={"file": (upload_name, audio, audio_mime(upload_name))},
            )
            post.stream = _JoinedBody(cast("httpx.SyncByteStream", post.stream))
            with contextlib.closing(self._client.send(post, stream=True)) as response:
                status, headers = response.status_code, response.headers
                limit = MAX_RESPONSE if status == 200 else MAX_SMALL_RESPONSE
                body, complete = _read_body(response, deadline, limit)
        body = self._scrub_body(body)
        trace_id = headers.get(TRACE_HEADER)
        if status != 200:
            # (a cut error body still has its status)
            raise classify(status, headers, body, request)
        text, timing, why_not = read_answer(body, complete=complete, request=request)
        if text is None:
            raise UnusableResponse(
                f"HTTP 200 without a usable text field: {why_not}",
                http_status=200,
                trace_id=trace_id,
                api_message=api_message(body[:MAX_SMALL_RESPONSE]),
            )
        segments = None
        if timing is not None:  # also a key the JSON spelt with escapes, in every segment
            segments = tuple(Segment(s.start, s.end, self._scrub(s.text)) for s in timing.segments)
        return Transcript(
            text=self._scrub(text),  # also a key the JSON spelt with escapes
            trace_id=self._clean(trace_id, MAX_TRACE_ID),
            http_status=200,
            seconds=time.monotonic() - started,
            bytes_sent=size,
            segments=segments,
            language=self._clean(timing.language, 64) if timing is not None else None,
            duration=timing.duration if timing is not None else None,
        )

    # -- the account probe -----------------------------------------------------------------

    def check_account(self) -> dict[str, Any]:
        """``GET /user/info``: the cheapest proof that the key and the endpoint work.

        Held to ``probe_timeout`` as a whole, on a connection of its own (so that
        ``_Cutoff`` can end it in any phase), and read up to ``MAX_SMALL_RESPONSE``.
        Whatever the server sends, this returns the account data or raises an error
        of ``errors.py``.
        """
        try:
            return self._check_account()
        except TranscribeError as exc:
            self._redact(exc)
            raise

    def _check_account(self) -> dict[str, Any]:
        seconds = self.probe_timeout
        deadline = time.monotonic() + seconds
        cutoff = _Cutoff(seconds)
        timeout = httpx.Timeout(seconds, connect=min(CONNECT_TIMEOUT, seconds))
        try:
            with (
                _translated(f"no answer from user/info within {seconds:g} s", cutoff),
                self._new_client(timeout, httpx.Limits(max_connections=1)) as client,
                client.stream("GET", "/user/info", extensions={"trace": cutoff.trace}) as response,
            ):
                try:
                    body, complete = _read_body(response, deadline, MAX_SMALL_RESPONSE)
                finally:
                    cutoff.disarm()
        finally:
            cutoff.disarm()
        body = self._scrub_body(body)
        trace_id = response.headers.get(TRACE_HEADER)
        if response.status_code != 200:
            raise classify(response.status_code, response.headers, body)
        problem = None if complete else f"it is larger than {shown_size(MAX_SMALL_RESPONSE)}"
        info: Any = None
        if problem is None:
            try:
                info = parse_json(body)
            except JSONTooDeep as exc:
                problem = str(exc)
            except ValueError:
                info = None
        if problem is not None:  # an answer, but none to use; not a wrong URL: try again
            raise TransientError(
                f"user/info answered unusably: {problem}",
                http_status=200,
                reason="bad_response",
                trace_id=trace_id,
            )
        if not isinstance(info, dict):
            raise AccountError(
                "user/info did not answer JSON: is base_url right?",
                http_status=200,
                reason="not_found",
                trace_id=trace_id,
            )
        data = info.get("data")
        found = data if isinstance(data, dict) else info
        return {k: self._clean(v, 500) if isinstance(v, str) else v for k, v in found.items()}


# -- webhooks (docs/design.md §13) ------------------------------------------------------
#
# Webhook POSTs live here, not in the outbox with the standard library, because this
# module is where every HTTP request of sfwatch is bounded and audited: a whole-request
# deadline (a receiver trickling its headers is cut too), answers read at most
# WEBHOOK_ANSWER bytes, TLS verified as for the API. They never carry the key: a
# poster has no Transcriber, and its client was made here with no default headers
# (nothing of the API's client, its Authorization above all, can ride along).

#: the most of a receiver's answer read: only its status matters, the rest is for a log line
WEBHOOK_ANSWER = 4096


class _Watchdog:
    """A whole-request deadline for a client that holds one connection at a time.

    Like ``_Cutoff``, it ends a request at its deadline whatever it waits for, by
    shutting its socket; but it lives as long as its client, so the connection may
    be kept alive between requests: with ``max_connections=1`` the socket in use is
    always the one the last connect made (learnt from httpcore's ``trace``). One
    thread sleeps until the armed deadline; no thread is started per request.
    """

    def __init__(self) -> None:
        self.fired = False
        self._socket: socket.socket | None = None
        self._deadline: float | None = None
        self._wake = threading.Condition()
        threading.Thread(target=self._run, name="sfwatch-webhook-deadline", daemon=True).start()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace hook: remember the socket of a connection just opened."""
        if (sock := opened_socket(event, info)) is not None:
            with self._wake:
                self._socket = sock
                if self.fired:
                    self._shut()

    def arm(self, seconds: float) -> None:
        """A request starts: end it in ``seconds``."""
        with self._wake:
            self.fired = False
            self._deadline = time.monotonic() + seconds
            self._wake.notify()

    def disarm(self) -> None:
        """The request is over: the idle connection is left alone."""
        with self._wake:
            self._deadline = None

    def _shut(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self._socket, socket.SHUT_RDWR)

    def _run(self) -> None:
        with self._wake:
            while True:
                if self._deadline is None:
                    self._wake.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._wake.wait(left)
                    continue
                self.fired = True
                self._deadline = None
                self._shut()


@dataclass(frozen=True)
class Posted:
    """A receiver's answer to one webhook POST."""

    status: int
    retry_after: float | None
    #: the start of its body, cleaned for a log line
    message: str


class WebhookPoster:
    """POSTs JSON to webhook receivers, one at a time (one per outbox thread).

    It keeps one connection alive between POSTs (a stream of events to one
    receiver costs no connect each); each POST is bounded as a whole by its timeout.
    """

    def __init__(self) -> None:
        self._watchdog = _Watchdog()
        self._client = httpx.Client(
            verify=httpx.create_ssl_context(),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            follow_redirects=False,
        )

    def post(self, url: str, body: bytes, headers: dict[str, str], timeout: float) -> Posted:
        """POST ``body`` to ``url`` once; ``TransientError`` when no answer came."""
        deadline = time.monotonic() + timeout
        self._watchdog.arm(timeout)
        try:
            with (
                _translated(f"no answer within {timeout:g} s", self._watchdog),
                self._client.stream(
                    "POST",
                    url,
                    content=body,
                    headers={"Accept-Encoding": "identity", **headers},
                    timeout=httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT, timeout)),
                    extensions={"trace": self._watchdog.trace},
                ) as response,
            ):
                answer, _ = _read_body(response, deadline, WEBHOOK_ANSWER)
        finally:
            self._watchdog.disarm()
        text = CONTROLS.sub("\ufffd", answer.decode("utf-8", errors="replace")).strip()
        return Posted(
            status=response.status_code,
            retry_after=parse_retry_after(dict(response.headers)),
            message=text[:200],
        )

    def close(self) -> None:
        """Close the kept connection."""
        self._client.close()


# Moved to answers.py; importable from here as before.
__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_RESPONSE",
    "MAX_SMALL_RESPONSE",
    "REDACTED",
    "JSONTooDeep",
    "Posted",
    "Transcriber",
    "Transcript",
    "WebhookPoster",
    "api_message",
    "audio_mime",
    "classify",
    "opened_socket",
    "parse_json",
    "rejected_field",
    "status_class",
    "too_deep",
]
