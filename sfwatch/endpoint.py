"""The metrics and health listener: a small HTTP/1.1 server for a few fixed paths.

It serves ``GET`` (and ``HEAD``) of the paths it is given — ``/metrics``,
``/healthz``, ``/readyz`` — and nothing else: any other path is 404, any other
method 405, anything that is not a plain request 400 (docs/design.md, "Metrics
and health"). It never reads a request body and closes every connection after
one answer.

It runs on threads of its own and only reads what the work loop publishes, so
it never blocks the loop. A slow or hostile client cannot hold it for long
either: ``WORKERS`` connections are served at once (the others wait in the
kernel's queue), each with one deadline for the whole exchange (``DEADLINE``:
a client trickling a byte a second is cut like one sending nothing), and a
request head is read up to ``MAX_HEAD`` bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from sfwatch.logs import get_logger

#: connections served at once
WORKERS = 4
#: seconds for one whole exchange: the request read, the answer written
DEADLINE = 5.0
#: the longest request head (request line and headers) read
MAX_HEAD = 8192
#: connections the kernel queues while every worker is busy
BACKLOG = 16


@dataclass(frozen=True)
class Response:
    """What a path answers."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


#: a path's handler: the request's headers (names in lower case) → its answer
Route = Callable[[Mapping[str, str]], Response]


def json_response(status: int, payload: Mapping[str, Any]) -> Response:
    """``payload`` as a JSON answer."""
    body = json.dumps(payload, sort_keys=True).encode() + b"\n"
    return Response(status, body, "application/json")


def _text(status: int, text: str) -> Response:
    return Response(status, text.encode() + b"\n")


class Endpoint:
    """The listener: bound by ``start``, closed by ``close``."""

    def __init__(
        self,
        host: str,
        port: int,
        routes: Mapping[str, Route],
        *,
        workers: int | None = None,
        deadline: float | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.routes = dict(routes)
        self.workers = WORKERS if workers is None else workers
        self.deadline = DEADLINE if deadline is None else deadline
        self._sock: socket.socket | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()  # connections being served
        self.log = get_logger()

    def start(self) -> None:
        """Bind and listen (an ``OSError`` if that fails), then serve on worker threads."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.port = sock.getsockname()[1]
        for number in range(self.workers):
            thread = threading.Thread(
                target=self._serve, args=(sock,), name=f"sfwatch-metrics-{number}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Stop serving: the workers finish their exchange (at most ``deadline``) and end."""
        if self._closed.is_set():
            return
        self._closed.set()
        os.write(self._wake_w, b"x")  # never read: it wakes every worker, now and later
        with self._lock:
            for conn in self._open:  # cut exchanges in progress: no waiting for a slow client
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(self.deadline + 1.0)
        if self._sock is not None:
            self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- the workers ---------------------------------------------------------------

    def _serve(self, sock: socket.socket) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._closed.is_set():
                selector.select()
                if self._closed.is_set():
                    return
                try:
                    conn, _ = sock.accept()
                except (BlockingIOError, InterruptedError):
                    continue  # another worker took it
                except OSError:
                    time.sleep(0.1)  # out of file descriptors: do not spin
                    continue
                with conn:
                    with self._lock:
                        self._open.add(conn)
                    try:
                        if not self._closed.is_set():
                            self._exchange(conn)
                    finally:
                        with self._lock:
                            self._open.discard(conn)

    def _exchange(self, conn: socket.socket) -> None:
        """One request, one answer, within ``deadline``; a client's fault only ends it."""
        deadline = time.monotonic() + self.deadline
        try:
            head = self._read_head(conn, deadline)
            if head is None:
                return  # gone, silent past the deadline, or nothing sent
            method, response = self._answer(head)
            conn.settimeout(max(0.001, deadline - time.monotonic()))
            conn.sendall(_encode(response, head_only=method == "HEAD"))
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)
        except OSError:  # reset, timed out (sendall's timeout bounds the whole write)
            return

    def _read_head(self, conn: socket.socket, deadline: float) -> bytes | None:
        """The request head, or None; ``b""`` stands for one too long (answered 431)."""
        data = b""
        while True:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                end = data.find(b"\n\n")
            if end >= 0:
                return data[:end]
            if len(data) > MAX_HEAD:
                return b""
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            conn.settimeout(left)
            try:
                chunk = conn.recv(4096)
            except TimeoutError:
                return None
            if not chunk:
                return None
            data += chunk

    def _answer(self, head: bytes) -> tuple[str, Response]:
        if not head:
            return "GET", _text(431, "request head too large")
        lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return "GET", _text(400, "bad request")
        method, target, _version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            return "GET", _text(405, "only GET and HEAD")
        route = self.routes.get(target.split("?", 1)[0])
        if route is None:
            return method, _text(404, "not found")
        try:
            return method, route(headers)
        except Exception:  # a bug of ours: answer 500, keep serving
            self.log.exception("sfwatch.metrics_route_failed", path=target.split("?", 1)[0])
            return method, _text(500, "internal error")


def _encode(response: Response, *, head_only: bool) -> bytes:
    try:
        phrase = HTTPStatus(response.status).phrase
    except ValueError:
        phrase = "Status"
    lines = [
        f"HTTP/1.1 {response.status} {phrase}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Cache-Control: no-store",
        "X-Content-Type-Options: nosniff",
        "Connection: close",
    ]
    if response.status == 405:
        lines.append("Allow: GET, HEAD")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body


__all__ = ["Endpoint", "Response", "Route", "json_response"]
