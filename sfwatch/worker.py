"""One attempt at one job: prepare → transcribe → finish, on a worker thread.

The worker never decides whether to retry, wait or give up: it reports an
``Outcome`` and the scheduler (on the main thread) decides. What the worker
does own is the ledger ordering for the steps it takes (docs/design.md §5):
the transcript is durable in the ledger before anything is written beside the
audio, every finish is planned (durably) before its first visible step, and
the daemon's ownership of the job is checked (``fence``) before each step.

Errors of the host (an OSError, a ``sqlite3.Error`` from a full state disk) are
not the file's fault and not a crash: the attempt reports ``finish_error``
with everything learnt so far (the paid text, the plan), and the step is tried
again after a backoff, never uploaded again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sfwatch.claim import make_durable, reading, release, write_sidecar
from sfwatch.commits import Written
from sfwatch.config import Config, WatchConfig
from sfwatch.config_request import UploadRequest, safe_language
from sfwatch.errors import Fenced, PrepareError, TranscribeError
from sfwatch.events import Events
from sfwatch.finish import Naming, Placed, finish_done, finish_failed, local_date, plan_done
from sfwatch.folders import Folders
from sfwatch.fsutil import gone, same_content
from sfwatch.job import Job, Plan, Verdict
from sfwatch.ledger import Ledger, OutboxEvent
from sfwatch.lifecycle import OutcomeKind
from sfwatch.logs import get_logger
from sfwatch.prepare import Part, Prepared, clean_scratch, identify, prepare, scratch_folder
from sfwatch.settle import signature_of
from sfwatch.subtitles import Timing, join
from sfwatch.transcribe import Transcriber, Transcript, status_class

#: host errors that make a step wait and try again (never the file's fault)
HOST_ERRORS = (OSError, sqlite3.Error)


@dataclass(frozen=True)
class FreshClaim:
    """A claim made just now on this thread, whose ledger row may still be on its way."""

    row: Written
    #: writes the row again, waiting for it (if the queued write failed)
    rewrite: Callable[[], None]


@dataclass(frozen=True)
class Outcome:
    """What a worker reports back to the work loop about one job."""

    kind: OutcomeKind
    job: Job
    error: Exception | None = None
    placed: Placed | None = None
    bytes_sent: int = 0
    audio_seconds: float | None = None
    #: the job is over but its folder in the work area could not be removed yet
    unreleased: bool = False
    #: a finished job's ``sfwatch.job_finished`` fields (also its events' payload)
    fields: dict[str, Any] | None = None


#: the outbox's events for a finished job: (watch, event, job_finished fields) → rows
EventRoutes = Callable[[WatchConfig, str, dict[str, Any]], Sequence[OutboxEvent]]


def finished_fields(
    job: Job,
    outcome: str,
    placed: Placed | None,
    *,
    model: str | None,
    bytes_sent: int = 0,
    audio_seconds: float | None = None,
    error: dict[str, Any] | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The fields of a finished job's one ``sfwatch.job_finished`` line (design §10).

    Webhooks and hooks get these same fields (design §13), so they are made once,
    where the job finishes, and the log line and the outbox both take them.
    """
    clock = time.monotonic() if now is None else now
    fields: dict[str, Any] = {
        "job_id": job.job_id,
        "file": str(job.source),
        "outcome": outcome,
        "attempts": job.attempts,
        "bytes": job.signature.size,
        "bytes_sent": bytes_sent,
        "audio_seconds": audio_seconds,
        "duration_ms": round((clock - job.claimed_at) * 1000),
        "trace_id": next((t for t in reversed(job.trace_ids) if t), None),
        "model": model,
    }
    if placed is not None:
        fields["moved_to"] = str(placed.original)
        if placed.transcript is not None:
            fields["transcript"] = str(placed.transcript)
        if placed.error_file is not None:
            fields["error_file"] = str(placed.error_file)
        if placed.outputs:
            fields["outputs"] = [str(p) for p in placed.outputs]
    for key, value in (error or {}).items():
        if fields.get(key) is None and value is not None:
            fields[key] = value
    return fields


def _no_events(_watch: WatchConfig, _event: str, _fields: dict[str, Any]) -> list[OutboxEvent]:
    return []


