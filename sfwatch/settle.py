"""settle: decide when a noted file is complete.

A file is ready once its size, mtime_ns, inode and device have not changed for
``settle_seconds`` on the daemon's own monotonic clock. The file's own mtime is
never compared with the clock: ``cp -p`` and rsync keep old mtimes, and a NAS's
clock may be off. No event (not even close-write) shortens the wait, because a
slow SMB writer closes and reopens a file between chunks.

Each pending file is looked at twice in the quiet case: when it is noted and
once ``settle_seconds`` later. An event for a pending file restarts its wait if
the signature moved. A heap orders the checks, so thousands of pending files
cost nothing between their due times.
"""

from __future__ import annotations

import heapq
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sfwatch.job import FileSignature


@dataclass(frozen=True)
class SettledFile:
    """A file that stopped changing: ready to be claimed."""

    path: Path
    root: Path
    signature: FileSignature


@dataclass
class _Pending:
    root: Path
    signature: FileSignature
    quiet_since: float
    due: float


def signature_of(path: Path, st: os.stat_result | None = None) -> FileSignature | None:
    """The signature of a regular file at ``path`` (links not followed), else None.

    ``st``: its ``os.lstat`` result, when the caller has just made it.
    """
    if st is None:
        try:
            st = os.lstat(path)
        except OSError:
            return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return FileSignature(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


class Settler:
    """Tracks files that may still be written to; yields them once quiet."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._pending: dict[Path, _Pending] = {}
        self._heap: list[tuple[float, int, Path]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, path: object) -> bool:
        return path in self._pending

    def note(
        self, path: Path, root: Path, settle_seconds: float, st: os.stat_result | None = None
    ) -> bool:
        """Start or restart the wait for ``path``; False if it is not a regular file.

        ``st``: the path's ``os.lstat``, if the caller has just made it.
        """
        sig = signature_of(path, st)
        if sig is None:
            self._pending.pop(path, None)
            return False
        now = self.clock()
        entry = self._pending.get(path)
        if entry is not None and entry.signature == sig:
            return True  # an event without a change (a close, an attrib): keep waiting
        due = now + settle_seconds
        self._pending[path] = _Pending(root, sig, now, due)
        self._push(due, path)
        return True

    def forget(self, path: Path) -> None:
        """Stop tracking ``path``."""
        self._pending.pop(path, None)

    def next_due(self) -> float | None:
        """When the earliest check falls due (for the scheduler's sleep)."""
        while self._heap and self._heap[0][2] not in self._pending:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def due(self, settle_seconds: Callable[[Path], float]) -> list[SettledFile]:
        """Check every file whose wait is over; return those that stayed quiet."""
        now = self.clock()
        ready: list[SettledFile] = []
        while self._heap and self._heap[0][0] <= now:
            due, _, path = heapq.heappop(self._heap)
            entry = self._pending.get(path)
            if entry is None or entry.due != due:
                continue  # a stale heap entry: the wait was restarted
            sig = signature_of(path)
            if sig is None:
                del self._pending[path]  # gone, or no longer a regular file
            elif sig != entry.signature:
                entry.signature, entry.quiet_since = sig, now
                entry.due = now + settle_seconds(entry.root)
                self._push(entry.due, path)
            else:
                del self._pending[path]
                ready.append(SettledFile(path, entry.root, sig))
        return ready

    def _push(self, due: float, path: Path) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, path))
