"""A faithful, scriptable fake of SiliconFlow's speech-to-text API, for the tests.

`FakeAPI` serves, on 127.0.0.1 and a free port, what the daemon talks to:

- ``POST /v1/audio/transcriptions``: checks ``Authorization: Bearer <key>`` (else 401 with
  the bare JSON string ``"Invalid token"``), parses the multipart body *streaming*, hashing
  the ``file`` part as it arrives (Content-Length or chunked bodies), and answers
  ``{"text": FakeAPI.text_for(sha256)}``; without a ``file`` part, 400 code 20015.
  Like OpenAI-compatible servers it honours a ``response_format`` field: ``json`` (the
  default), ``text``, ``verbose_json`` (text, language, duration, segments), ``srt`` and
  ``vtt``. Segments split the upload's duration evenly into pieces of at most
  ``SEGMENT_SECONDS`` (the duration is read from a WAV header or an MP3 frame's bitrate,
  else ``FIXED_SEGMENTS`` are sent); the language is the ``language`` field, else "en".
- ``GET /v1/user/info`` (the key check), ``GET /v1/models``; anything else is a plain-text
  ``404 page not found``. Every response carries a fresh ``x-siliconcloud-trace-id``.

Every transcription request is recorded as an `Upload`, errors included, with every form
field it carried besides ``model`` (``Upload.extra_fields``). What a request gets is
decided in this order: a bad key -> 401; the next `script`-ed `Reply`; no file part ->
400; a field named by `reject_field` -> 400 naming it the way OpenAI does
(``{"error": {"message": "... 'language' ...", "param": "language"}}``); the
`rate_limit` -> 429; the `responder` hook; the `set_default` reply; success.

`Reply` bodies: ``None`` is the transcript JSON for a 200 (the reason phrase otherwise);
``bytes`` are sent as-is; a ``str`` is plain text unless ``json_body=True``, which sends it
JSON-encoded (``"Invalid token"`` -> ``"\\"Invalid token\\""``, application/json); any
other object is JSON-encoded; a callable is given the request's headers and returns one of
these (to echo a header). ``content_type`` overrides the Content-Type. ``stream`` sends
the chunks an iterator yields as a chunked body instead, until it ends or the client goes.
The module has a canned `Reply` for every row of api-reference.md (``R429``, ``DROP``, ...);
tests/hostile.py builds the answers of a hostile server.

``python -m tests.fakeapi --latency 0.25 --key sk-x`` serves until SIGTERM/SIGINT, printing
the base URL on its first stdout line and a JSON summary line when it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import re
import secrets
import select
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BufferedIOBase
from types import TracebackType
from typing import cast
from urllib.parse import unquote

TRANSCRIPTIONS = "/v1/audio/transcriptions"
MODELS = ("FunAudioLLM/SenseVoiceSmall", "TeleAI/TeleSpeechASR")
_READ = 1 << 16  # bytes per read from the socket
_FIELD_CAP = 1 << 20  # text parts are kept up to this size
_RESET_BUDGET = 1 << 16  # a RESET reads this much of the file part before the RST
_HEAD = 4096  # the start of the file part kept to read its duration
SEGMENT_SECONDS = 5.0  # the longest segment a timed answer has
FIXED_SEGMENTS = ((0.0, 1.0), (1.0, 2.0))  # the segments of audio whose length is unknown
#: kbit/s by bitrate index: MPEG-1 Layer III, and MPEG-2/2.5 Layer III
_MP3_RATES = {
    3: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    0: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
#: Hz by sample-rate index: MPEG-1, MPEG-2, MPEG-2.5
_MP3_SAMPLE_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


@dataclass(frozen=True)
class Upload:
    """One POST /v1/audio/transcriptions, recorded whatever the answer was."""

    filename: str  # "" when there was no file part
    content_type: str
    model: str | None
    sha256: str  # "" when the file part was not received completely
    size: int
    authorization: str | None
    chunked: bool  # Transfer-Encoding: chunked rather than Content-Length
    status: int  # 0 when the fake answered nothing (drop, reset, stall, client gone)
    trace_id: str
    started: float  # time.monotonic()
    ended: float  # 0.0 in the Upload given to a responder
    extra_fields: dict[str, str]  # text parts other than `model`
    body_complete: bool = True  # False when the body was cut short (client gone, RESET)
    data: bytes = b""  # the file part's bytes, when FakeAPI.keep_bodies is set


@dataclass(frozen=True)
class Reply:
    """What to do with one request. See the module docstring for how `body` is sent."""

    status: int = 200
    body: object = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering, after reading the body
    drop: bool = False  # read the request, then close without any response (FIN)
    reset: bool = False  # close with a TCP RST, after at most 64 KiB of the file part
    stall: float = 0.0  # answer nothing for this long (or until the client hangs up), close
    json_body: bool = False  # send a str body as a JSON string
    content_type: str | None = None
    stream: Callable[[], Iterable[bytes]] | None = None  # a chunked body, from a fresh iterator

    def encode(self, text: str = "", request: Mapping[str, str] | None = None) -> tuple[bytes, str]:
        """The body bytes and Content-Type; `text` is the transcript for a default 200.

        `request`: the request's headers, for a callable body.
        """
        body = self.body
        if callable(body):
            body = body(request or {})
        if body is None and self.status != 200:
            try:
                body = HTTPStatus(self.status).phrase
            except ValueError:
                body = ""
        elif body is None:
            body = {"text": text}
        if isinstance(body, bytes):
            return body, self.content_type or "application/octet-stream"
        if isinstance(body, str) and not self.json_body:
            return body.encode(), self.content_type or "text/plain; charset=utf-8"
        data = json.dumps(body, ensure_ascii=False).encode()
        return data, self.content_type or "application/json"


def _err(code: int, message: str, data: object = None) -> dict[str, object]:
    return {"code": code, "message": message, "data": data}


def _jstr(status: int, text: str) -> Reply:
    return Reply(status, text, json_body=True)


_RATE_LIMITED = {
    "message": "Request was rejected due to rate limiting. If you want more, please contact "
    "contact@siliconflow.cn. Details:TPM limit reached.",
    "data": None,
}
_BALANCE = _err(30001, "Sorry, your account balance is insufficient")
_NGINX_502 = "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1>"
_USER_INFO = {
    "code": 20000,
    "message": "OK",
    "status": True,
    "data": {
        "id": "u1",
        "name": "test",
        "balance": "0.88",
        "status": "normal",
        "totalBalance": "0.88",
    },
}

R400_UNKNOWN_MODEL = Reply(400, _err(20012, "Model does not exist. Please check it carefully."))
R400_DATA_STRING = Reply(400, _err(20015, "Invalid audio", "audio longer than 1 hour"))
R400_MISSING_FILE = Reply(400, _err(20015, "file is required"))
R401 = _jstr(401, "Invalid token")
R401_ALT = _jstr(401, "Api key is invalid")
R403_FORBIDDEN = _jstr(403, "Forbidden")
R403_MODEL_DISABLED = _jstr(403, "Model disabled.")
R403_BALANCE = Reply(403, _BALANCE)
R402_BALANCE = Reply(402, _BALANCE)
R404 = Reply(404, "404 page not found")
R413 = Reply(413, "Request Entity Too Large")
R415 = Reply(415, {"detail": "Unsupported Media Type: audio could not be decoded"})
R422 = Reply(
    422,
    {"detail": [{"loc": ["body", "file"], "msg": "field required", "type": "value_error.missing"}]},
)
R429 = Reply(429, _RATE_LIMITED)
R429_RETRY_AFTER = Reply(429, _RATE_LIMITED, {"Retry-After": "1"})
R500 = Reply(500, "Internal Server Error")
R502 = Reply(502, _NGINX_502 + "</body></html>", content_type="text/html")
R503_OVERLOADED = Reply(503, _err(50505, "Model service overloaded. Please try again later."))
R504 = _jstr(504, "Gateway Timeout")
R200_NOT_JSON = Reply(200, "<html>oops</html>", content_type="text/html")
R200_NO_TEXT = Reply(200, {"result": "x"})
R200_EMPTY_TEXT = Reply(200, {"text": ""})
R400_OPENAI = Reply(
    400, {"error": {"message": "Invalid file format.", "type": "invalid_request_error"}}
)
R500_WHISPERCPP = Reply(500, {"error": "failed to process audio"})
DROP = Reply(drop=True)
RESET = Reply(reset=True)


def stall(seconds: float) -> Reply:
    """A reply that sends nothing for `seconds`, then closes the connection."""
    return Reply(stall=seconds)


def _trace_id() -> str:
    return "ti_" + secrets.token_hex(16)


_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def _params(header: str) -> tuple[str, dict[str, str]]:
    """Split ``value; k=v; k2="v 2"`` into the lower-cased value and its parameters."""
    value, _, rest = header.partition(";")
    params: dict[str, str] = {}
    extended: dict[str, str] = {}
    for key, raw in _PARAM.findall(";" + rest):
        text = raw.strip()
        if text.startswith('"'):
            text = re.sub(r"\\(.)", r"\1", text[1:-1])
        if key.endswith("*"):  # RFC 5987: charset'language'percent-encoded
            charset, _, encoded = text.partition("'")
            with contextlib.suppress(LookupError):
                extended[key[:-1].lower()] = unquote(
                    encoded.partition("'")[2], charset or "utf-8", "replace"
                )
        else:
            params.setdefault(key.lower(), text)
    return value.strip().lower(), params | extended


class _BrokenBodyError(Exception):
    """The request body ended early (client gone) or its framing was malformed."""


class _StopReadingError(Exception):
    """Enough of the body was read (for a RESET)."""


class _Body:
    """Reads a request body framed by Content-Length (`length`) or chunked (None)."""

    def __init__(self, rfile: BufferedIOBase, length: int | None) -> None:
        self._f = rfile
        self.chunked = length is None
        self._left = length or 0
        self._done = length == 0

    def read(self) -> bytes:
        if self._done:
            return b""
        if self.chunked and self._left == 0:
            self._next_chunk()
            if self._done:
                return b""
        data = self._f.read1(min(_READ, self._left))
        if not data:
            raise _BrokenBodyError
        self._left -= len(data)
        if self._left == 0:
            if not self.chunked:
                self._done = True
            elif self._f.read(2) != b"\r\n":
                raise _BrokenBodyError
        return data

    def _next_chunk(self) -> None:
        line = self._f.readline(1024)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise _BrokenBodyError from None
        if size < 0 or not line.endswith(b"\n"):
            raise _BrokenBodyError
        if size == 0:  # the last chunk; skip the trailer section
            while (trailer := self._f.readline(8192)) not in (b"\r\n", b"\n"):
                if not trailer.endswith(b"\n"):
                    raise _BrokenBodyError
            self._done = True
        self._left = size

    def drain(self) -> None:
        while self.read():
            pass


@dataclass
class _Form:
    filename: str = ""
    content_type: str = ""
    sha256: str = ""
    size: int = 0
    has_file: bool = False  # a complete `file` part was received
    fields: dict[str, str] = field(default_factory=dict)
    data: bytearray | None = None  # the file part itself, when the fake keeps bodies
    head: bytearray = field(default_factory=bytearray)  # its first _HEAD bytes


class _Multipart:
    """A streaming multipart/form-data parser that hashes the `file` part as it arrives."""

    def __init__(self, body: _Body, boundary: str, budget: int | None) -> None:
        self._body = body
        self._delim = b"\r\n--" + boundary.encode("latin-1", "replace")
        self._buf = bytearray(b"\r\n")  # so that the first boundary looks like the others
        self._budget = budget
        self._in_file = False
        self.form = _Form()

    def _fill(self) -> bool:
        if self._in_file and self._budget is not None and self.form.size >= self._budget:
            raise _StopReadingError
        data = self._body.read()
        self._buf += data
        return bool(data)

    def _line(self) -> bytes | None:
        while (i := self._buf.find(b"\r\n")) < 0:
            if len(self._buf) > 16384 or not self._fill():
                return None
        line = bytes(self._buf[:i])
        del self._buf[: i + 2]
        return line

    def _until_delim(self, sink: Callable[[bytes], None]) -> bool:
        """Pass the data up to the next delimiter to `sink`, consume the delimiter."""
        keep = len(self._delim) - 1
        while (i := self._buf.find(self._delim)) < 0:
            if len(self._buf) > keep:
                sink(bytes(self._buf[:-keep]))
                del self._buf[:-keep]
            if not self._fill():
                return False
        sink(bytes(self._buf[:i]))
        del self._buf[: i + len(self._delim)]
        return True

    def parse(self) -> None:
        form = self.form
        if not self._until_delim(lambda _: None):  # the preamble
            return
        while True:
            while len(self._buf) < 2 and self._fill():
                pass
            if self._buf.startswith(b"--") or self._line() is None:  # the closing delimiter
                return
            headers: dict[str, str] = {}
            while line := self._line():
                name, _, value = line.decode("utf-8", "replace").partition(":")
                headers[name.strip().lower()] = value.strip()
            if line is None:
                return
            disposition = _params(headers.get("content-disposition", ""))[1]
            name = disposition.get("name", "")
            if name == "file" and not form.has_file:
                if not self._file_part(
                    disposition.get("filename", ""), headers.get("content-type", "")
                ):
                    return
            elif not self._text_part(name):
                return

    def _file_part(self, filename: str, content_type: str) -> bool:
        form, digest = self.form, hashlib.sha256()
        form.filename, form.content_type, form.size = filename, content_type, 0

        def hash_it(data: bytes) -> None:
            digest.update(data)
            form.size += len(data)
            if len(form.head) < _HEAD:
                form.head += data[: _HEAD - len(form.head)]
            if form.data is not None:
                form.data += data

        self._in_file = True
        if not self._until_delim(hash_it):
            return False
        self._in_file = False
        form.sha256, form.has_file = digest.hexdigest(), True
        return True

    def _text_part(self, name: str) -> bool:
        value = bytearray()

        def keep_it(data: bytes) -> None:
            value.extend(data[: max(0, _FIELD_CAP - len(value))])

        if not self._until_delim(keep_it):
            return False
        self.form.fields[name] = value.decode("utf-8", "replace")
        return True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    allow_reuse_address = True  # a restarted fake can take its old port back

    def __init__(self, api: FakeAPI, port: int = 0) -> None:
        self.api = api
        super().__init__(("127.0.0.1", port), _Handler)

    def server_bind(self) -> None:  # skip HTTPServer's getfqdn(), slow without DNS
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.socket.getsockname()[1]

    def handle_error(self, *_: object) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError | _BrokenBodyError):  # clients hanging up is routine
            return
        self.api.errors.append(repr(exc))
        print(f"fakeapi: request handler failed: {exc!r}", file=sys.stderr)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    _trace = ""

    @property
    def _api(self) -> FakeAPI:
        return cast(_Server, self.server).api

    def setup(self) -> None:
        super().setup()
        self._api._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._api._track(self.connection, add=False)

    def log_message(self, *args: object) -> None:
        pass

    def send_response(self, code: int, message: str | None = None) -> None:
        super().send_response(code, message)
        self.send_header("x-siliconcloud-trace-id", self._trace or _trace_id())

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        self._trace = _trace_id()
        if code != HTTPStatus.NOT_IMPLEMENTED:
            super().send_error(code, message, explain)
            return
        self.close_connection = True  # an unknown method: its body, if any, is left unread
        self._send(R404)

    def do_GET(self) -> None:
        self._trace = _trace_id()
        self._api._count_request()
        route = (self.command, self.path.split("?", 1)[0])
        if route == ("POST", TRANSCRIPTIONS):
            self._transcribe()
            return
        self._drain()
        if route == ("GET", "/v1/user/info"):
            with self._api._cond:
                self._api.info_requests += 1
            self._answer(
                self._api.info_reply or (Reply(200, _USER_INFO) if self._authorized() else R401)
            )
        elif route == ("GET", "/v1/models"):
            models = {"object": "list", "data": [{"id": m, "object": "model"} for m in MODELS]}
            self._answer(Reply(200, models) if self._authorized() else R401)
        else:
            self._send(R404)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET  # noqa: N815

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self._api.api_key}"

    def _body(self) -> _Body:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return _Body(self.rfile, None)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
        return _Body(self.rfile, max(length, 0))

    def _drain(self) -> None:
        try:
            self._body().drain()
        except (_BrokenBodyError, OSError):
            self.close_connection = True

    def _transcribe(self) -> None:
        api, started = self._api, time.monotonic()
        authorized = self._authorized()
        api._enter()
        recorded = False

        def record(upload: Upload, status: int) -> None:
            nonlocal recorded
            recorded = True
            api._record(replace(upload, status=status, ended=time.monotonic()))

        try:
            scripted = api._next_scripted() if authorized else None
            body = self._body()
            ctype, params = _params(self.headers.get("Content-Type", ""))
            parser = _Multipart(
                body,
                params.get("boundary", ""),
                _RESET_BUDGET if scripted and scripted.reset else None,
            )
            if api.keep_bodies:
                parser.form.data = bytearray()
            complete = True
            try:
                if ctype == "multipart/form-data" and params.get("boundary"):
                    parser.parse()
                body.drain()
            except (_BrokenBodyError, _StopReadingError, OSError):
                complete = False
            form = parser.form
            fields = dict(form.fields)
            kept = bytes(form.data) if form.data is not None else b""
            model = fields.pop("model", None)
            upload = Upload(
                form.filename,
                form.content_type,
                model,
                form.sha256,
                form.size,
                self.headers.get("Authorization"),
                body.chunked,
                0,
                self._trace,
                started,
                0.0,
                fields,
                complete,
                kept,
            )
            if not complete:
                record(upload, 0)
                if scripted and scripted.reset:
                    self._reset()
                self.close_connection = True
                return
            if not authorized:
                reply = R401
            elif scripted is not None:
                reply = scripted
            elif not form.has_file:
                reply = R400_MISSING_FILE
            else:
                reply = (
                    api._field_check(fields)
                    or api._rate_check()
                    or (api.responder and api.responder(upload))
                    or api._default
                    or api.success(form.sha256, fields, audio_seconds(bytes(form.head), form.size))
                )
            self._answer(reply, api.text_for(form.sha256), lambda s: record(upload, s), api.latency)
        finally:
            if not recorded:
                api._leave()

    def _answer(
        self,
        reply: Reply,
        text: str = "",
        record: Callable[[int], None] | None = None,
        latency: float = 0.0,
    ) -> None:
        """Wait, then answer as `reply` says; `record` gets the status just before."""
        record = record or (lambda _: None)
        wait = latency + reply.delay
        if wait > 0 and self._api._stopping.wait(wait):
            reply = DROP
        if reply.stall > 0:
            self._wait_for_hangup(reply.stall)
        if reply.drop or reply.reset or reply.stall > 0:
            record(0)
            self.close_connection = True
            if reply.reset:
                self._reset()
            return
        record(reply.status)
        self._send(reply, text)

    def _send(self, reply: Reply, text: str = "") -> None:
        if reply.stream is not None:
            self._send_stream(reply, reply.stream())
            return
        body, ctype = reply.encode(text, dict(self.headers.items()))
        self.send_response(reply.status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_stream(self, reply: Reply, chunks: Iterable[bytes]) -> None:
        """A chunked body from `chunks`; ends with them, on stop(), or when the client goes."""
        self.close_connection = True
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type or "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            for chunk in chunks:
                if self._api._stopping.is_set():
                    return
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client hung up: what a cut-off answer looks like from here
            return

    def _wait_for_hangup(self, seconds: float) -> None:
        """Wait up to `seconds`; return early on stop() or when the client hangs up."""
        deadline, stopping = time.monotonic() + seconds, self._api._stopping
        while not stopping.is_set() and (left := deadline - time.monotonic()) > 0:
            try:
                readable = select.select([self.connection], [], [], min(left, 0.05))[0]
                if readable and not self.connection.recv(1, socket.MSG_PEEK):
                    return
            except OSError:
                return
            if readable:  # the client sent more; keep waiting without spinning
                stopping.wait(min(left, 0.05))

    def _reset(self) -> None:
        """Close the connection with a TCP RST (SO_LINGER 0)."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # drops the makefile() reference so that close() is real
        self.connection.close()


