"""One core while busy: the daemon's threads share a CPU while it pushes a backlog.

Why (docs/design.md §2, "One core while busy"; docs/benchmarks.md has the runs): the
daemon's threads share one interpreter lock, and nearly every system call hands it
to another thread. When those threads run on different CPUs, each hand-off wakes a
thread on the other CPU, which is slow (on a VM, an interrupt through the host);
on one CPU it is a plain switch. Measured on two CPUs with a backlog of small files,
the daemon used half the CPU per file on one CPU, and finished 1.5 to 1.9 times as
many files a second. Its threads can use about one core between them anyway.

So, while files wait for an upload slot and the daemon is CPU-bound (``Pressure``),
every thread of the process is pinned to the CPU the work loop is running on; that
CPU is one the process was allowed (``sched_getaffinity`` at start: a systemd
``CPUAffinity=`` is respected). The pin is released when no file has waited for
``RELEASE_AFTER`` seconds, and every ``REPICK_AFTER`` seconds of a long backlog, so
that the kernel may move the daemon off a CPU that other work has taken since. It is
also released as soon as a window finds the daemon using less than ``KEEP_CORES`` of
its CPU: the API slowed down, and a pin gains nothing. (A CPU that another busy
process shares, say a second sfwatch daemon pinned to the same one, is left at the
next ``REPICK_AFTER``.) After a release, the next pin is judged by a whole window
measured on every CPU.

Work that does not hold the interpreter lock and takes real CPU (PyAV transcoding a
file, numpy measuring its loudness) runs ``wide()``: its thread keeps every allowed
CPU meanwhile, and so does the start of a hook (its process would inherit the pin).
A failing ``sched_setaffinity`` (a cpuset changed under us, a seccomp filter) turns
the pinning off for good, logged once; in ``wide()`` it is ignored. Neither stops
the daemon. One process has one pin (``_owner``): a second CorePin stands aside.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sfwatch.pressure import Pressure

#: seconds without a waiting file before the pin is released
RELEASE_AFTER = 5.0
#: seconds a pin lasts at most; the next busy window pins again, perhaps elsewhere
REPICK_AFTER = 60.0
#: a pinned daemon using less CPU than this (in cores) over a window is released. On one
#: CPU the daemon needs about half the CPU a file (the point of the pin), so a daemon
#: pinned at 0.9 of a core runs at 0.45-0.55 pinned: this must stay well below that.
KEEP_CORES = 0.3

_lock = threading.Lock()  # held while any thread's CPUs change: no pass can race another
_wide: dict[int, int] = {}  # native thread id → how many wide() blocks it is in
_pin: set[int] | None = None  # the CPU set threads are pinned to now, or None
_allowed: set[int] = set()  # every CPU the process may use (CorePin sets it)
_owner: CorePin | None = None  # the CorePin whose pin holds now: one per process


def _set_affinity(tid: int, cpus: set[int]) -> None:
    with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
        os.sched_setaffinity(tid, cpus)


def _try_affinity(tid: int, cpus: set[int]) -> None:
    """Best effort: a CPU that left our cpuset costs this thread its CPUs, nothing more."""
    with contextlib.suppress(OSError):
        os.sched_setaffinity(tid, cpus)


@contextmanager
def wide() -> Iterator[None]:
    """Let this thread use every allowed CPU while the block runs (see the module).

    Never raises: the block's work (a hook's start, a transcode) matters more than
    where it runs.
    """
    tid = threading.get_native_id()
    with _lock:
        _wide[tid] = _wide.get(tid, 0) + 1
        if _wide[tid] == 1 and _pin is not None:
            _try_affinity(tid, _allowed)
    try:
        yield
    finally:
        with _lock:
            _wide[tid] -= 1
            if _wide[tid] == 0:
                del _wide[tid]
                if _pin is not None:
                    _try_affinity(tid, _pin)


def current_cpu() -> int | None:
    """The CPU the calling thread runs on (``/proc/thread-self/stat`` field 39)."""
    try:
        stat = Path("/proc/thread-self/stat").read_bytes()
        return int(stat[stat.rindex(b")") + 2 :].split()[36])
    except (OSError, ValueError, IndexError):
        return None


def threads() -> list[int]:
    """The native ids of this process's threads."""
    return [int(task.name) for task in Path("/proc/self/task").iterdir()]


