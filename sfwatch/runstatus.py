"""What a daemon publishes, and the status of a whole run: the face's own and what
its workers publish.

Every ``PUBLISH_EVERY`` seconds the work loop has its ``Publisher`` write the
daemon's status (``Daemon.status()``) to the ledger, for ``sfwatch status`` and
for its face, and tell systemd the run's STATUS= line; the metrics' gauges read
the last published status (``Publisher.published``), never the loop's own state.

With ``workers: N`` (docs/design.md §2, "Workers") the face reads its workers'
statuses from there and adds them to its own, so that systemd's STATUS=, the
metrics' gauges and ``/metrics``' counters cover the whole run:

- the gauges' numbers (queue, in flight, limit) and the outcome counts are summed
  (``merged``); a pause of any worker is the run's pause;
- each worker's counters travel as a ``metrics.Tally`` snapshot under the
  status's ``metrics`` key. A worker the face restarts begins again at 0, so
  ``WorkerReports`` keeps the last snapshot of the worker's earlier process and
  goes on adding it: a counter of the run never goes down while the face lives.
  What a worker counted after its last publish and before it died is not seen
  (at most ``PUBLISH_EVERY`` seconds of it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

from sfwatch.events import Events
from sfwatch.ledger import Ledger
from sfwatch.metrics import Metrics, Tally, new_tally
from sfwatch.notify import Notifier
from sfwatch.worker import HOST_ERRORS
from sfwatch.workers import Share

#: how often the loop publishes its status (to the ledger, STATUS=, the gauges)
PUBLISH_EVERY = 2.0
#: an unchanged status is written again this often (`sfwatch status` sees it is alive)
STATE_REFRESH = 30.0

#: the status numbers the face adds up over its workers (``merged``)
_SUMMED = ("settling", "queued", "waiting", "in_flight", "uploading", "limit")


def format_status(status: dict[str, Any]) -> str:
    """``Daemon.status()`` as one line for systemd's STATUS= (`systemctl status`)."""
    counts = status["counts"]
    done = counts.get("done", 0) + counts.get("dedup", 0)
    line = (
        f"queued {status['queued'] + status['settling']}, waiting {status['waiting']}, "
        f"in flight {status['in_flight']} (uploading {status['uploading']}), done {done}, "
        f"failed {counts.get('failed', 0)}"
    )
    return f"{line}; paused: {status['paused']}" if status["paused"] else line


def merged(own: dict[str, Any], others: list[dict[str, Any]]) -> dict[str, Any]:
    """The face's status with its workers' last published ones added in: what systemd's
    STATUS= and the metrics' gauges show for the whole run (``Daemon.status()`` keys)."""
    if not others:
        return own
    total = dict(own)
    counts = dict(own.get("counts") or {})
    for other in others:
        for key in _SUMMED:
            if isinstance(other.get(key), int):
                total[key] = int(total.get(key) or 0) + other[key]
        for outcome, n in (other.get("counts") or {}).items():
            counts[outcome] = counts.get(outcome, 0) + int(n)
        if other.get("paused") and not total.get("paused"):
            total["paused"], total["paused_reason"] = True, other.get("paused_reason")
    total["counts"] = counts
    return total


def _current(state: Mapping[str, Any], running: Mapping[int, float]) -> bool:
    """Whether ``state`` is from a worker running now, written since it started."""
    pid, updated = state.get("pid"), state.get("updated")
    spawned = running.get(pid) if isinstance(pid, int) else None
    return spawned is not None and isinstance(updated, int | float) and updated >= spawned


