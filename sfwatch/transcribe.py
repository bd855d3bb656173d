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
"""

from __future__ import annotations

import json
import mimetypes
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import httpx

from sfwatch import __version__
from sfwatch.backoff import parse_retry_after
from sfwatch.config import Secret
from sfwatch.errors import (
    AccountError,
    FileRejected,
    RateLimited,
    TranscribeError,
    TransientError,
    UnusableResponse,
)

TRACE_HEADER = "x-siliconcloud-trace-id"
CONNECT_TIMEOUT = 10.0
#: the most of a response body we read (a day of transcript is well under this)
MAX_RESPONSE = 16 * 1024 * 1024
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


def audio_mime(name: str) -> str:
    """The MIME type to send for a file called ``name``."""
    suffix = Path(name).suffix.lower()
    return AUDIO_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"


def api_message(body: bytes) -> str:
    """The service's message from an error body: a JSON object, a JSON string, or text."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        parsed: Any = json.loads(text)
    except ValueError:
        return text[:500]
    if isinstance(parsed, str):
        return parsed[:500]
    if isinstance(parsed, dict):
        for field in (parsed.get("message"), parsed.get("error"), parsed.get("detail")):
            candidate = field.get("message") if isinstance(field, dict) else field
            if isinstance(candidate, str) and candidate:
                return candidate[:500]
    return text[:500]


def _api_code(body: bytes) -> int | None:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    code = parsed.get("code") if isinstance(parsed, dict) else None
    return code if isinstance(code, int) else None


def classify(status: int, headers: httpx.Headers, body: bytes) -> TranscribeError:
    """The error for a non-200 answer (see the retry classes in api-reference.md)."""
    trace_id = headers.get(TRACE_HEADER)
    message = api_message(body)
    kwargs: dict[str, Any] = {"http_status": status, "trace_id": trace_id, "api_message": message}
    what = f"HTTP {status}: {message}" if message else f"HTTP {status}"
    if status in _FILE_FAULT:
        return FileRejected(what, reason="api_rejected", **kwargs)
    if status == 429:
        return RateLimited(what, retry_after=parse_retry_after(dict(headers)), **kwargs)
    if status in _TRANSIENT or status >= 500:
        reason = "overloaded" if _api_code(body) == 50505 else "server_error"
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
        if status == 403 and _api_code(body) == 30001:
            reason = "no_balance"
        return AccountError(what, reason=reason, **kwargs)
    # Any other 4xx is unexplained: pause and report rather than fail a file for it.
    return AccountError(what, reason="unexpected_status", **kwargs)


class _DeadlineExceeded(Exception):
    """The attempt's whole-request deadline passed (raised inside httpx's body loop)."""


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


def _read_body(response: httpx.Response, deadline: float) -> bytes:
    """The response body, read within the deadline and at most MAX_RESPONSE bytes."""
    chunks: list[bytes] = []
    received = 0
    for chunk in response.iter_bytes():
        received += len(chunk)
        if time.monotonic() > deadline:
            raise _DeadlineExceeded
        if received > MAX_RESPONSE:
            break  # a transcript is text; anything this large is not one
        chunks.append(chunk)
    return b"".join(chunks)


class Transcriber:
    """An HTTP client for the transcription endpoint, shared by all workers."""

    def __init__(
        self, base_url: str, api_key: Secret, *, timeout_seconds: float = 600, concurrency: int = 4
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_seconds = timeout_seconds
        self._client = httpx.Client(
            base_url=self.base_url,
            headers={
                "Authorization": f"Bearer {api_key.reveal()}",
                "User-Agent": f"sfwatch/{__version__}",
            },
            timeout=httpx.Timeout(timeout_seconds, connect=CONNECT_TIMEOUT),
            limits=httpx.Limits(
                max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2
            ),
            follow_redirects=False,
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def __enter__(self) -> Transcriber:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def transcribe(self, path: Path, upload_name: str, model: str) -> Transcript:
        """Upload ``path`` (as ``upload_name``) once; return its transcript or raise."""
        started = time.monotonic()
        deadline = started + self.timeout_seconds
        try:
            with path.open("rb") as raw:
                size = path.stat().st_size
                audio = cast("BinaryIO", _DeadlineFile(raw, deadline))
                with self._client.stream(
                    "POST",
                    "/audio/transcriptions",
                    data={"model": model},
                    files={"file": (upload_name, audio, audio_mime(upload_name))},
                ) as response:
                    body = _read_body(response, deadline)
        except _DeadlineExceeded as exc:
            raise TransientError(
                f"no answer within timeout_seconds ({self.timeout_seconds:g} s)", reason="timeout"
            ) from exc
        except httpx.TimeoutException as exc:
            raise TransientError(f"timed out: {type(exc).__name__}", reason="timeout") from exc
        except httpx.TransportError as exc:
            raise TransientError(
                f"connection failed: {type(exc).__name__}: {exc}", reason="connection"
            ) from exc
        except httpx.RequestError as exc:  # e.g. a body that does not match its Content-Encoding
            raise TransientError(
                f"bad response: {type(exc).__name__}: {exc}", reason="bad_response"
            ) from exc
        trace_id = response.headers.get(TRACE_HEADER)
        if response.status_code != 200:
            raise classify(response.status_code, response.headers, body)
        text = _transcript_text(body)
        if text is None:
            raise UnusableResponse(
                "HTTP 200 without a usable text field",
                http_status=200,
                trace_id=trace_id,
                api_message=api_message(body),
            )
        return Transcript(
            text=text,
            trace_id=trace_id,
            http_status=200,
            seconds=time.monotonic() - started,
            bytes_sent=size,
        )

    def check_account(self) -> dict[str, Any]:
        """``GET /user/info``: the cheapest proof that the key and the endpoint work."""
        try:
            response = self._client.get("/user/info", timeout=httpx.Timeout(30, connect=10))
        except httpx.TimeoutException as exc:
            raise TransientError("timed out checking the account", reason="timeout") from exc
        except httpx.TransportError as exc:
            raise TransientError(
                f"connection failed: {type(exc).__name__}: {exc}", reason="connection"
            ) from exc
        except httpx.RequestError as exc:
            raise TransientError(
                f"bad response: {type(exc).__name__}: {exc}", reason="bad_response"
            ) from exc
        if response.status_code != 200:
            raise classify(response.status_code, response.headers, response.content)
        try:
            info = response.json()
        except ValueError:
            info = None
        if not isinstance(info, dict):
            raise AccountError(
                "user/info did not answer JSON: is base_url right?",
                http_status=200,
                reason="not_found",
                trace_id=response.headers.get(TRACE_HEADER),
            )
        data = info.get("data")
        return data if isinstance(data, dict) else info


def _transcript_text(body: bytes) -> str | None:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    text = parsed.get("text") if isinstance(parsed, dict) else None
    return text if isinstance(text, str) else None