class CorePin:
    """Pins the daemon's threads to one CPU while it is busy (see the module).

    ``turn(backlog)`` is called by the work loop each turn, from one thread.
    """

    def __init__(
        self,
        log: Any,
        *,
        pressure: Pressure | None = None,
        clock: Callable[[], float] = time.monotonic,
        release_after: float = RELEASE_AFTER,
        repick_after: float = REPICK_AFTER,
        keep_cores: float = KEEP_CORES,
        prefer: int | None = None,
    ) -> None:
        self.log = log
        #: worker K of several (workers.py) pins to the K-th allowed CPU: not all to one
        self.prefer = prefer
        self.pressure = pressure if pressure is not None else Pressure(clock=clock)
        self.clock = clock
        self.release_after = release_after
        self.repick_after = repick_after
        self.keep_cores = keep_cores
        # (a CorePin made while another one's pin holds must not take it for the rest)
        self.allowed = set(_allowed) if _owner is not None else set(os.sched_getaffinity(0))
        _allowed.update(self.allowed)
        #: False once pinning is off: one CPU allowed, or the kernel refused a pin
        self.enabled = len(self.allowed) > 1
        #: the CPU the threads are pinned to now, or None
        self.cpu: int | None = None
        self._pinned_at = 0.0
        self._backlog_at = 0.0

    def turn(self, backlog: bool) -> None:
        """Pin, keep or release, from whether files wait for a slot now."""
        if not self.enabled or _owner not in (None, self):
            return  # (another daemon in this process pins: a test, a benchmark)
        now = self.clock()
        self.pressure.backlog = backlog
        if backlog:
            self._backlog_at = now
        if self.cpu is None:
            if self.pressure.busy():
                self._pin(now)
            return
        self.pressure.busy()  # the windows go on: what the pinned daemon gets is judged too
        if (
            now - self._backlog_at >= self.release_after
            or now - self._pinned_at >= self.repick_after
            or self.pressure.cores < self.keep_cores
        ):
            self.release()

    def _pin(self, now: float) -> None:
        ordered = sorted(self.allowed)
        cpu = current_cpu() if self.prefer is None else ordered[self.prefer % len(ordered)]
        if cpu is None or cpu not in self.allowed:
            cpu = min(self.allowed)
        if self._apply({cpu}):
            self.log.info("sfwatch.cpu_pinned", cpu=cpu, cores=round(self.pressure.cores, 2))
            self.cpu, self._pinned_at = cpu, now

    def release(self) -> None:
        """Let every thread use every allowed CPU again (also at shutdown)."""
        if self.cpu is None:
            return
        cpu, self.cpu = self.cpu, None
        if self._apply(None):
            self.log.info("sfwatch.cpu_released", cpu=cpu, cores=round(self.pressure.cores, 2))
        self.pressure.restart()  # the next pin is judged by a window on every CPU

    def _apply(self, pin: set[int] | None) -> bool:
        """Set every thread's CPUs: ``pin``, or all allowed ones; False if refused."""
        global _pin, _owner  # one pin per process, shared with wide()
        with _lock:
            try:
                # Twice: a thread started during the first pass by a thread not yet
                # changed took that thread's CPUs.
                for _ in range(2):
                    for tid in threads():
                        _set_affinity(tid, self.allowed if pin is None or tid in _wide else pin)
                _pin, _owner = pin, (None if pin is None else self)
            except OSError as exc:
                self.enabled, _pin, _owner = False, None, None
                for tid in threads():
                    with contextlib.suppress(OSError):  # then a thread keeps what it has
                        _set_affinity(tid, self.allowed)
                self.log.warning("sfwatch.cpu_pin_off", error=str(exc))
                return False
        return True
