"""A minimal inotify reader (ctypes, Linux): when did a name appear in a folder?

Used by the latency benchmark to see a transcript appear (renamed into place by
sfwatch, closed after writing by the baseline's curl) the moment it happens.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
import time
from pathlib import Path
from types import TracebackType

IN_CLOSE_WRITE = 0x008
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_CLOEXEC = 0o2000000
IN_NONBLOCK = 0o4000
_HEADER = struct.Struct("iIII")

_libc = ctypes.CDLL(None, use_errno=True)


class Inotify:
    """Watches one folder; ``wait_for(name)`` returns when ``name`` was closed or moved in."""

    def __init__(self, folder: Path, mask: int = IN_CLOSE_WRITE | IN_MOVED_TO) -> None:
        self.fd = _libc.inotify_init1(IN_CLOEXEC | IN_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if _libc.inotify_add_watch(self.fd, os.fsencode(folder), mask) < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"inotify_add_watch {folder}")
        self.seen: dict[str, float] = {}  # name -> time.time() of its first event

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return
        now = time.time()
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return
        offset = 0
        while offset < len(data):
            _wd, _mask, _cookie, length = _HEADER.unpack_from(data, offset)
            offset += _HEADER.size
            name = data[offset : offset + length].rstrip(b"\0").decode("utf-8", "replace")
            offset += length
            self.seen.setdefault(name, now)

    def wait_for(self, name: str, timeout: float) -> float:
        """time.time() when ``name`` got its event; TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while name not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no event for {name} in {timeout} s")
            self._read(left)
        return self.seen[name]

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Inotify:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
