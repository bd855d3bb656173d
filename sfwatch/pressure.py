"""Whether the daemon is pushing a backlog as fast as its CPU allows.

Deliveries (hooks, webhooks) yield to uploads while it is (docs/design.md §13,
"Deliveries yield to uploads"): a hook's process and a webhook's POST cost the
daemon CPU, and when the daemon is the bottleneck that CPU comes out of the uploads,
the work the user pays the API for. A delivery waits at most ``outbox.YIELD_LIMIT``.

Two signals, both cheap:

- **backlog**, set by the work loop each turn: settled files wait for an upload slot.
  Without one, holding deliveries back would gain nothing.
- **the daemon's own CPU** over the last whole window of about a second
  (``time.process_time``: every thread of this process, user and system): at
  ``busy_cores`` of one core or more, the daemon is CPU-bound (its threads share one
  interpreter lock, so about one core is what they get). A daemon waiting on a slow
  API uses a few percent; it is never busy, and its deliveries go at once. A window
  is closed when ``busy`` is asked a second or more after it opened; one that ran
  past two seconds (nobody asked: an idle spell) is not judged, only restarted, so
  an idle minute never dilutes the first second of a burst.

Other processes' CPU is not counted: holding our deliveries back would not free it.

``cores.CorePin`` has a ``Pressure`` of its own: while it is busy, the daemon's
threads share one CPU (docs/design.md §2, "One core while busy").
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: the daemon counts as CPU-bound at this much CPU (in cores) over a window
BUSY_CORES = 0.9
#: seconds of CPU use a judgement looks at
WINDOW = 1.0


class Pressure:
    """Whether files wait for a slot while the daemon is CPU-bound (see the module).

    ``busy`` is called from one thread only (the outbox's dispatcher; a CorePin's,
    the work loop); ``backlog`` is written by the work loop and read there (one
    boolean: no lock needed).
    """

    def __init__(
        self,
        *,
        busy_cores: float = BUSY_CORES,
        window: float = WINDOW,
        clock: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = time.process_time,
    ) -> None:
        self.busy_cores = busy_cores
        self.window = window
        self.clock = clock
        self.cpu = cpu
        #: settled files wait for an upload slot (the work loop sets it each turn)
        self.backlog = False
        #: the daemon's CPU over the last whole window, in cores
        self.cores = 0.0
        self._at = clock()
        self._cpu = cpu()

    def restart(self) -> None:
        """Judge nothing before a whole new window, which starts now."""
        self._at, self._cpu, self.cores = self.clock(), self.cpu(), 0.0

    def busy(self) -> bool:
        """Files wait for a slot and the daemon used ``busy_cores`` or more lately."""
        now = self.clock()
        if now - self._at >= self.window:
            cpu = self.cpu()
            # A window nobody closed in time (an idle spell) says nothing of now.
            fresh = now - self._at <= 2 * self.window
            self.cores = (cpu - self._cpu) / (now - self._at) if fresh else 0.0
            self._at, self._cpu = now, cpu
        return self.backlog and self.cores >= self.busy_cores