def error_fields(exc: BaseException) -> dict[str, Any]:
    """The fields of an error that go into logs, the ledger and ``.error.json``."""
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
    if isinstance(exc, OSError):
        return {"reason": "os_error", "message": f"{exc.strerror or exc} ({exc.filename})"}
    return {"reason": type(exc).__name__, "message": str(exc)}


def _nothing() -> None:
    return None


def _always() -> bool:
    return True


@dataclass
class Got:
    """What one attempt got so far (filled in by ``Worker._transcript``)."""

    job: Job
    kind: OutcomeKind = OutcomeKind.DONE
    bytes_sent: int = 0
    seconds: float | None = None
    #: the plan was recorded with the paid text (the ledger says stage finish)
    planned: bool = False
    #: frees the upload slot (``Worker.process``'s ``released``)
    release: Callable[[], None] = _nothing
    #: waits for the turn to send; False: not now (``Worker.process``'s ``cleared``)
    clear: Callable[[], bool] = _always


def _no_fence(_job: Job) -> None:
    return None


class Worker:
    """Runs attempts; shared by all worker threads (it holds no per-job state)."""

    def __init__(
        self,
        config: Config,
        transcriber: Transcriber,
        ledger: Ledger,
        instance: str = "local",
        fence: Callable[[Job], None] = _no_fence,
        *,
        folders: Folders | None = None,
        events: Events | None = None,
        routes: EventRoutes = _no_events,
    ) -> None:
        self.config = config
        #: where each HTTP attempt (``upload_finished``) is told, besides the log
        self.events = events or Events()
        self.instance = instance
        self.transcriber = transcriber
        self.ledger = ledger
        #: settings per folder, also of folders that left the config but still have
        #: claims to finish (the daemon's registry, which a reload updates)
        self.folders = folders if folders is not None else Folders(config.watch)
        self.fence = fence
        #: the outbox rows a finished job adds (hooks, webhooks, notifications: §13)
        self.routes = routes
        #: jobs claimed by this process whose claim is not durable yet (``durable_claim``)
        self.undurable: dict[str, FreshClaim] = {}
        self.log = get_logger()

    def durable_claim(self, job: Job) -> None:
        """Make a claim of ours durable, once, before the job's first durable write
        (its text, a part's text, a plan: docs/design.md §5.1): its fsyncs, and its
        ledger row committed (written again, waiting, if the queued write failed)."""
        fresh = self.undurable.get(job.job_id)
        if fresh is None:
            return
        make_durable(job)
        try:
            fresh.row.wait()
        except HOST_ERRORS:
            fresh.rewrite()  # (raises if the ledger still fails: the step waits)
        self.undurable.pop(job.job_id, None)

    def model_for(self, job: Job) -> str:
        """The model a job's folder uses."""
        return self.folders.for_root(job.root).model or self.config.api.model

    def process(
        self,
        job: Job,
        *,
        released: Callable[[], None] = _nothing,
        cleared: Callable[[], bool] = _always,
        fresh: FreshClaim | None = None,
    ) -> Outcome:
        """One attempt. Host errors become ``finish_error``; our bugs propagate.

        ``cleared`` is called once the file is prepared, just before its upload: it
        waits for the upload's turn, and False means not now (``deferred``).
        ``released`` is called once the upload is answered (the slot may start
        another upload). ``fresh``: the job was claimed just now, its row queued at
        stage prepare (``ready.Claimer``): nothing to read back.
        """
        if fresh is not None:
            self.undurable[job.job_id] = fresh
        outcome = self._attempt(job, (cleared, released), fresh=fresh is not None)
        if outcome.kind in ("done", "dedup", "failed", "vanished"):
            clean_scratch(job, self.instance)  # the parts are not needed any more
            self.undurable.pop(job.job_id, None)
        if outcome.kind in ("done", "dedup", "failed"):
            try:
                release(outcome.job)
            except OSError:
                # Not the file's business (it is in place): the scheduler tries again.
                outcome = dataclasses.replace(outcome, unreleased=True)
        elif outcome.kind != "vanished":
            with contextlib.suppress(*HOST_ERRORS):
                self.ledger.set_stage(job.job_id, None)
        return outcome

    def _attempt(
        self, job: Job, turn: tuple[Callable[[], bool], Callable[[], None]], *, fresh: bool
    ) -> Outcome:
        watch = self.folders.for_root(job.root)
        progress = [job]
        try:
            if job.plan is None and not fresh:
                row = self.ledger.job(job.job_id)
                if row is not None and row.plan is not None:
                    # A finish is under way (an earlier try, or before a restart): keep to it.
                    job = job.evolve(
                        plan=row.plan, text=job.text or row.text, timing=job.timing or row.timing
                    )
                elif job.text is not None and (row is None or row.text is None):
                    # Paid, but the ledger could not record it last time: record it now,
                    # before anything is written for the user.
                    self.durable_claim(job)
                    self.ledger.transcribed(job, self.model_for(job), None)
        except HOST_ERRORS as exc:
            return Outcome(OutcomeKind.FINISH_ERROR, job, exc)
        progress = [job]  # the furthest the job got, for an outcome after an error
        try:
            return self._steps(job, watch, progress, turn, fresh=fresh)
        except Fenced as exc:
            return Outcome(OutcomeKind.FENCED, progress[-1], exc)
        except FileNotFoundError as exc:
            latest = progress[-1]
            if self._vanished(latest):
                return Outcome(OutcomeKind.VANISHED, latest, exc)
            return Outcome(OutcomeKind.FINISH_ERROR, latest, exc)
        except HOST_ERRORS as exc:
            return Outcome(OutcomeKind.FINISH_ERROR, progress[-1], exc)

    def _vanished(self, job: Job) -> bool:
        """Gone from the work area, and not where its plan put it. Gone for sure: a
        stale NFS handle or an EIO asking is no vanishing (the step is tried again)."""
        if not gone(job.path):
            return False
        plan = job.plan
        return plan is None or not same_content(
            plan.original, job.signature.size, job.identity, job.sha256
        )

    def _steps(
        self,
        job: Job,
        watch: WatchConfig,
        progress: list[Job],
        turn: tuple[Callable[[], bool], Callable[[], None]],
        *,
        fresh: bool,
    ) -> Outcome:
        if job.verdict is not None or (job.plan is not None and job.plan.kind == "failed"):
            # Judged already: only the move to failed/ is left.
            return self.fail(job, watch, progress)
        cleared, released = turn
        got = Got(job, release=released, clear=cleared)
        if job.text is None:
            try:
                with reading(job) as source:
                    early = self._transcript(source, watch, progress, got, staged=fresh)
            except PrepareError as exc:  # (unreadable: the daemon's user may not read it)
                return self.fail(job.evolve(verdict=Verdict(exc)), watch, progress)
            if early is not None:
                return early
        released()  # the text is known: only local steps are left
        job, kind, bytes_sent, audio_seconds = got.job, got.kind, got.bytes_sent, got.seconds
        placed = self._finish(job, watch, progress, staged=got.planned)
        latest = progress[-1]
        fields = finished_fields(
            latest,
            kind,
            placed,
            model=self.model_for(latest),
            bytes_sent=bytes_sent,
            audio_seconds=audio_seconds,
        )
        self.ledger.finished(
            latest,
            kind,
            final_path=placed.original,
            transcript=placed.transcript,
            audio_seconds=audio_seconds,
            events=self.routes(watch, "done", fields),
        )
        return Outcome(
            kind,
            latest,
            placed=placed,
            bytes_sent=bytes_sent,
            audio_seconds=audio_seconds,
            fields=fields,
        )

    def _transcript(
        self, source: Path, watch: WatchConfig, progress: list[Job], got: Got, *, staged: bool
    ) -> Outcome | None:
        """Get the job's text: known already (dedup) or uploaded; fill ``got``.

        ``source`` is the claimed file's handle as a path (``/proc/self/fd/N``):
        PyAV and the upload read the file the claim checked, whatever happens
        to the names around it meanwhile (safefs.py). ``staged``: the ledger says
        stage prepare already.
        """
        job = got.job
        if not staged:  # (a fresh claim's row says so already)
            self.ledger.set_stage(job.job_id, "prepare")
        reader = job.evolve(path=source)
        try:
            job = job if job.sha256 is not None else job.evolve(sha256=identify(reader).sha256)
        except PrepareError as exc:
            return self.fail(job.evolve(verdict=Verdict(exc)), watch, progress)
        progress.append(job)
        got.job = job
        model = self.model_for(job)
        known = self.ledger.known(job.sha256 or "", model)
        # Paid for already; but one paid without segments cannot make the subtitles
        # a timed output asks for: that content is uploaded again, once.
        if known is not None and (known[1] is not None or not watch.upload.timed):
            got.job, got.kind = job.evolve(text=known[0], timing=known[1]), OutcomeKind.DEDUP
            return None
        try:
            with scratch_folder(job, self.instance) as scratch:
                prepared = prepare(
                    reader.evolve(sha256=job.sha256), self.config, self.instance, scratch
                )
                return self._upload(job, prepared, (model, watch), progress, got)
        except PrepareError as exc:
            return self.fail(job.evolve(verdict=Verdict(exc)), watch, progress)

    def _upload(
        self,
        job: Job,
        prepared: Prepared,
        target: tuple[str, WatchConfig],
        progress: list[Job],
        got: Got,
    ) -> Outcome | None:
        model, watch = target
        request = watch.upload
        got.seconds = prepared.audio_seconds
        # Parts whose transcripts the ledger holds (an earlier, interrupted try).
        split = len(prepared.parts) > 1
        texts = self.ledger.parts(job.job_id) if split else []
        timings: list[Timing | None] = self.ledger.part_timings(job.job_id) if split else []
        timings = (timings + [None] * len(texts))[: len(texts)]  # (rows older than timings)
        # Prepared: it may wait a while for its turn (slots.py). A restart from here on is
        # not the file's doing, so it must not count towards poison (design §6.4).
        self.ledger.set_stage_later(job.job_id, "ready")
        if not got.clear():
            return Outcome(OutcomeKind.DEFERRED, job)
        self.fence(job)  # a sibling that adopted the job pays for it, not us too
        # Queued, not waited for: it commits before any later write of this job.
        self.ledger.set_stage_later(job.job_id, "upload")
        self.log.info(
            "sfwatch.upload_started",
            job_id=job.job_id,
            file=str(job.source),
            attempt=job.attempts + 1,
            parts=len(prepared.parts),
            parts_done=len(texts),
            prepared=prepared.how,
            audio_seconds=got.seconds,
            bytes=job.signature.size,
        )
        trace_id: str | None = None
        try:
            for part in prepared.parts[len(texts) :]:
                result = self._send(job, part, (model, request), len(texts) + 1)
                trace_id = result.trace_id
                job = job.evolve(trace_ids=(*job.trace_ids, result.trace_id or ""))
                texts.append(result.text)
                timings.append(result.timing)
                got.bytes_sent += result.bytes_sent
                if split:
                    self.durable_claim(job)
                    self.ledger.part_done(job.job_id, texts, timings)
        except TranscribeError as exc:
            if exc.trace_id:
                job = job.evolve(trace_ids=(*job.trace_ids, exc.trace_id))
            return Outcome(OutcomeKind.ERROR, job, exc, bytes_sent=got.bytes_sent)
        got.release()  # answered: the next upload may start while we record and finish
        # Each part's times count from its own start: shifted by where it starts in the
        # original, the joined timeline lines up with the recording.
        offsets = [part.offset for part in prepared.parts]
        timing = join(list(zip(offsets, timings, strict=True))) if request.timed else None
        job = job.evolve(
            attempts=job.attempts + 1,
            text="\n".join(t.strip() for t in texts),
            timing=timing,
        )
        progress.append(job)  # paid: from here on, errors keep the text
        got.job = job
        if signature_of(job.path) != job.signature:
            # New content: the parts and their transcripts are of the old one.
            self.ledger.part_done(job.job_id, [])
            clean_scratch(job, self.instance)
            return Outcome(OutcomeKind.CHANGED, job.evolve(text=None, sha256=None))
        # finish's names go with the text, in one durable write (design §5: both must
        # be durable before any file is written, and one fsync is cheaper than two)
        plan = plan_done(job, watch, self._naming(job, watch))
        self.durable_claim(job)
        self.ledger.transcribed(job, model, trace_id, plan=plan)
        job = job.evolve(plan=plan)
        progress.append(job)
        got.job, got.planned = job, True
        with contextlib.suppress(OSError):  # only a sibling's convenience
            write_sidecar(job)
        return None

    def _send(
        self, job: Job, part: Part, how: tuple[str, UploadRequest], number: int
    ) -> Transcript:
        """One HTTP attempt for one part; tell how it went (``sfwatch.upload_finished``)."""
        started = time.monotonic()
        model, request = how
        try:
            result = self.transcriber.transcribe(part.path, part.upload_name, model, request)
        except TranscribeError as exc:
            sent = 0
            if exc.http_status is not None:  # answered: the request went out whole
                with contextlib.suppress(OSError):
                    sent = part.path.stat().st_size
            answer = {"http_status": exc.http_status, "bytes_sent": sent, "reason": exc.reason}
            self._sent(job, number, started, exc.trace_id, answer)
            raise
        answer = {"http_status": result.http_status, "bytes_sent": result.bytes_sent}
        self._sent(job, number, started, result.trace_id, answer)
        return result

    def _sent(
        self, job: Job, part: int, started: float, trace_id: str | None, answer: dict[str, Any]
    ) -> None:
        """Log and tell one attempt (``answer``: http_status, bytes_sent, reason if it failed)."""
        fields: dict[str, Any] = {
            "job_id": job.job_id,
            "file": str(job.source),
            "attempt": job.attempts + 1,
            "part": part,
            "status_class": status_class(answer["http_status"]),
            "seconds": round(time.monotonic() - started, 3),
            "trace_id": trace_id,
            **answer,
        }
        self.log.debug("sfwatch.upload_finished", **fields)
        self.events.emit("sfwatch.upload_finished", fields)

    def _finish(self, job: Job, watch: WatchConfig, progress: list[Job], *, staged: bool) -> Placed:
        if not staged:  # (a plan recorded with the text set the stage too)
            self.ledger.set_stage(job.job_id, "finish")
        return finish_done(
            job,
            job.text or "",
            watch,
            plan=job.plan,
            record=lambda plan: self._record_plan(job, plan, progress),
            guard=lambda: self.fence(job),
            naming=self._naming(job, watch),
        )

    def _naming(self, job: Job, watch: WatchConfig) -> Naming:
        """``transcript_name``'s values: the language asked for or heard, the claim's day."""
        claimed = time.time()
        if "{date}" in watch.transcript_name:  # (a ledger read only when the name needs it)
            row = self.ledger.job(job.job_id)
            claimed = row.created if row is not None and row.created else claimed
        heard = job.timing.language if job.timing is not None else None
        return Naming(
            lang=safe_language(watch.request.language or heard),
            date=local_date(claimed),
            model=self.model_for(job),
        )

    def _record_plan(self, job: Job, plan: Plan, progress: list[Job]) -> None:
        """Durably note where finish is about to put things; tell a would-be adopter too."""
        planned = job.evolve(plan=plan)
        self.durable_claim(job)
        self.ledger.planned(planned, plan)
        progress.append(planned)
        with contextlib.suppress(OSError):  # only a sibling's convenience
            write_sidecar(planned)

    def fail(self, job: Job, watch: WatchConfig, progress: list[Job]) -> Outcome:
        """Move the job's file to failed/ with its error file; record it."""
        verdict = job.verdict
        fields: dict[str, Any] = {}
        if verdict is not None:
            fields = error_fields(verdict.error)
            if verdict.reason is not None:
                fields = {**fields, "reason": verdict.reason, "last_reason": fields.get("reason")}
        if job.sha256 is None and os.path.lexists(job.path):
            with contextlib.suppress(PrepareError, OSError), reading(job) as source:
                # For the error file (and to recognise a copy across file systems later).
                job = job.evolve(sha256=identify(job.evolve(path=source)).sha256)
        progress.append(job)
        self.ledger.set_stage(job.job_id, "finish")
        placed = finish_failed(
            job,
            fields,
            watch,
            plan=job.plan,
            record=lambda plan: self._record_plan(job, plan, progress),
            guard=lambda: self.fence(job),
        )
        latest = progress[-1]
        error = latest.plan.error if latest.plan is not None else fields
        done = finished_fields(latest, "failed", placed, model=self.model_for(latest), error=error)
        self.ledger.finished(
            latest,
            "failed",
            final_path=placed.original,
            error=error,
            events=self.routes(watch, "failed", done),
        )
        exc = verdict.error if verdict is not None else None
        return Outcome(OutcomeKind.FAILED, latest, exc, placed=placed, fields=done)