class FakeAPI:
    """The fake server. Use as ``with FakeAPI() as api:`` or ``start()`` / ``stop()``."""

    def __init__(self, api_key: str = "sk-test-key", latency: float = 0.0, port: int = 0) -> None:
        self.api_key = api_key
        self.port = port  # 0: any free port; after start(), the port it got
        self.keep_bodies = False  # keep each upload's file part in Upload.data
        self.latency = latency  # seconds to wait before every transcription answer
        self.responder: Callable[[Upload], Reply | None] | None = None  # gets status=0 Upload
        self.info_reply: Reply | None = None  # answers every /user/info when set
        self.info_requests = 0  # GET /user/info requests received
        self.url = ""  # "http://127.0.0.1:PORT/v1" once started
        self.in_flight = 0  # transcription requests in progress
        self.max_concurrent = 0
        self.requests_total = 0  # HTTP requests of any kind
        self.errors: list[str] = []  # unexpected exceptions in request handlers
        self._cond = threading.Condition()
        self._uploads: list[Upload] = []
        self._script: deque[Reply] = deque()
        self._default: Reply | None = None
        self._rpm: int | None = None
        self._retry_after: float | None = None
        self._window = 60.0
        self._admitted: deque[float] = deque()
        self._rejected: set[str] = set()
        self._stopping = threading.Event()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> FakeAPI:
        self._stopping.clear()
        self._server = _Server(self, self.port)
        self.port = self._server.server_port  # a restart after stop() reuses it
        self.url = f"http://127.0.0.1:{self._server.server_port}/v1"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fakeapi", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut open connections (stalls included), join their threads."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            with self._cond:
                conns = dict(self._conns)
            if not conns:
                break
            for sock in conns:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            for thread in conns.values():
                thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread is not None:
            self._thread.join(1.0)

    def __enter__(self) -> FakeAPI:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def uploads(self) -> list[Upload]:
        with self._cond:
            return list(self._uploads)

    def uploads_of(self, sha256: str) -> list[Upload]:
        return [u for u in self.uploads if u.sha256 == sha256]

    def script(self, *replies: Reply) -> None:
        """The next transcription requests (with a good key) get these replies, in order."""
        with self._cond:
            self._script.extend(replies)

    def set_default(self, reply: Reply | None) -> None:
        """The reply when nothing else decides; None is the normal transcript."""
        with self._cond:
            self._default = reply

    def rate_limit(
        self, rpm: int | None, retry_after: float | None = None, window: float = 60.0
    ) -> None:
        """Admit `rpm` transcriptions per sliding `window` seconds, 429 the rest; None: off."""
        with self._cond:
            self._rpm, self._retry_after, self._window = rpm, retry_after, window
            self._admitted.clear()

    def wait_for_uploads(self, n: int, timeout: float = 10) -> list[Upload]:
        """Wait until at least `n` uploads are recorded; TimeoutError if they are not."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._uploads) >= n, timeout):
                raise TimeoutError(f"{len(self._uploads)} uploads after {timeout}s, wanted {n}")
            return list(self._uploads)

    def reject_field(self, *names: str) -> None:
        """Answer 400 naming the field, OpenAI's way, to any upload that sends one of ``names``.

        ``reject_field()`` with no names accepts every field again.
        """
        with self._cond:
            self._rejected = set(names)

    def _field_check(self, fields: Mapping[str, str]) -> Reply | None:
        with self._cond:
            rejected = sorted(n for n in fields if n.removesuffix("[]") in self._rejected)
        if not rejected:
            return None
        name = rejected[0].removesuffix("[]")
        return Reply(
            400,
            {
                "error": {
                    "message": f"Unsupported value for parameter: '{name}'.",
                    "type": "invalid_request_error",
                    "param": name,
                    "code": "unsupported_value",
                }
            },
        )

    @classmethod
    def segments_for(cls, seconds: float | None) -> list[tuple[float, float]]:
        """The (start, end) of each segment a timed answer gives for audio this long."""
        if seconds is None or seconds <= 0:
            return list(FIXED_SEGMENTS)
        count = max(1, math.ceil(seconds / SEGMENT_SECONDS))
        step = seconds / count
        return [(round(i * step, 3), round((i + 1) * step, 3)) for i in range(count)]

    def success(self, sha256: str, fields: Mapping[str, str], seconds: float | None) -> Reply:
        """The 200 for an upload, in the ``response_format`` it asked for."""
        text = self.text_for(sha256)
        fmt = fields.get("response_format", "json")
        language = fields.get("language", "en")
        spans = self.segments_for(seconds)
        said = [f"segment {i + 1} of {sha256[:8]}" for i in range(len(spans))]
        segments = [
            {"id": i, "start": a, "end": b, "text": said[i]} for i, (a, b) in enumerate(spans)
        ]
        if fmt == "text":
            return Reply(200, text)
        if fmt == "verbose_json":
            duration = seconds if seconds is not None else spans[-1][1]
            body = {
                "task": "transcribe",
                "language": language,
                "duration": duration,
                "text": text,
                "segments": segments,
            }
            return Reply(200, body)
        if fmt in ("srt", "vtt"):
            sep = "," if fmt == "srt" else "."
            cues = [
                (f"{i + 1}\n" if fmt == "srt" else "")
                + f"{_stamp(a, sep)} --> {_stamp(b, sep)}\n{said[i]}\n"
                for i, (a, b) in enumerate(spans)
            ]
            head = [] if fmt == "srt" else ["WEBVTT\n"]
            return Reply(200, "\n".join([*head, *cues]), content_type="text/plain")
        return Reply()

    @staticmethod
    def text_for(sha256: str) -> str:
        """The default transcript for content with this sha256 (with non-ASCII on purpose)."""
        return f"transcript {sha256[:16]} 语音"

    def _track(self, sock: socket.socket, *, add: bool) -> None:
        with self._cond:
            if add:
                self._conns[sock] = threading.current_thread()
            else:
                self._conns.pop(sock, None)

    def _count_request(self) -> None:
        with self._cond:
            self.requests_total += 1

    def _enter(self) -> None:
        with self._cond:
            self.in_flight += 1
            self.max_concurrent = max(self.max_concurrent, self.in_flight)

    def _leave(self) -> None:
        with self._cond:
            self.in_flight -= 1

    def _record(self, upload: Upload) -> None:
        with self._cond:
            self.in_flight -= 1
            self._uploads.append(upload)
            self._cond.notify_all()

    def _next_scripted(self) -> Reply | None:
        with self._cond:
            return self._script.popleft() if self._script else None

    def _rate_check(self) -> Reply | None:
        with self._cond:
            if self._rpm is None:
                return None
            now = time.monotonic()
            while self._admitted and now - self._admitted[0] >= self._window:
                self._admitted.popleft()
            if len(self._admitted) < self._rpm:
                self._admitted.append(now)
                return None
            if self._retry_after is None:
                return R429
            return replace(R429, headers={"Retry-After": f"{self._retry_after:g}"})


def _stamp(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def audio_seconds(head: bytes, size: int) -> float | None:
    """How long an uploaded file plays, from its first bytes and its size; None if unknown.

    A WAV's byte rate comes from its ``fmt `` chunk; an MP3's bitrate from its first
    frame header (after an ID3v2 tag), assuming a constant bitrate (what sfwatch's
    transcoder writes). Anything else is unknown.
    """
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        pos, byte_rate = 12, 0
        while pos + 8 <= len(head):
            chunk, length = head[pos : pos + 4], struct.unpack("<I", head[pos + 4 : pos + 8])[0]
            if chunk == b"fmt " and pos + 20 <= len(head):
                byte_rate = struct.unpack("<I", head[pos + 16 : pos + 20])[0]
            if chunk == b"data":
                return (size - pos - 8) / byte_rate if byte_rate else None
            pos += 8 + length + (length & 1)
        return None
    pos = 0
    if head[:3] == b"ID3" and len(head) >= 10:
        pos = 10 + ((head[6] << 21) | (head[7] << 14) | (head[8] << 7) | head[9])
    while pos < len(head) - 4:
        if head[pos] != 0xFF or head[pos + 1] & 0xE0 != 0xE0:
            pos += 1
            continue
        version, layer = (head[pos + 1] >> 3) & 3, (head[pos + 1] >> 1) & 3
        index, rate_index = head[pos + 2] >> 4, (head[pos + 2] >> 2) & 3
        if layer != 1 or version not in _MP3_RATES or not 0 < index < 15 or rate_index == 3:
            pos += 1
            continue
        bitrate = _MP3_RATES[version][index] * 1000
        if b"Info" in head[pos : pos + 64] or b"Xing" in head[pos : pos + 64]:
            # LAME's header frame (often at another bitrate): the audio starts after it.
            rate = _MP3_SAMPLE_RATES[version][rate_index]
            per_frame = 144 if version == 3 else 72
            pos += per_frame * bitrate // rate + ((head[pos + 2] >> 1) & 1)
            continue
        return (size - pos) * 8 / bitrate
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakeapi",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per transcription")
    parser.add_argument("--key", default="sk-test-key", help="the API key to accept")
    parser.add_argument("--rpm", type=int, default=None, help="rate limit (requests/minute)")
    args = parser.parse_args(argv)
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    with FakeAPI(args.key, args.latency) as api:
        api.rate_limit(args.rpm)
        print(api.url, flush=True)
        while not done.wait(0.5):
            pass
    summary = {
        "uploads": len(api.uploads),
        "requests_total": api.requests_total,
        "max_concurrent": api.max_concurrent,
        "errors": api.errors,
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
