"""The daemon: wires the stages, owns the threads, the signals and the work loop.

Threads: one watchdog observer per watched folder (they only note paths), one
scanner (start-up scan, then periodic rescans), ``api.concurrency`` upload
workers, one account prober, and the main thread, which runs the work loop::

    drain noted paths → settle → claim (only when an upload slot is free)
    → worker: prepare → transcribe → finish → outcome → main thread decides

All decisions (retry, back off, pause, fail) are made on the main thread, so
the pacing state needs no locks. A file waiting for a retry holds no upload
slot. Shutdown follows rq's worker: the first SIGTERM/SIGINT is a warm stop
(claim nothing more, let uploads in flight finish within a grace period), a
second one is a cold stop (leave now; claimed files are resumed at start-up).
"""

from __future__ import annotations

import hashlib
import heapq
import os
import re
import signal
import socket
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from sfwatch import __version__
from sfwatch.backoff import full_jitter
from sfwatch.claim import claim, claimed_files, release
from sfwatch.config import Config, Secret, WatchConfig
from sfwatch.errors import (
    AccountError,
    FileRejected,
    PrepareError,
    RateLimited,
    TranscribeError,
    TransientError,
    UnusableResponse,
)
from sfwatch.finish import Placed, finish_done, finish_failed
from sfwatch.job import Job
from sfwatch.logs import get_logger
from sfwatch.pacing import Pacer
from sfwatch.prepare import identify, prepare
from sfwatch.settle import SettledFile, Settler, signature_of
from sfwatch.transcribe import Transcriber
from sfwatch.watch import PathNotes, Watcher, scan, walk_dir, wants, wants_dir

#: how long a warm stop waits for uploads in flight
DEFAULT_GRACE_SECONDS = 60.0
#: the longest the loop sleeps: it also checks the observers' health
TICK = 0.5

OutcomeKind = Literal["done", "failed", "error", "changed", "finish_error", "vanished"]


@dataclass(frozen=True)
class Outcome:
    """What a worker reports back to the work loop about one job."""

    kind: OutcomeKind
    job: Job
    error: Exception | None = None
    placed: Placed | None = None
    bytes_sent: int = 0