class WorkerReports:
    """What the face has heard from its workers (the face's loop updates it; a scrape,
    on the listener's thread, reads ``tallies()``)."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, Mapping[str, Any]]] = {}  # instance: (pid, tally)
        self._carried: Tally = new_tally()  # earlier processes' last tallies
        self._tallies: list[Mapping[str, Any]] = []

    def status(
        self,
        own: dict[str, Any],
        states: list[dict[str, Any]],
        live: Collection[str],
        running: Mapping[int, float],
    ) -> dict[str, Any]:
        """``own`` with the published ``states`` of this run's running workers added in.

        ``live``: this run's worker instance names; ``running``: their pids now, each
        with when it was started. A dead worker's row holds its last numbers, which
        are no longer true; a row written before its pid's worker started is an
        earlier run's (a pid used again: a container started afresh numbers alike).
        """
        others = [s for s in states if s.get("instance") in live and _current(s, running)]
        for state in others:
            tally = state.get("metrics")
            if not isinstance(tally, dict):
                continue
            instance, pid = str(state["instance"]), int(state["pid"])
            earlier = self._last.get(instance)
            if earlier is not None and earlier[0] != pid:
                self._carried.add(earlier[1])  # restarted: its counts begin again at 0
            self._last[instance] = (pid, tally)
        # One new list, swapped in whole: the listener's thread reads it unlocked.
        self._tallies = [self._carried.snapshot(), *(t for _, t in self._last.values())]
        return merged(own, others)

    def tallies(self) -> list[Mapping[str, Any]]:
        """Every worker's counters as last heard, restarted ones' earlier lives included."""
        return self._tallies


class Publisher:
    """A daemon's publishing: its status to the ledger and systemd, and its metrics."""

    def __init__(
        self,
        status: Callable[[], dict[str, Any]],
        ledger: Ledger,
        notifier: Notifier,
        *,
        share: Share,
        base: str,
        running: Callable[[], Mapping[int, float]],
        events: Events,
        metrics: bool,
    ) -> None:
        """``status``: the daemon's own; ``running``: the face's workers now (pid → when
        started);
        ``metrics``: count for ``metrics.listen`` (the face serves them, a worker
        publishes its tally for the face)."""
        self.status = status
        self.ledger = ledger
        self.notifier = notifier
        self.share = share
        self.base = base
        self.instance = share.instance(base)
        self.running = running
        self.reports = WorkerReports()  # the face's: what its workers published
        #: the status last published, the run's (the metrics' gauges read it, from
        #: another thread)
        self.published: dict[str, Any] = status()
        self.metrics: Metrics | None = None
        if metrics:
            self.metrics = Metrics(lambda: self.published, self.reports.tallies)
            events.subscribe(self.metrics.on_event)
        #: why the last ledger write of the status failed (the state dir's disk), if it did
        self.state_error: str | None = None
        self.last = 0.0  # when it last published (monotonic)
        self._last_state: dict[str, Any] = {}
        self._state_written = 0.0

    def due(self) -> bool:
        """``PUBLISH_EVERY`` has passed since the last publish."""
        return time.monotonic() - self.last >= PUBLISH_EVERY

    def publish(self) -> None:
        """Publish now; a ledger error is kept in ``state_error`` (health) and raised."""
        now = self.last = time.monotonic()
        status = self.status()
        if self.metrics is not None and not self.share.face:
            status["metrics"] = self.metrics.snapshot()  # for the face's /metrics
        self.published = self._with_workers(status)
        # The ledger write is fsynced: an idle daemon makes one a minute, not one per tick.
        if status != self._last_state or now - self._state_written >= STATE_REFRESH:
            try:
                self.ledger.publish_state(self.instance, os.getpid(), status)
            except HOST_ERRORS as exc:
                self.state_error = getattr(exc, "strerror", None) or str(exc)
                raise
            self.state_error = None
            self._last_state, self._state_written = status, now
        self.notifier.status(format_status(self.published))

    def _with_workers(self, status: dict[str, Any]) -> dict[str, Any]:
        """The face's status with its workers' (what they last published to the ledger)."""
        if not self.share.face or self.share.count == 1:
            return status
        try:
            states = self.ledger.daemon_states()
        except HOST_ERRORS:
            return status  # (the state disk: the face's own numbers will do)
        return self.reports.status(status, states, self.share.live(self.base), self.running())

    def forget_retired_workers(self) -> None:
        """Drop the status rows of workers an earlier run had and this one has not, so
        that `sfwatch status` does not list them for ever (the state disk failing here
        is for the loop's health check to report, not for start-up to fail on)."""
        try:
            names = [str(s["instance"]) for s in self.ledger.daemon_states()]
            if retired := [n for n in names if self.share.retired(self.base, n)]:
                self.ledger.forget_states(retired)
        except HOST_ERRORS:
            return


__all__ = ["PUBLISH_EVERY", "Publisher", "WorkerReports", "format_status", "merged"]
