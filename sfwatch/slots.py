"""Upload slots: the thread pools that run attempts, and the jobs in flight.

An attempt that uploads waits for the pacer (rate limits and outages are
account-wide, pacing.py) and runs on one of ``api.concurrency`` upload threads.
Local work — a move to failed/, finishing a transcript already paid for — has a
pool of its own: it is never held up behind the pacer, nor behind slow uploads.

Only the main thread calls in here, so the bookkeeping needs no lock; the pool
threads just run ``Worker.process`` and wake the loop when they end. A worker
that raises is a bug of ours, not the file's fault: its outcome is ``crash``
and the job stays claimed (docs/design.md §6.5).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from sfwatch.config import ApiConfig
from sfwatch.job import Job
from sfwatch.lifecycle import OutcomeKind
from sfwatch.logs import get_logger
from sfwatch.pacing import Pacer
from sfwatch.scheduler import needs_upload
from sfwatch.worker import Outcome, Worker

#: an upload running this much longer than api.timeout_seconds means a stuck worker
STUCK_MARGIN = 60.0
#: threads for local work (moves to failed/, finishing paid transcripts)
LOCAL_WORKERS = 2


class UploadSlots:
    """The upload and local pools, and which job runs on which future since when."""

    def __init__(
        self, worker: Worker, pacer: Pacer, api: ApiConfig, wakeup: threading.Event
    ) -> None:
        self.worker = worker
        self.pacer = pacer
        self.wakeup = wakeup
        # Sending and answering are each bounded by timeout_seconds (transcribe.py).
        self.stuck_after = 2 * api.timeout_seconds + STUCK_MARGIN
        self.log = get_logger()
        self.in_flight: dict[Future[Outcome], Job] = {}
        self.uploading: set[Future[Outcome]] = set()
        self.started_at: dict[Future[Outcome], float] = {}
        self.pool = ThreadPoolExecutor(api.concurrency, thread_name_prefix="sfwatch-upload")
        self.local_pool = ThreadPoolExecutor(LOCAL_WORKERS, thread_name_prefix="sfwatch-local")

    def __len__(self) -> int:
        return len(self.in_flight)

    def jobs(self) -> list[Job]:
        """The jobs in flight (uploads and local work)."""
        return list(self.in_flight.values())

    def uploads_allowed(self) -> bool:
        """May one more upload start now? The pacer decides, given those running."""
        return self.pacer.allowed(len(self.uploading))

    def submit(self, job: Job) -> None:
        """Start ``job``'s next attempt: on an upload thread if it uploads, else locally."""
        upload = needs_upload(job)
        if upload:
            self.pacer.started()
        future = (self.pool if upload else self.local_pool).submit(self.worker.process, job)
        if upload:
            self.uploading.add(future)
        self.in_flight[future] = job
        self.started_at[future] = time.monotonic()
        future.add_done_callback(lambda _f: self.wakeup.set())

    def reap(self) -> Iterator[Outcome]:
        """The outcomes of the attempts that ended, one at a time (a raise is ``crash``)."""
        for future in [f for f in self.in_flight if f.done()]:
            job = self.in_flight.pop(future)
            self.uploading.discard(future)
            self.started_at.pop(future, None)
            try:
                outcome = future.result()
            except Exception as exc:  # a bug: keep the file claimed, try again later
                self.log.exception(
                    "sfwatch.worker_crashed", job_id=job.job_id, file=str(job.source)
                )
                outcome = Outcome(OutcomeKind.CRASH, job, exc)
            yield outcome

    def stuck(self, now: float) -> float | None:
        """How long the oldest attempt has run, if past its timeouts (a stuck worker thread)."""
        oldest = min(self.started_at.values(), default=now)
        return now - oldest if now - oldest >= self.stuck_after else None

    def shutdown(self, *, wait: bool) -> None:
        """Cancel what has not started; wait for the rest unless we are abandoning them."""
        self.pool.shutdown(wait=wait, cancel_futures=True)
        self.local_pool.shutdown(wait=wait, cancel_futures=True)


__all__ = ["UploadSlots"]
