"""The scheduler: which claimed job runs next, and acting on what an outcome means.

It lives on the main thread and owns every job after a worker reports back:
finished, retry after a backoff, wait for the whole account, or fail. What an
outcome means is decided by ``lifecycle.decide`` (pure, table-tested); the
scheduler only applies the decision: it tells the pacer, writes the ledger, logs,
and queues the job. Together they implement promise P3 (docs/design.md §1):

- a file's own fault (400/413/415/422, a second unusable 200) fails it at once;
- a rate limit (429) or an overloaded model (50505) never costs an attempt;
- any other transient failure costs an attempt only if another upload succeeded
  since this file's previous try — during an outage, files wait for free;
- an account fault (401/402/403/404) pauses every upload until a probe passes;
- after ``api.max_attempts`` charged failures the file goes to failed/ as ``gave_up``.

Jobs waiting for a retry sit in a heap ordered by due time and hold no upload slot.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, assert_never

from sfwatch.claim import adopted_by, release
from sfwatch.config import Config, WatchConfig
from sfwatch.errors import FieldRejected, TranscribeError
from sfwatch.events import Events
from sfwatch.job import Job, Verdict
from sfwatch.ledger import TERMINAL, JobStatus, Ledger, boot_id
from sfwatch.lifecycle import (
    CRASH_LIMIT,
    Context,
    Fail,
    Finished,
    Lost,
    OutcomeKind,
    PacerSignal,
    Park,
    Recheck,
    Retry,
    Signal,
    decide,
    state_of,
    with_state,
)
from sfwatch.logs import get_logger
from sfwatch.pacing import Pacer
from sfwatch.worker import HOST_ERRORS, Outcome, Worker, error_fields

#: restarts that found a job mid-attempt before it is failed as "poison"
POISON_AFTER = 3
#: a step the host failed (the ledger's disk full) is tried again after this long
DEFER_SECONDS = 5.0


def needs_upload(job: Job) -> bool:
    """Does the job's next try upload (and so wait for the pacer)?"""
    return job.text is None and job.verdict is None and job.plan is None


def watch_dirs(watch: WatchConfig) -> dict[str, Any]:
    """A watch's folders, as the ledger records them at claim (recovery's roots); also
    its own hooks, so a claim finished after its folder left the config runs them."""
    return {
        "path": str(watch.path),
        "done_dir": str(watch.done_dir),
        "failed_dir": str(watch.failed_dir),
        "transcript_dir": str(watch.transcript_dir) if watch.transcript_dir else None,
        "model": watch.model,
        "on_done": list(watch.on_done) if watch.on_done is not None else None,
        "on_failed": list(watch.on_failed) if watch.on_failed is not None else None,
        "outputs": list(watch.outputs),
        "transcript_name": watch.transcript_name,
    }


