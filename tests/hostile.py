"""The answers of a broken or hostile server, as `Reply`s for tests/fakeapi.py.

Each one answers an upload or ``GET /user/info`` (``FakeAPI.info_reply``) alike:

- `deep_json`: a 200 whose JSON nests 100,000 deep (Python's parser recurses into it);
- `lone_surrogate`: a 200 whose ``text`` is ``"\\ud800"``, a string no UTF-8 file takes;
- `endless`: a 200 whose chunked body never ends (the fake stops it itself, after
  ``seconds``, at ``stop()``, or when the client hangs up);
- `gzip_bomb`: a 200 of ~2 MB with ``Content-Encoding: gzip`` that inflates to 2 GiB;
- `echo_authorization`: a 400 whose message repeats the request's Authorization header.
"""

from __future__ import annotations

import functools
import struct
import time
import zlib
from collections.abc import Iterator, Mapping

from tests.fakeapi import Reply

#: the size a gzip bomb inflates to
BOMB_SIZE = 2 << 30
_BLOCK = 1 << 20


def deep_json(levels: int = 100_000) -> Reply:
    """A 200 with a usable ``text``, and a ``segments`` list nested ``levels`` deep."""
    body = b'{"text": "deep", "segments": ' + b"[" * levels + b"]" * levels + b"}"
    return Reply(200, body, content_type="application/json")


def lone_surrogate() -> Reply:
    """A 200 whose ``text`` holds a lone surrogate: valid JSON, not valid Unicode."""
    return Reply(200, b'{"text": "before \\ud800 after"}', content_type="application/json")


def endless(seconds: float = 30.0) -> Reply:
    """A 200 whose body (the start of a ``text`` that never closes) streams for ``seconds``."""

    def chunks() -> Iterator[bytes]:
        yield b'{"text": "'
        filler = b"a" * 65536
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            yield filler

    return Reply(200, stream=chunks)


@functools.cache
def _bomb(size: int) -> bytes:
    """A gzip stream of ``size`` zero bytes (a multiple of 1 MiB), built from one block.

    After a full flush deflate starts afresh, so every further MiB of zeros compresses
    to the same ~1 KB: the block is repeated, and only the CRC walks the whole size.
    """
    zeros = bytes(_BLOCK)
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    first = packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH)
    block = packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH)
    last = packer.flush(zlib.Z_FINISH)[:-8]  # the final empty block, without the trailer
    crc = 0
    for _ in range(size // _BLOCK):
        crc = zlib.crc32(zeros, crc)
    trailer = struct.pack("<II", crc, size & 0xFFFFFFFF)
    return first + block * (size // _BLOCK - 1) + last + trailer


def gzip_bomb(size: int = BOMB_SIZE) -> Reply:
    """A 200 that is small on the wire and ``size`` bytes of zeros once gunzipped."""
    return Reply(
        200, _bomb(size), headers={"Content-Encoding": "gzip"}, content_type="application/json"
    )


def echo_authorization(status: int = 400) -> Reply:
    """An error whose message repeats the Authorization header it was sent (the key)."""

    def body(request: Mapping[str, str]) -> object:
        sent = next((v for k, v in request.items() if k.lower() == "authorization"), "")
        return {"code": 20015, "message": f"invalid request, you sent: {sent}", "data": sent}

    return Reply(status, body)


#: every hostile 200, by name (the echo is an error answer, tested apart)
HOSTILE_200 = {
    "deep-json": deep_json,
    "lone-surrogate": lone_surrogate,
    "endless": endless,
    "gzip-bomb": gzip_bomb,
}