def instance_name(state_dir: Path) -> str:
    """A name unique per (host, state_dir) without configuration: ``host-1a2b3c4d``."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40] or "host"
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:8]
    return f"{host}-{digest}"


def error_fields(exc: BaseException) -> dict[str, Any]:
    """The fields of an error that go into logs and ``.error.json``."""
    if isinstance(exc, TranscribeError):
        return {
            "reason": exc.reason,
            "message": exc.message,
            "http_status": exc.http_status,
            "trace_id": exc.trace_id,
            "api_message": exc.api_message,
        }
    if isinstance(exc, PrepareError):
        return {"reason": exc.reason, "message": exc.message}
    return {"reason": type(exc).__name__, "message": str(exc)}


class Daemon:
    """``sfwatch run``: the long-running work loop."""

    def __init__(
        self,
        config: Config,
        api_key: Secret,
        *,
        burst: bool = False,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
    ) -> None:
        self.config = config
        self.burst = burst
        self.grace_seconds = grace_seconds
        self.instance = instance_name(config.state_dir)
        self.log = get_logger()
        self.notes = PathNotes()
        self.settler = Settler()
        self.pacer = Pacer(config.api.concurrency, config.api.requests_per_minute)
        self.transcriber = Transcriber(
            config.api.base_url,
            api_key,
            timeout_seconds=config.api.timeout_seconds,
            concurrency=config.api.concurrency,
        )
        self.watches = {w.path: w for w in config.watch}
        self.watchers: dict[Path, Watcher] = {}
        self.ready: deque[SettledFile] = deque()
        self.queued: set[Path] = set()
        self.waiting: list[tuple[float, int, Job]] = []
        self._seq = 0
        self.in_flight: dict[Future[Outcome], Job] = {}
        self.pool = ThreadPoolExecutor(config.api.concurrency, thread_name_prefix="sfwatch-upload")
        self.prober = ThreadPoolExecutor(1, thread_name_prefix="sfwatch-probe")
        self.probe: Future[dict[str, Any]] | None = None
        self.counts: Counter[str] = Counter()
        self.scan_done = threading.Event()
        self.stop_scanner = threading.Event()
        self.stop_level = 0  # 0 running, 1 warm stop, 2 cold stop
        self.abandoned = False  # uploads were still running when run() returned
        self.skipped: set[Path] = set()

    # -- the loop ------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped (or, in burst mode, until there is nothing left to do)."""
        self._install_signals()
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        for watch in self.watches.values():
            self._start_watcher(watch)
            self._recover(watch)
        scanner = threading.Thread(target=self._scan_loop, name="sfwatch-scan", daemon=True)
        scanner.start()
        self.log.info(
            "sfwatch.daemon_started",
            version=__version__,
            instance=self.instance,
            watches=[str(w) for w in self.watches],
            pid=os.getpid(),
        )
        stop_deadline: float | None = None
        while True:
            self._tick()
            if self.stop_level == 1 and stop_deadline is None:
                stop_deadline = time.monotonic() + self.grace_seconds
                self.log.info(
                    "sfwatch.daemon_stopping",
                    mode="warm",
                    in_flight=len(self.in_flight),
                    grace_seconds=self.grace_seconds,
                )
            if self.stop_level >= 1 and not self.in_flight:
                break
            if self.stop_level >= 2 or (stop_deadline and time.monotonic() > stop_deadline):
                self.log.warning(
                    "sfwatch.daemon_stopping", mode="cold", in_flight=len(self.in_flight)
                )
                self.abandoned = True
                break
            if self.burst and self._idle():
                break
            self.notes.wakeup.wait(self._sleep_time())
            self.notes.wakeup.clear()
        self._shutdown()
        self.log.info("sfwatch.daemon_stopped", **dict(self.counts))
        return 0

    def _tick(self) -> None:
        self._take_notes()
        for settled in self.settler.due(lambda root: self.watches[root].settle_seconds):
            if settled.path not in self.queued:
                self.queued.add(settled.path)
                self.ready.append(settled)
        self._reap()
        self._probe_account()
        if self.stop_level == 0:
            self._dispatch()
        self._check_watchers()

    def _idle(self) -> bool:
        return (
            self.scan_done.is_set()
            and not self.in_flight
            and not self.ready
            and not self.waiting
            and len(self.settler) == 0
            and self.probe is None
        )

    def _sleep_time(self) -> float:
        now = time.monotonic()
        wakes = [now + TICK]
        if (due := self.settler.next_due()) is not None:
            wakes.append(due)
        if self.waiting:
            wakes.append(self.waiting[0][0])
        if (pace := self.pacer.wake_at()) is not None:
            wakes.append(pace)
        return max(0.0, min(wakes) - now)

    # -- watch and settle ----------------------------------------------------------

    def _start_watcher(self, watch: WatchConfig) -> None:
        watcher = Watcher(watch, self.notes)
        watcher.start()
        self.watchers[watch.path] = watcher
        self.log.info(
            "sfwatch.watch_started",
            path=str(watch.path),
            polling=watcher.polling,
            recursive=watch.recursive,
        )

    def _check_watchers(self) -> None:
        for path, watcher in list(self.watchers.items()):
            if not watcher.alive() and self.stop_level == 0:
                self.log.error("sfwatch.watch_died", path=str(path))
                watcher.stop()
                try:
                    self._start_watcher(self.watches[path])
                except OSError as exc:
                    self.log.error("sfwatch.watch_restart_failed", path=str(path), error=str(exc))
                self.notes.rescan_requested.set()

    def _scan_loop(self) -> None:
        self._scan_all()
        self.scan_done.set()
        self.notes.wakeup.set()
        interval = min(w.rescan_seconds for w in self.watches.values())
        while not self.stop_scanner.is_set():
            self.notes.rescan_requested.wait(interval)
            if self.stop_scanner.is_set():
                return
            self.notes.rescan_requested.clear()
            self._scan_all()

    def _scan_all(self) -> None:
        for watch in self.watches.values():
            started = time.monotonic()
            found = scan(watch, self.notes.note, self.stop_scanner)
            self.log.debug(
                "sfwatch.scan_finished",
                path=str(watch.path),
                files=found,
                seconds=round(time.monotonic() - started, 3),
            )

    def _watch_for(self, path: Path) -> WatchConfig | None:
        for root, watch in self.watches.items():
            if root in path.parents:
                return watch
        return None

    def _take_notes(self) -> None:
        for raw in self.notes.drain():
            path = Path(raw)
            watch = self._watch_for(path)
            if watch is None or path in self.queued:
                continue
            if path.is_dir() and not path.is_symlink():
                if wants_dir(path, watch):  # a folder moved in: its files have no events
                    for inner in walk_dir(path, watch):
                        self.notes.note(inner)
                continue
            if not wants(path, watch):
                continue
            if not self.settler.note(path, watch.path, watch.settle_seconds):
                self._skip(path, watch)

    def _skip(self, path: Path, watch: WatchConfig) -> None:
        """Log once why a wanted name is not taken (a symlink, a FIFO, …)."""
        if path in self.skipped or not os.path.lexists(path):
            return
        self.skipped.add(path)
        kind = "symlink" if path.is_symlink() else "not_a_regular_file"
        self.log.warning("sfwatch.file_skipped", file=str(path), reason=kind, watch=str(watch.path))

    # -- claim and dispatch --------------------------------------------------------

    def _dispatch(self) -> None:
        while self.pacer.allowed(len(self.in_flight)):
            job = self._next_job()
            if job is None:
                return
            if job.text is None:
                self.pacer.started()
            future = self.pool.submit(self._process, job)
            self.in_flight[future] = job
            future.add_done_callback(lambda _f: self.notes.wakeup.set())

    def _next_job(self) -> Job | None:
        now = time.monotonic()
        while self.waiting and self.waiting[0][0] <= now:
            job = heapq.heappop(self.waiting)[2]
            sig = signature_of(job.path)
            if sig is None:
                self.log.error(
                    "sfwatch.job_vanished",
                    job_id=job.job_id,
                    file=str(job.source),
                    work_path=str(job.path),
                )
                self.counts["vanished"] += 1
                continue
            if sig != job.signature:  # still being written through an old handle
                self._wait(
                    job.evolve(signature=sig, sha256=None, text=None),
                    self.watches[job.root].settle_seconds,
                )
                continue
            return job
        while self.ready:
            settled = self.ready.popleft()
            self.queued.discard(settled.path)
            watch = self.watches[settled.root]
            try:
                claimed = claim(settled, watch.work_dir, self.instance)
            except OSError as exc:
                self.log.error("sfwatch.claim_failed", file=str(settled.path), error=str(exc))
                continue
            if claimed is None:
                if os.path.lexists(settled.path):
                    self.notes.note(str(settled.path))  # changed since it settled
                continue
            job = claimed.evolve(claimed_at=now, window_start=now)
            self.log.info(
                "sfwatch.file_claimed",
                job_id=job.job_id,
                file=str(job.source),
                bytes=job.signature.size,
            )
            return job
        return None

    def _wait(self, job: Job, delay: float) -> None:
        self._seq += 1
        heapq.heappush(self.waiting, (time.monotonic() + delay, self._seq, job))

    def _recover(self, watch: WatchConfig) -> None:
        for job in claimed_files(watch.work_dir, self.instance, watch.path):
            now = time.monotonic()
            self.log.info("sfwatch.job_resumed", job_id=job.job_id, file=str(job.source))
            self._wait(job.evolve(claimed_at=now, window_start=now), 0.0)

    # -- the worker ----------------------------------------------------------------

    def _process(self, job: Job) -> Outcome:
        """prepare → transcribe → finish for one attempt (runs on an upload thread)."""
        watch = self.watches[job.root]
        try:
            if job.sha256 is None:
                job = identify(job)
            prepared = prepare(job)
        except PrepareError as exc:
            return self._fail_now(job, exc, watch)
        except FileNotFoundError as exc:
            return Outcome("vanished", job, exc)
        bytes_sent = 0
        if job.text is None:
            attempt = job.attempts + 1
            log = self.log.bind(job_id=job.job_id, file=str(job.source), attempt=attempt)
            log.info("sfwatch.upload_started", bytes=job.signature.size)
            texts: list[str] = []
            try:
                for part in prepared.parts:
                    result = self.transcriber.transcribe(
                        part.path, part.upload_name, watch.model or self.config.api.model
                    )
                    job = job.evolve(trace_ids=(*job.trace_ids, result.trace_id or ""))
                    texts.append(result.text)
                    bytes_sent += result.bytes_sent
            except TranscribeError as exc:
                if exc.trace_id:
                    job = job.evolve(trace_ids=(*job.trace_ids, exc.trace_id))
                return Outcome("error", job.evolve(attempts=job.attempts), exc)
            job = job.evolve(attempts=attempt, text="\n".join(t.strip() for t in texts))
            if signature_of(job.path) != job.signature:
                return Outcome("changed", job.evolve(text=None))
        try:
            placed = finish_done(job, job.text or "", watch)
        except OSError as exc:
            return Outcome("finish_error", job, exc)
        release(job, watch.work_dir, self.instance)
        return Outcome("done", job, placed=placed, bytes_sent=bytes_sent)

    def _fail_now(self, job: Job, exc: Exception, watch: WatchConfig) -> Outcome:
        try:
            placed = finish_failed(job, error_fields(exc), watch)
        except OSError as move_exc:
            return Outcome("finish_error", job, move_exc)
        release(job, watch.work_dir, self.instance)
        return Outcome("failed", job, exc, placed=placed)

    # -- outcomes ------------------------------------------------------------------

    def _reap(self) -> None:
        for future in [f for f in self.in_flight if f.done()]:
            job = self.in_flight.pop(future)
            try:
                outcome = future.result()
            except Exception as exc:  # a bug: keep the file claimed, try again later
                self.log.exception(
                    "sfwatch.worker_crashed", job_id=job.job_id, file=str(job.source)
                )
                self._wait(
                    job.evolve(failures=job.failures + 1, last_reason="crash"),
                    full_jitter(job.failures + 1, cap=300),
                )
                del exc
                continue
            self._handle(outcome)

    def _handle(self, outcome: Outcome) -> None:
        job = outcome.job
        if outcome.kind in ("done", "failed"):
            if outcome.kind == "done":
                self.pacer.succeeded()
            self._finished(outcome)
        elif outcome.kind == "changed":
            self.log.warning(
                "sfwatch.file_changed",
                job_id=job.job_id,
                file=str(job.source),
                note="written to during upload; uploading again once it settles",
            )
            self._wait(job, self.watches[job.root].settle_seconds)
        elif outcome.kind == "vanished":
            self.log.error("sfwatch.job_vanished", job_id=job.job_id, file=str(job.source))
            self.counts["vanished"] += 1
        elif outcome.kind == "finish_error":
            delay = full_jitter(job.failures + 1, cap=300)
            self.log.error(
                "sfwatch.finish_failed",
                job_id=job.job_id,
                file=str(job.source),
                error=str(outcome.error),
                retry_in=round(delay, 1),
            )
            self._wait(job.evolve(failures=job.failures + 1), delay)
        elif isinstance(outcome.error, TranscribeError):
            self._upload_failed(job, outcome.error)

    def _upload_failed(self, job: Job, exc: TranscribeError) -> None:
        now = time.monotonic()
        fields = {
            "job_id": job.job_id,
            "file": str(job.source),
            "attempt": job.attempts + 1,
            "http_status": exc.http_status,
            "trace_id": exc.trace_id,
            "reason": exc.reason,
            "error": exc.message,
        }
        watch = self.watches[job.root]
        if isinstance(exc, FileRejected) or (
            isinstance(exc, UnusableResponse) and job.last_reason == exc.reason
        ):
            self.pacer.succeeded()  # the service is up: it judged the file
            self._fail(job.evolve(attempts=job.attempts + 1), exc, watch)
            return
        if isinstance(exc, AccountError):
            first = self.pacer.account_fault is None
            wait = self.pacer.account_failed(exc.reason)
            if first:
                self.log.error("sfwatch.uploads_paused", **fields, probe_in=round(wait, 1))
            self._wait(job, 0.0)
            return
        assert isinstance(exc, TransientError)  # noqa: S101 - the hierarchy is closed
        if isinstance(exc, RateLimited):
            hold = self.pacer.rate_limited(exc.retry_after)
            self.log.warning(
                "sfwatch.rate_limited",
                **fields,
                limit=self.pacer.limit,
                hold_seconds=round(hold, 1),
            )
            self._wait(job, hold)
            return
        # Charge the file only if the service worked for another upload meanwhile.
        charged = exc.reason != "overloaded" and self.pacer.last_success > job.window_start
        self.pacer.failed(exc.reason, exc.retry_after)
        job = job.evolve(
            failures=job.failures + 1,
            last_reason=exc.reason,
            window_start=now,
            attempts=job.attempts + int(charged),
        )
        if job.attempts >= self.config.api.max_attempts:
            self._fail(job, exc, watch, reason="gave_up")
            return
        delay = max(exc.retry_after or 0.0, full_jitter(job.failures, cap=60.0))
        self.log.warning(
            "sfwatch.upload_failed", **fields, charged=charged, retry_in=round(delay, 2)
        )
        self._wait(job, delay)

    def _fail(
        self, job: Job, exc: TranscribeError, watch: WatchConfig, reason: str | None = None
    ) -> None:
        fields = error_fields(exc)
        if reason:
            fields = {**fields, "reason": reason, "last_reason": exc.reason}
        try:
            placed = finish_failed(job, fields, watch)
        except OSError as move_exc:
            self.log.error(
                "sfwatch.finish_failed",
                job_id=job.job_id,
                file=str(job.source),
                error=str(move_exc),
            )
            self._wait(
                job.evolve(failures=job.failures + 1), full_jitter(job.failures + 1, cap=300)
            )
            return
        release(job, watch.work_dir, self.instance)
        self._finished(Outcome("failed", job, exc, placed=placed))

    def _finished(self, outcome: Outcome) -> None:
        job = outcome.job
        self.counts[outcome.kind] += 1
        fields: dict[str, Any] = {
            "job_id": job.job_id,
            "file": str(job.source),
            "outcome": outcome.kind,
            "attempts": job.attempts,
            "bytes": job.signature.size,
            "bytes_sent": outcome.bytes_sent,
            "audio_seconds": None,
            "duration_ms": round((time.monotonic() - job.claimed_at) * 1000),
            "trace_id": next((t for t in reversed(job.trace_ids) if t), None),
        }
        if outcome.placed is not None:
            fields["moved_to"] = str(outcome.placed.original)
            if outcome.placed.transcript is not None:
                fields["transcript"] = str(outcome.placed.transcript)
        if outcome.error is not None:
            fields.update(
                {
                    k: v
                    for k, v in error_fields(outcome.error).items()
                    if k not in fields or fields[k] is None
                }
            )
        level = "info" if outcome.kind == "done" else "warning"
        getattr(self.log, level)("sfwatch.job_finished", **fields)

    # -- account probe -------------------------------------------------------------

    def _probe_account(self) -> None:
        if self.probe is not None and self.probe.done():
            try:
                self.probe.result()
            except (AccountError, TransientError) as exc:
                wait = self.pacer.account_failed(self.pacer.account_fault or exc.reason)
                self.log.info(
                    "sfwatch.account_probe_failed",
                    reason=exc.reason,
                    http_status=exc.http_status,
                    retry_in=round(wait, 1),
                )
            else:
                self.pacer.account_ok()
                self.log.info("sfwatch.uploads_resumed")
            self.probe = None
        if (
            self.pacer.account_fault is not None
            and self.probe is None
            and time.monotonic() >= self.pacer.probe_at
            and self.stop_level == 0
        ):
            self.probe = self.prober.submit(self.transcriber.check_account)
            self.probe.add_done_callback(lambda _f: self.notes.wakeup.set())

    # -- signals and shutdown ------------------------------------------------------

    def request_stop(self) -> None:
        """First call: warm stop. Second call: cold stop."""
        self.stop_level = min(2, self.stop_level + 1)
        self.notes.wakeup.set()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.log.info("sfwatch.signal_received", signal=signal.Signals(signum).name)
        self.request_stop()

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        self.log.info("sfwatch.rescan_requested", why="SIGHUP")
        self.notes.rescan_requested.set()

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _shutdown(self) -> None:
        self.stop_scanner.set()
        self.notes.rescan_requested.set()
        for watcher in self.watchers.values():
            watcher.stop()
        self.pool.shutdown(wait=not self.abandoned, cancel_futures=True)
        self.prober.shutdown(wait=False, cancel_futures=True)
        if not self.abandoned:
            self.transcriber.close()
