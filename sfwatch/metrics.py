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

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

# prometheus-client: the reference implementation of the exposition formats (text
# and OpenMetrics, with their escaping and content negotiation) and of thread-safe
# counters and histograms; hand-written, each would be a place to get the format wrong.
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
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


class Metrics:
    """The registry of one daemon, fed by its events and its published status."""

    def __init__(self, status: Callable[[], Mapping[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.files = Counter(
            "sfwatch_files",
            "Files finished, by outcome (done, dedup, failed; vanished, adopted) and reason.",
            ["outcome", "reason"],
            registry=r,
        )
        self.uploads = Counter(
            "sfwatch_uploads",
            "HTTP upload attempts, by the answer's status class (error: no answer).",
            ["status_class"],
            registry=r,
        )
        self.upload_seconds = Histogram(
            "sfwatch_upload_seconds",
            "Duration of one HTTP upload attempt, sending and waiting for the answer.",
            buckets=UPLOAD_BUCKETS,
            registry=r,
        )
        self.audio_seconds = Counter(
            "sfwatch_audio_seconds",
            "Seconds of audio of the files transcribed (outcome done).",
            registry=r,
        )
        self.bytes_uploaded = Counter(
            "sfwatch_bytes_uploaded",
            "Bytes sent in upload attempts the service answered.",
            registry=r,
        )
        self.last_success = Gauge(
            "sfwatch_last_success_timestamp_seconds",
            "Unix time a file last finished done or dedup (0: not yet).",
            registry=r,
        )
        Gauge("sfwatch_build_info", "The running sfwatch version.", ["version"], registry=r).labels(
            __version__
        ).set(1)
        # Every series exists from the start, at 0: increase() and alerts see the first one.
        for outcome in OUTCOMES:
            for reason in FAILED_REASONS if outcome == "failed" else ("",):
                self.files.labels(outcome, reason)
        for status_class in STATUS_CLASSES:
            self.uploads.labels(status_class)
        r.register(_StatusGauges(status))

    def on_event(self, event: str, fields: Mapping[str, Any]) -> None:
        """An ``events.Listener``: count what happened."""
        if event == "sfwatch.job_finished":
            self._finished(fields)
        elif event == "sfwatch.upload_finished":
            status_class = fields.get("status_class")
            self.uploads.labels(status_class if status_class in STATUS_CLASSES else "error").inc()
            self.upload_seconds.observe(max(0.0, float(fields.get("seconds") or 0.0)))
            self.bytes_uploaded.inc(max(0, int(fields.get("bytes_sent") or 0)))
        elif event == "sfwatch.job_vanished":
            self.files.labels("vanished", "").inc()
        elif event == "sfwatch.job_adopted":
            self.files.labels("adopted", "").inc()

    def _finished(self, fields: Mapping[str, Any]) -> None:
        outcome = fields.get("outcome")
        if outcome == "failed":
            reason = fields.get("reason")
            self.files.labels("failed", reason if reason in FAILED_REASONS else "other").inc()
            return
        if outcome not in ("done", "dedup"):
            return
        self.files.labels(outcome, "").inc()
        self.last_success.set(time.time())
        seconds = fields.get("audio_seconds")
        if outcome == "done" and isinstance(seconds, int | float) and seconds > 0:
            self.audio_seconds.inc(seconds)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition for a scrape's ``Accept`` header: (body, content type)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


__all__ = ["Metrics"]
