"""Prometheus metrics of one daemon (docs/design.md, "Metrics and health").

Two sources, so that no pipeline module knows about metrics:

- **counters and the histogram** are fed by the daemon's events (``events.py``),
  the ones written to the log under the same names: ``sfwatch.job_finished``
  (files by outcome and reason, audio seconds, the last success),
  ``sfwatch.job_vanished``/``sfwatch.job_adopted``, and ``sfwatch.upload_finished``,
  one per HTTP attempt (status class, seconds, bytes sent);
- **gauges** (queue, in flight, paused, concurrency limit) are read at scrape
  time from the status the work loop publishes every ``PUBLISH_EVERY`` seconds
  (``Daemon.status()``): the scrape never touches the loop's own state.

Every label value comes from a small fixed set (an unknown reason is ``other``),
never from a file name or a server's answer: no series per file, nothing a
server sends (the key it might echo) ends in a metric. Each daemon has its own
``CollectorRegistry``, not the library's global one, so that several daemons in
one process (the tests) do not collide.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

# prometheus-client: the reference implementation of the exposition formats (text
# and OpenMetrics, with their escaping and content negotiation) and of thread-safe
# counters and histograms; hand-written, each would be a place to get the format wrong.
import prometheus_client
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from sfwatch import __version__

#: why a file ended in failed/ (``job_finished.reason``); anything else is "other"
FAILED_REASONS = (
    "api_rejected",
    "unusable_response",
    "empty",
    "not_audio",
    "unreadable",
    "gave_up",
    "poison",
    "internal_error",
    "other",
)
#: how a job left us: the outcomes of ``job_finished``, and a claim lost or adopted
OUTCOMES = ("done", "dedup", "failed", "vanished", "adopted")
#: ``upload_finished.status_class``; "error" is an attempt without an answer
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "error")
#: why uploads are held (``PaceState.reason``): account faults, then the pacer's holds
PAUSE_REASONS = (
    "unauthorized",
    "no_balance",
    "forbidden",
    "not_found",
    "unexpected_status",
    "rate_limited",
    "retry_after",
    "outage",
    "other",
)
#: upload durations: a short clip takes a second, an hour of audio minutes
UPLOAD_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)

# "_created" series (one per counter, the time it was made) double the series for
# nothing a dashboard uses.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


class _StatusGauges:
    """A collector: the gauges, from the status the work loop last published."""

    def __init__(self, status: Callable[[], Mapping[str, Any]]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        status = self.status()
        yield _gauge(
            "sfwatch_queue_files",
            "Files seen and not finished, not in flight: settling, queued for a slot, "
            "or waiting for a retry.",
            status["settling"] + status["queued"] + status["waiting"],
        )
        yield _gauge(
            "sfwatch_in_flight",
            "Attempts running now: claimed, being prepared, waiting for a turn, uploading "
            "or finishing.",
            status["in_flight"],
        )
        yield _gauge(
            "sfwatch_uploading",
            "Uploads sent and not yet answered (what the concurrency limit counts).",
            status.get("uploading", 0),
        )
        yield _gauge(
            "sfwatch_concurrency_limit",
            "Uploads allowed at once now (api.concurrency, halved on rate limits).",
            status["limit"],
        )
        paused = GaugeMetricFamily(
            "sfwatch_paused",
            "1 while uploads are held, by why (an account fault, a rate limit, an outage).",
            labels=["reason"],
        )
        reason = status.get("paused_reason") if status.get("paused") else None
        if reason is not None and reason not in PAUSE_REASONS:
            reason = "other"
        for name in PAUSE_REASONS:
            paused.add_metric([name], 1.0 if name == reason else 0.0)
        yield paused


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class Tally:
    """The counters and the histogram of one process, as plain numbers.

    Plain numbers, not prometheus-client's objects, so that the face can add its
    workers' tallies (``snapshot()``, published to the ledger) to its own at scrape
    time: one ``/metrics`` counts the whole run (docs/design.md, "Workers").
    """

    def __init__(self) -> None:
        self.files: dict[str, float] = {}  # "outcome/reason"
        self.uploads: dict[str, float] = {}  # status class
        self.buckets = [0.0] * (len(UPLOAD_BUCKETS) + 1)  # per bucket, the last +Inf
        self.upload_sum = 0.0
        self.audio_seconds = 0.0
        self.bytes_uploaded = 0.0
        self.last_success = 0.0

    def add(self, other: Mapping[str, Any]) -> None:
        """Add a ``snapshot()`` (another process's; a malformed one adds what it can)."""
        pairs = ((self.files, other.get("files")), (self.uploads, other.get("uploads")))
        for mine, theirs in pairs:
            for key, n in theirs.items() if isinstance(theirs, dict) else ():
                if key in mine and isinstance(n, int | float):
                    mine[key] += n
        buckets = other.get("buckets")
        if (
            isinstance(buckets, list)
            and len(buckets) == len(self.buckets)
            and all(isinstance(b, int | float) for b in buckets)
        ):
            self.buckets = [a + b for a, b in zip(self.buckets, buckets, strict=True)]
        for name in ("upload_sum", "audio_seconds", "bytes_uploaded"):
            if isinstance(n := other.get(name), int | float):
                setattr(self, name, getattr(self, name) + n)
        if isinstance(n := other.get("last_success"), int | float):
            self.last_success = max(self.last_success, n)

    def snapshot(self) -> dict[str, Any]:
        """The numbers as JSON-able data, for ``add()`` in another process."""
        return {
            "files": dict(self.files),
            "uploads": dict(self.uploads),
            "buckets": list(self.buckets),
            "upload_sum": self.upload_sum,
            "audio_seconds": self.audio_seconds,
            "bytes_uploaded": self.bytes_uploaded,
            "last_success": self.last_success,
        }


def new_tally() -> Tally:
    """A tally with every series at 0: increase() and alerts see the first one."""
    tally = Tally()
    for outcome in OUTCOMES:
        for reason in FAILED_REASONS if outcome == "failed" else ("",):
            tally.files[f"{outcome}/{reason}"] = 0.0
    tally.uploads = dict.fromkeys(STATUS_CLASSES, 0.0)
    return tally


class _Counters:
    """A collector: the counters and the histogram, this process's and its workers'."""

    def __init__(self, tally: Callable[[], Tally]) -> None:
        self.tally = tally

    def collect(self) -> Iterator[Metric]:
        t = self.tally()
        files = CounterMetricFamily(
            "sfwatch_files",
            "Files finished, by outcome (done, dedup, failed; vanished, adopted) and reason.",
            labels=["outcome", "reason"],
        )
        for key, n in t.files.items():
            files.add_metric(key.split("/", 1), n)
        yield files
        uploads = CounterMetricFamily(
            "sfwatch_uploads",
            "HTTP upload attempts, by the answer's status class (error: no answer).",
            labels=["status_class"],
        )
        for status_class, n in t.uploads.items():
            uploads.add_metric([status_class], n)
        yield uploads
        bounds = [*(repr(float(b)) for b in UPLOAD_BUCKETS), "+Inf"]  # (as prometheus-client)
        yield HistogramMetricFamily(
            "sfwatch_upload_seconds",
            "Duration of one HTTP upload attempt, sending and waiting for the answer.",
            buckets=list(zip(bounds, itertools.accumulate(t.buckets), strict=True)),
            sum_value=t.upload_sum,
        )
        yield CounterMetricFamily(
            "sfwatch_audio_seconds",
            "Seconds of audio of the files transcribed (outcome done).",
            value=t.audio_seconds,
        )
        yield CounterMetricFamily(
            "sfwatch_bytes_uploaded",
            "Bytes sent in upload attempts the service answered.",
            value=t.bytes_uploaded,
        )
        yield _gauge(
            "sfwatch_last_success_timestamp_seconds",
            "Unix time a file last finished done or dedup (0: not yet).",
            t.last_success,
        )


class Metrics:
    """The metrics of one daemon: fed by its events, its published status and, on the
    face, its workers' tallies (``others``)."""

    def __init__(
        self,
        status: Callable[[], Mapping[str, Any]],
        others: Callable[[], Iterable[Mapping[str, Any]]] = tuple,
    ) -> None:
        self.own = new_tally()
        self._lock = threading.Lock()  # events come from every upload thread
        self.others = others
        self.registry = r = CollectorRegistry(auto_describe=True)
        build = Gauge("sfwatch_build_info", "The running sfwatch version.", ["version"], registry=r)
        build.labels(__version__).set(1)
        r.register(_Counters(self.total))
        r.register(_StatusGauges(status))

    def on_event(self, event: str, fields: Mapping[str, Any]) -> None:
        """An ``events.Listener``: count what happened."""
        with self._lock:
            self._count(event, fields)

    def _count(self, event: str, fields: Mapping[str, Any]) -> None:
        t = self.own
        if event == "sfwatch.job_finished":
            self._finished(fields)
        elif event == "sfwatch.upload_finished":
            status_class = fields.get("status_class")
            t.uploads[status_class if status_class in STATUS_CLASSES else "error"] += 1
            seconds = max(0.0, float(fields.get("seconds") or 0.0))
            t.buckets[bisect.bisect_left(UPLOAD_BUCKETS, seconds)] += 1
            t.upload_sum += seconds
            t.bytes_uploaded += max(0, int(fields.get("bytes_sent") or 0))
        elif event == "sfwatch.job_vanished":
            t.files["vanished/"] += 1
        elif event == "sfwatch.job_adopted":
            t.files["adopted/"] += 1

    def _finished(self, fields: Mapping[str, Any]) -> None:
        t = self.own
        outcome = fields.get("outcome")
        if outcome == "failed":
            reason = fields.get("reason")
            t.files[f"failed/{reason if reason in FAILED_REASONS else 'other'}"] += 1
            return
        if outcome not in ("done", "dedup"):
            return
        t.files[f"{outcome}/"] += 1
        t.last_success = time.time()
        seconds = fields.get("audio_seconds")
        if outcome == "done" and isinstance(seconds, int | float) and seconds > 0:
            t.audio_seconds += seconds

    def snapshot(self) -> dict[str, Any]:
        """This process's tally, for the face (a worker publishes it with its status)."""
        with self._lock:
            return self.own.snapshot()

    def total(self) -> Tally:
        """This process's tally and its workers' added up: what a scrape shows."""
        total = new_tally()
        total.add(self.snapshot())
        for other in self.others():
            total.add(other)
        return total

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition for a scrape's ``Accept`` header: (body, content type)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


__all__ = ["Metrics", "Tally"]