class Scheduler:
    """The waiting jobs and the decisions about them."""

    def __init__(
        self,
        config: Config,
        pacer: Pacer,
        ledger: Ledger,
        worker: Worker,
        clock: Callable[[], float] = time.monotonic,
        *,
        events: Events | None = None,
        announce: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        #: where ``job_finished`` (and a lost job) is told, besides the log
        self.events = events or Events()
        #: account events (``paused``) for the outbox (docs/design.md §13)
        self.announce = announce
        self.clock = clock
        self.pacer = pacer
        self.ledger = ledger
        self.worker = worker
        #: the folders' settings: the worker's registry, so both see a reload alike
        self.folders = worker.folders
        self.log = get_logger()
        #: jobs that need an upload wait for the pacer; local ones (a move to failed/,
        #: finishing a paid transcript) never do, so they have a heap of their own
        self.uploads: list[tuple[float, int, Job]] = []
        self.local: list[tuple[float, int, Job]] = []
        self._seq = 0
        self.counts: Counter[str] = Counter()
        #: steps the host failed, to try again: (due, step, job, action)
        self.deferred: list[tuple[float, str, Job, Callable[[], None]]] = []
        #: the local-step errors already logged per job: a step that fails the same way
        #: at every retry (a file squatting done/, a full disk) is an error once, then debug
        self.finish_problems: dict[str, set[str]] = {}

    @property
    def waiting(self) -> list[tuple[float, int, Job]]:
        """Every waiting job (due time, sequence, job)."""
        return [*self.uploads, *self.local]

    def __len__(self) -> int:
        return len(self.uploads) + len(self.local) + len(self.deferred)

    def wait(self, job: Job, delay: float) -> None:
        """Run ``job`` again after ``delay`` seconds."""
        self._seq += 1
        heap = self.uploads if needs_upload(job) else self.local
        heapq.heappush(heap, (self.clock() + delay, self._seq, job))

    def next_due(self, uploads_allowed: bool = True) -> float | None:
        """Monotonic time the earliest waiting job that could start falls due."""
        heaps = [self.local, self.uploads] if uploads_allowed else [self.local]
        dues = [heap[0][0] for heap in heaps if heap]
        return min(dues) if dues else None

    def pop_due(self, uploads_allowed: bool = True) -> Job | None:
        """The next job whose wait is over, if any (local work first)."""
        now = self.clock()
        for heap in [self.local, self.uploads] if uploads_allowed else [self.local]:
            if heap and heap[0][0] <= now:
                return heapq.heappop(heap)[2]
        return None

    def resume(self, job: Job, instance: str) -> None:
        """Take back a claim found in the work area (after a restart, or adopted).

        What the ledger knows (or, for an adopted job, its sidecar) comes with it:
        the paid text, the plan. A job that was being *prepared* at each of
        ``POISON_AFTER`` restarts on this boot is what crashed (or hung) the daemon:
        it is failed as ``poison``. Restarts during uploads or finishes, or after
        the host itself went down, are nobody's fault and count nothing.
        """
        now = self.clock()
        job = job.evolve(claimed_at=now, window_start=now)
        row = self.ledger.job(job.job_id)
        if row is not None and row.status in TERMINAL:
            # Its files are in place; only its folder in the work area was left behind.
            self.guarded("release", job, lambda: release(job))
            return
        if row is None:
            row = self.ledger.claimed(job, instance, watch_dirs(self.folders.for_root(job.root)))
            if job.text is not None:  # an adopted job whose text a sibling paid for
                self.ledger.transcribed(job, self.worker.model_for(job), None)
        elif row.instance != instance:  # adopted, in a ledger we share: the row is ours now
            self.ledger.take_over(job.job_id, instance)
        if row.running:
            if row.stage == "prepare" and row.boot_id == boot_id():
                crashes = self.ledger.crashed(job.job_id)
            else:
                crashes = row.crashes
                self.ledger.set_stage(job.job_id, None)
            if crashes >= POISON_AFTER and row.plan is None:
                self.log.error(
                    "sfwatch.job_poisoned", job_id=job.job_id, file=str(job.source), crashes=crashes
                )
                job = job.evolve(attempts=row.attempts, trace_ids=row.trace_ids, sha256=row.sha256)
                self.fail(
                    job,
                    RuntimeError(f"the daemon stopped {crashes} times while preparing this file"),
                    reason="poison",
                )
                return
        job = job.evolve(
            attempts=max(row.attempts, job.attempts),
            trace_ids=row.trace_ids or job.trace_ids,
            text=row.text if row.text is not None else job.text,
            timing=row.timing if row.text is not None else job.timing,
            sha256=row.sha256 if row.text is not None else job.sha256,
            plan=row.plan or job.plan,
        )
        self.log.info(
            "sfwatch.job_resumed",
            job_id=job.job_id,
            file=str(job.source),
            attempts=job.attempts,
            transcript_known=job.text is not None,
            finishing=job.plan.kind if job.plan else None,
        )
        self.wait(job, 0.0)

    # -- outcomes ------------------------------------------------------------------

    # -- host errors on the main thread --------------------------------------------------

    def guarded(self, step: str, job: Job, action: Callable[[], None]) -> bool:
        """Run ``action``; if the host fails it (a full state disk), try it again later.

        A step about a job that raises must not drop the job until the next
        restart (its file would sit claimed with nobody working on it).
        """
        try:
            action()
        except HOST_ERRORS as exc:
            self.log.error(
                "sfwatch.step_deferred",
                job_id=job.job_id,
                file=str(job.source),
                step=step,
                error=str(exc),
                retry_in=DEFER_SECONDS,
            )
            self.deferred.append((self.clock() + DEFER_SECONDS, step, job, action))
            return False
        return True

    def run_deferred(self) -> None:
        """Try again the steps that the host failed (see ``guarded``)."""
        now = self.clock()
        due = [d for d in self.deferred if d[0] <= now]
        self.deferred = [d for d in self.deferred if d[0] > now]
        for _, step, job, action in due:
            self.guarded(step, job, action)

    def handle(self, outcome: Outcome) -> None:
        """Decide what an attempt's outcome means for its job; a host error defers it."""
        self.guarded("handle", outcome.job, lambda: self._handle(outcome))

    def _handle(self, outcome: Outcome) -> None:
        """Decide what an attempt's outcome means for its job (``lifecycle.decide``), then act."""
        job = outcome.job
        kind = OutcomeKind(outcome.kind)
        decision = decide(kind, outcome.error, state_of(job), self._context(job, outcome))
        paused = self.pacer.account_fault is not None
        hold = self._tell_pacer(decision.signal)
        match decision:
            case Finished():
                self.finished(outcome, job.verdict.reason if job.verdict else None)
            case Lost():
                self.vanished(job)
            case Recheck(delay):
                # Our lease went stale (a freeze): look again once it has been renewed.
                self.log.warning(
                    "sfwatch.job_fenced",
                    job_id=job.job_id,
                    file=str(job.source),
                    why=str(outcome.error),
                )
                self.wait(job, delay)
            case Park(state):
                self._park(with_state(job, state), decision, _upload_error(outcome), paused, hold)
            case Retry(delay, state) if kind is OutcomeKind.ERROR:
                exc = _upload_error(outcome)
                fields = _upload_fields(job, exc)
                if decision.signal.kind is Signal.RATE_LIMITED:
                    delay = max(delay, hold)
                    self.log.warning(
                        "sfwatch.rate_limited",
                        **fields,
                        limit=self.pacer.limit,
                        hold_seconds=round(delay, 1),
                    )
                else:
                    charged = state.attempts > job.attempts
                    self.log.warning(
                        "sfwatch.upload_failed", **fields, charged=charged, retry_in=round(delay, 2)
                    )
                self._record_wait(with_state(job, state), exc, delay)
            case Retry(delay, state) if kind is OutcomeKind.CHANGED:
                self.log.warning(
                    "sfwatch.file_changed",
                    job_id=job.job_id,
                    file=str(job.source),
                    note="written to during upload; uploading again once it settles",
                )
                self.wait(with_state(job, state), delay)
            case Retry(delay, state) if kind is OutcomeKind.DEFERRED:
                # Prepared, not sent (a stop, a pause): its turn comes again as it was.
                self.log.debug("sfwatch.upload_deferred", job_id=job.job_id, file=str(job.source))
                self.wait(with_state(job, state), delay)
            case Retry(delay, state):  # finish_error, crash: a step on our side failed
                problem = str(outcome.error)
                seen = self.finish_problems.setdefault(job.job_id, set())
                log = self.log.debug if problem in seen else self.log.error
                seen.add(problem)
                log(
                    "sfwatch.finish_failed",
                    job_id=job.job_id,
                    file=str(job.source),
                    error=problem,
                    retry_in=round(delay, 1),
                    failures=state.failures,
                )
                self.wait(with_state(job, state), delay)
            case Fail(reason, state):
                error = outcome.error
                if reason == "internal_error" or error is None:
                    # The same file keeps hitting a bug of ours: set it aside, say so.
                    error = RuntimeError(f"sfwatch failed on this file: {outcome.error}")
                self.fail(with_state(job, state), error, reason)
            case _:  # pragma: no cover - the union is closed
                assert_never(decision)

    def vanished(self, job: Job) -> None:
        """The claimed file is gone: a sibling adopted the job, or a person removed it."""
        self.finish_problems.pop(job.job_id, None)
        sibling = adopted_by(job)
        if sibling is not None:
            self.log.warning(
                "sfwatch.job_adopted", job_id=job.job_id, file=str(job.source), by=sibling
            )
            self.ledger.lost(
                job.job_id,
                f"adopted by {sibling}",
                JobStatus.ADOPTED,
                instance=self.worker.instance,
            )
            self.counts["adopted"] += 1
            self.events.emit("sfwatch.job_adopted", {"job_id": job.job_id, "by": sibling})
            return
        self.log.error(
            "sfwatch.job_vanished", job_id=job.job_id, file=str(job.source), work_path=str(job.path)
        )
        self.ledger.lost(job.job_id, "the claimed file disappeared from the work area")
        self.counts["vanished"] += 1
        self.events.emit("sfwatch.job_vanished", {"job_id": job.job_id})

    def _context(self, job: Job, outcome: Outcome) -> Context:
        return Context(
            now=self.clock(),
            last_success=self.pacer.last_success,
            max_attempts=self.config.api.max_attempts,
            backoff_base=self.pacer.base,
            settle_seconds=self.folders.for_root(job.root).settle_seconds,
            crash_limit=CRASH_LIMIT,
            bytes_sent=outcome.bytes_sent,
            judged=job.verdict is not None,
        )

    def _tell_pacer(self, signal: PacerSignal) -> float:
        """Apply a decision's pacer signal; return the wait the pacer chose, if any."""
        match signal.kind:
            case Signal.SUCCEEDED:
                self.pacer.succeeded()
            case Signal.RATE_LIMITED:
                return self.pacer.rate_limited(signal.retry_after)
            case Signal.FAILED:
                self.pacer.failed(signal.reason or "transient", signal.retry_after)
            case Signal.ACCOUNT:
                return self.pacer.account_failed(signal.reason or "account")
            case Signal.NONE | Signal.FIELD_REJECTED:  # (the latter: _hold_for_config)
                pass
        return 0.0

    def _park(
        self, job: Job, decision: Park, exc: TranscribeError, paused: bool, hold: float
    ) -> None:
        """Wait for the pause to lift: the account's (a probe), or a config hold (a reload)."""
        if decision.signal.kind is Signal.FIELD_REJECTED:
            self._hold_for_config(job, exc)
            return
        if not paused:
            fields = {**_upload_fields(job, exc), "probe_in": round(hold, 1)}
            self.log.error("sfwatch.uploads_paused", **fields)
            if self.announce is not None:
                self.announce("paused", fields)
        self._record_wait(job, exc, 0.0)

    def _hold_for_config(self, job: Job, exc: TranscribeError) -> None:
        """Hold every upload until a reload: the server refused a field the config sends.

        One error line names the key to change and the server's message; the file is
        not charged and not failed (every file would get the same answer). The hold
        ends at the next reload (SIGHUP), which ``Folders.generation`` counts, or a
        restart; no probe can tell that a config was fixed.
        """
        key = exc.key if isinstance(exc, FieldRejected) else "request"
        generation = self.folders.generation

        def lifted() -> bool:
            if self.folders.generation == generation:
                return False
            self.log.info("sfwatch.uploads_resumed", why="reload", key=key)
            return True

        self._record_wait(job, exc, 0.0)  # parked: the pacer lets it go after the reload
        server_said = exc.api_message or exc.message
        why = f"{key}: refused by the server ({server_said}); change it, then reload (SIGHUP)"
        if self.pacer.hold_for_config(why, key, lifted):
            self.log.error(
                "sfwatch.field_rejected",
                **_upload_fields(job, exc),
                key=key,
                field=exc.field if isinstance(exc, FieldRejected) else None,
                api_message=exc.api_message,
                held="every upload, until a reload (SIGHUP) or a restart",
            )

    def _record_wait(self, job: Job, exc: TranscribeError, delay: float) -> None:
        self.ledger.attempt_failed(job, error_fields(exc), time.time() + delay)
        self.wait(job, delay)

    def fail(self, job: Job, exc: Exception, reason: str | None = None) -> None:
        """Send the job's file to failed/.

        An upload thread makes the move (across file systems it is a copy, too slow
        for this loop); the verdict travels with the job, so a move that fails is
        tried again without uploading the file again.
        """
        self.wait(job.evolve(verdict=Verdict(exc, reason)), 0.0)

    def finished(self, outcome: Outcome, reason: str | None = None) -> None:
        """Count the job and write its one canonical log line."""
        job = outcome.job
        if outcome.unreleased:
            self.guarded("release", job, lambda: release(job))
        self.finish_problems.pop(job.job_id, None)
        self.counts[outcome.kind] += 1
        level = "warning" if outcome.kind == "failed" else "info"
        # The worker's fields when it made them: the same its outbox events carry.
        fields = outcome.fields if outcome.fields is not None else self._fields(outcome, reason)
        getattr(self.log, level)("sfwatch.job_finished", **fields)
        self.events.emit("sfwatch.job_finished", fields)

    def _fields(self, outcome: Outcome, reason: str | None) -> dict[str, Any]:
        """``job_finished`` fields for an outcome the worker did not describe."""
        job = outcome.job
        fields: dict[str, Any] = {
            "job_id": job.job_id,
            "file": str(job.source),
            "outcome": outcome.kind,
            "attempts": job.attempts,
            "bytes": job.signature.size,
            "bytes_sent": outcome.bytes_sent,
            "audio_seconds": outcome.audio_seconds,
            "duration_ms": round((self.clock() - job.claimed_at) * 1000),
            "trace_id": next((t for t in reversed(job.trace_ids) if t), None),
        }
        if outcome.placed is not None:
            fields["moved_to"] = str(outcome.placed.original)
            if outcome.placed.transcript is not None:
                fields["transcript"] = str(outcome.placed.transcript)
        if outcome.error is not None:
            for key, value in error_fields(outcome.error).items():
                if fields.get(key) is None:
                    fields[key] = value
        if reason is not None:
            fields["reason"] = reason
        return fields


def _upload_error(outcome: Outcome) -> TranscribeError:
    if not isinstance(outcome.error, TranscribeError):  # pragma: no cover - decide checked
        raise TypeError(outcome.error)
    return outcome.error


def _upload_fields(job: Job, exc: TranscribeError) -> dict[str, Any]:
    """The fields of an upload-failure log line."""
    return {
        "job_id": job.job_id,
        "file": str(job.source),
        "attempt": job.attempts + 1,
        "http_status": exc.http_status,
        "trace_id": exc.trace_id,
        "reason": exc.reason,
        "error": exc.message,
    }
