"""The status of a whole run: the face's own and what its workers publish.

A daemon publishes its status (``Daemon.status()``) to the ledger every
``PUBLISH_EVERY`` seconds. With ``workers: N`` (docs/design.md §2, "Workers") the
face reads its workers' from there and adds them to its own, so that systemd's
STATUS=, the metrics' gauges and ``/metrics``' counters cover the whole run:

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

from collections.abc import Collection, Mapping
from typing import Any

from sfwatch.metrics import Tally, new_tally

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
        running: Collection[int],
    ) -> dict[str, Any]:
        """``own`` with the published ``states`` of this run's running workers added in.

        ``live``: this run's worker instance names; ``running``: their pids now (a
        dead worker's row holds its last numbers, which are no longer true).
        """
        others = [s for s in states if s.get("instance") in live and s.get("pid") in running]
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


__all__ = ["WorkerReports", "format_status", "merged"]
