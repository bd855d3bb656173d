"""One attempt at one job: prepare → transcribe → finish, on an upload thread.

The worker never decides whether to retry, wait or give up: it reports an
``Outcome`` and the scheduler (on the main thread) decides. What the worker
does own is the ledger ordering for the steps it takes (see ``ledger.py``): the
transcript is durable in the ledger before it is written beside the audio, and
a transcript already paid for (same SHA-256, same model) is reused without an
upload.
"""

from __future__ import annotations

import contextlib
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sfwatch.config import Config, WatchConfig
from sfwatch.errors import PrepareError, TranscribeError
from sfwatch.finish import Placed, finish_done, finish_failed, transcript_bytes
from sfwatch.fsutil import remove_empty_dirs, temp_name
from sfwatch.job import Job
from sfwatch.ledger import Ledger
from sfwatch.logs import get_logger
from sfwatch.prepare import clean_scratch, identify, prepare
from sfwatch.settle import signature_of
from sfwatch.transcribe import Transcriber

#: the values of ``lifecycle.OutcomeKind`` (the worker reports the first seven)
OutcomeKind = Literal[
    "done", "dedup", "failed", "error", "changed", "finish_error", "vanished", "crash", "fenced"
]


@dataclass(frozen=True)
class Outcome:
    """What a worker reports back to the work loop about one job."""

    kind: OutcomeKind
    job: Job
    error: Exception | None = None
    placed: Placed | None = None
    bytes_sent: int = 0
    audio_seconds: float | None = None


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


class Worker:
    """Runs attempts; shared by all upload threads (it holds no per-job state)."""

    def __init__(
        self, config: Config, transcriber: Transcriber, ledger: Ledger, instance: str = "local"
    ) -> None:
        self.config = config
        self.instance = instance
        self.transcriber = transcriber
        self.ledger = ledger
        self.watches = {w.path: w for w in config.watch}
        self.log = get_logger()

    def model_for(self, job: Job) -> str:
        """The model a job's folder uses."""
        return self.watches[job.root].model or self.config.api.model

    def process(self, job: Job) -> Outcome:
        """One attempt; marks the job running in the ledger while it lasts."""
        self.ledger.set_running(job.job_id, running=True)
        try:
            outcome = self._process(job, self.watches[job.root])
        except FileNotFoundError as exc:
            # Gone from the work area: vanished. Anything else missing is our problem.
            kind: OutcomeKind = "finish_error" if job.path.exists() else "vanished"
            outcome = Outcome(kind, job, exc)
        except BaseException:
            self.ledger.set_running(job.job_id, running=False)
            raise
        if outcome.kind not in ("done", "dedup", "failed"):  # those cleared it already
            self.ledger.set_running(job.job_id, running=False)
        if outcome.kind in ("done", "dedup", "failed", "vanished"):
            clean_scratch(job, self.instance)  # the parts are not needed any more
        return outcome

    def _process(self, job: Job, watch: WatchConfig) -> Outcome:
        verdict = job.verdict
        if verdict is not None:  # judged already: only the move to failed/ is left
            if job.sha256 is None:
                with contextlib.suppress(PrepareError):
                    job = identify(job)  # for the error file
            return self.fail(job, verdict.error, watch, verdict.reason)
        try:
            if job.sha256 is None:
                job = identify(job)  # (the ledger learns the hash with the transcript)
        except PrepareError as exc:
            return self.fail(job, exc, watch)
        model = self.model_for(job)
        kind: OutcomeKind = "done"
        bytes_sent = 0
        audio_seconds: float | None = None
        if (
            job.text is None
            and job.sha256
            and (known := self.ledger.known_text(job.sha256, model)) is not None
        ):
            job, kind = job.evolve(text=known), "dedup"
        if job.text is None:
            try:
                prepared = prepare(job, self.config, self.instance)
            except PrepareError as exc:
                return self.fail(job, exc, watch)
            audio_seconds = prepared.audio_seconds
            # Parts whose transcripts the ledger holds (an earlier, interrupted try).
            texts = self.ledger.parts(job.job_id) if len(prepared.parts) > 1 else []
            trace_id: str | None = None
            self.log.info(
                "sfwatch.upload_started",
                job_id=job.job_id,
                file=str(job.source),
                attempt=job.attempts + 1,
                parts=len(prepared.parts),
                parts_done=len(texts),
                prepared=prepared.how,
                audio_seconds=audio_seconds,
                bytes=job.signature.size,
            )
            try:
                for part in prepared.parts[len(texts) :]:
                    result = self.transcriber.transcribe(part.path, part.upload_name, model)
                    trace_id = result.trace_id
                    job = job.evolve(trace_ids=(*job.trace_ids, result.trace_id or ""))
                    texts.append(result.text)
                    bytes_sent += result.bytes_sent
                    if len(prepared.parts) > 1:
                        self.ledger.part_done(job.job_id, texts)
            except TranscribeError as exc:
                if exc.trace_id:
                    job = job.evolve(trace_ids=(*job.trace_ids, exc.trace_id))
                return Outcome("error", job, exc, bytes_sent=bytes_sent)
            job = job.evolve(attempts=job.attempts + 1, text="\n".join(t.strip() for t in texts))
            if signature_of(job.path) != job.signature:
                # New content: the parts and their transcripts are of the old one.
                self.ledger.part_done(job.job_id, [])
                clean_scratch(job, self.instance)
                return Outcome("changed", job.evolve(text=None, sha256=None))
            self.ledger.transcribed(job, model, trace_id)
        try:
            placed = self._finish(job, watch)
        except OSError as exc:
            return Outcome("finish_error", job, exc, bytes_sent=bytes_sent)
        self.ledger.finished(
            job,
            kind,
            final_path=placed.original,
            transcript=placed.transcript,
            audio_seconds=audio_seconds,
        )
        return Outcome(kind, job, placed=placed, bytes_sent=bytes_sent, audio_seconds=audio_seconds)

    def _finish(self, job: Job, watch: WatchConfig) -> Placed:
        row = self.ledger.job(job.job_id)
        existing = Path(row.transcript) if row and row.transcript else None
        if existing is not None:
            # An earlier finish chose this name and may have been killed mid-write.
            temp_name(existing, job.job_id).unlink(missing_ok=True)
            if not _holds(existing, transcript_bytes(job.text or "")):
                existing = None  # never written, or another file's since: choose again
        return finish_done(
            job,
            job.text or "",
            watch,
            transcript_at=existing,
            plan=lambda path: self.ledger.planned_transcript(job.job_id, path),
        )

    def fail(
        self, job: Job, exc: Exception, watch: WatchConfig, reason: str | None = None
    ) -> Outcome:
        """Move the job's file to failed/ with its error file; record it."""
        fields = error_fields(exc)
        if reason is not None:
            fields = {**fields, "reason": reason, "last_reason": fields.get("reason")}
        try:
            placed = finish_failed(job, fields, watch)
        except OSError as move_exc:
            return Outcome("finish_error", job, move_exc)
        self.ledger.finished(job, "failed", final_path=placed.original, error=fields)
        clean_scratch(job, self.instance)
        # The scheduler also fails jobs no outcome of ours ends (poison, gave_up, a 400):
        # their job folder, now empty, goes here (up to the instance folder).
        remove_empty_dirs(job.path.parent, job.path.parents[len(job.rel.parts)])
        return Outcome("failed", job, exc, placed=placed)


def _holds(path: Path, data: bytes) -> bool:
    """Is ``path`` a regular file holding exactly ``data``?"""
    try:
        st = path.lstat()
        return stat.S_ISREG(st.st_mode) and st.st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False
