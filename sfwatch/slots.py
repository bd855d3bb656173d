"""Upload slots: the thread pools that run attempts, and the jobs in flight.

An attempt that uploads waits for the pacer (rate limits and outages are
account-wide, pacing.py) and runs on one of ``api.concurrency`` upload threads.
Local work — a move to failed/, finishing a transcript already paid for — has a
pool of its own: it is never held up behind the pacer, nor behind slow uploads.

Only the main thread calls in here, so the bookkeeping needs no lock; the pool
threads run ``Worker.process``, wait at the gate (the one structure they share
with the main thread, under ``gate_lock``) and wake the loop when they end. A worker
that raises is a bug of ours, not the file's fault: its outcome is ``crash``
and the job stays claimed (docs/design.md §6.5).

A new file's slot thread claims it first (``ready.Claimer``), so the main thread
never waits on the claim's rename, fsyncs and ledger row.

Only the request itself counts against ``api.concurrency`` (and the pacer):

- **before it**, up to ``ahead`` attempts are claimed and prepared (hashed,
  probed, cut) while the uploads run; each then waits at the gate (``cleared``)
  until the main thread gives it a turn, so a finished upload is followed by the
  next one at once, not by the next file's claim and probe;
- **after it**, once the upload has its answer (``Ticket.released``), the thread
  writes the transcript and moves the original while the next upload is already
  out. The upload pool has room for those finishing threads.

Turns are given by the main thread (``grant``), which alone asks the pacer.

A file whose attempt needs no upload (a known transcript, a file judged bad by the
probe) never takes a turn. An attempt waiting at the gate when the daemon stops,
or the account pauses, is sent back unsent (``deferred``) and queued again.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from sfwatch.config import ApiConfig
from sfwatch.job import Job
from sfwatch.lifecycle import OutcomeKind
from sfwatch.logs import get_logger
from sfwatch.pacing import Pacer
from sfwatch.ready import ClaimMiss, ToClaim
from sfwatch.scheduler import needs_upload
from sfwatch.worker import FreshClaim, Outcome, Worker

#: an upload running this much longer than api.timeout_seconds means a stuck worker
STUCK_MARGIN = 60.0
#: threads for local work (moves to failed/, finishing paid transcripts)
LOCAL_WORKERS = 2
#: upload threads per slot: one uploading, one finishing the file before
FINISHING_HEADROOM = 2


def prepared_ahead(concurrency: int) -> int:
    """How many attempts may be claimed and prepared beyond those uploading."""
    return max(2, concurrency // 4)


@dataclass(eq=False)
class Ticket:
    """One attempt in flight: its job (once claimed), and whether it still holds a slot."""

    job_id: str
    #: the job; None while a new file's claim is under way on the slot's thread
    job: Job | None
    #: set (by the slot's thread) once the upload is over: the slot is free for another
    released: bool = False
    #: the slot's thread waits for its turn to send (set by the main thread)
    turn: threading.Event = field(default_factory=threading.Event)
    #: the main thread gave it a turn (and counted it with the pacer)
    granted: bool = False
    #: when it got its turn (monotonic): the stuck-upload clock starts again then
    granted_at: float | None = None
    #: waiting at the gate, prepared (a wait of ours is not a stuck worker)
    waiting: bool = False
    #: no turn after all (a stop, a pause): the attempt ends unsent
    refused: bool = False


class UploadSlots:
    """The upload and local pools, and which job runs on which future since when."""

    def __init__(
        self,
        worker: Worker,
        pacer: Pacer,
        api: ApiConfig,
        wakeup: threading.Event,
        take: Callable[[ToClaim], tuple[Job, FreshClaim] | ClaimMiss] | None = None,
    ) -> None:
        self.worker = worker
        self.pacer = pacer
        self.wakeup = wakeup
        # Sending and answering are each bounded by timeout_seconds (transcribe.py).
        self.stuck_after = 2 * api.timeout_seconds + STUCK_MARGIN
        self.log = get_logger()
        self.in_flight: dict[Future[Outcome | ClaimMiss], Ticket] = {}
        self.uploading: set[Future[Outcome | ClaimMiss]] = set()
        self.started_at: dict[Future[Outcome | ClaimMiss], float] = {}
        #: claims a new file on its slot's thread (``ready.Claimer.take``)
        self.take = take
        self.ahead = prepared_ahead(api.concurrency)
        #: prepared attempts waiting for a turn, oldest first (appended by slot threads)
        self.gate: deque[Ticket] = deque()
        #: guards ``gate`` and ``closed`` (a thread must not wait after the last refusal)
        self.gate_lock = threading.Lock()
        self.closed = False
        self.pool = ThreadPoolExecutor(
            api.concurrency * FINISHING_HEADROOM + self.ahead, thread_name_prefix="sfwatch-upload"
        )
        self.local_pool = ThreadPoolExecutor(LOCAL_WORKERS, thread_name_prefix="sfwatch-local")

    def __len__(self) -> int:
        return len(self.in_flight)

    def jobs(self) -> list[Job]:
        """The jobs in flight (uploads and local work) that have been claimed."""
        return [t.job for t in self.in_flight.values() if t.job is not None]

    def job_ids(self) -> set[str]:
        """The ids of every job in flight, also of claims still under way."""
        return {t.job_id for t in self.in_flight.values()}

    def sending(self) -> int:
        """Uploads that have their turn and no answer yet (what the pacer limits)."""
        return sum(1 for t in self.in_flight.values() if t.granted and not t.released)

    def uploads_allowed(self) -> bool:
        """May one more attempt that uploads begin (be claimed, prepared) now?

        Up to ``ahead`` more than the pacer's limit may be under way (those uploading
        and those before their turn); while the pacer holds, nothing is claimed ahead.
        """
        before = sum(1 for f in self.uploading if not self.in_flight[f].granted)
        return self.pacer.allowed(max(0, self.sending() + before - self.ahead))

    def grant(self, *, stopping: bool) -> None:
        """Give prepared attempts their turn, as the pacer allows (main thread).

        Stopping, or with the account paused or the config held, those waiting are
        refused: they end as ``deferred`` and are queued again (or resumed at the
        next start), rather than wait, claimed, for as long as the pause lasts.
        """
        if not self.gate:
            return
        refuse = stopping or self.pacer.account_fault is not None or self.pacer.config_held()
        sending = self.sending()
        with self.gate_lock:
            while self.gate:
                ticket = self.gate[0]
                if not refuse:
                    if not self.pacer.allowed(sending):
                        break
                    ticket.granted, ticket.granted_at = True, time.monotonic()
                    sending += 1
                    self.pacer.started()
                else:
                    ticket.refused = True
                self.gate.popleft()
                ticket.waiting = False
                ticket.turn.set()

    def submit(self, item: Job | ToClaim) -> None:
        """Start an attempt: a new file (claimed on the slot's thread) or a job's next try.

        It runs on an upload thread if it uploads, else on the local pool.
        """
        if isinstance(item, ToClaim):
            ticket = Ticket(item.job_id, None)
            future = self.pool.submit(self._claim_and_process, item, ticket)
            upload = True
        else:
            ticket = Ticket(item.job_id, item)
            upload = needs_upload(item)
            pool = self.pool if upload else self.local_pool
            future = pool.submit(
                self.worker.process,
                item,
                released=self._releaser(ticket),
                cleared=self._clearer(ticket),
            )
        if upload:
            self.uploading.add(future)
        self.in_flight[future] = ticket
        self.started_at[future] = time.monotonic()
        future.add_done_callback(lambda _f: self.wakeup.set())

    def _clearer(self, ticket: Ticket) -> Callable[[], bool]:
        def cleared() -> bool:  # (on the slot's thread: wait for the main thread's turn)
            with self.gate_lock:
                if self.closed:
                    return False
                ticket.waiting = True
                self.gate.append(ticket)
                first = len(self.gate) == 1
            if first:  # (else the main thread was woken for the one ahead of us)
                self.wakeup.set()
            ticket.turn.wait()
            return not ticket.refused

        return cleared

    def _releaser(self, ticket: Ticket) -> Callable[[], None]:
        def release() -> None:  # (on the slot's thread: a bool store, then a wake-up)
            ticket.released = True
            self.wakeup.set()

        return release

    def _claim_and_process(self, item: ToClaim, ticket: Ticket) -> Outcome | ClaimMiss:
        """On the slot's thread: claim the file, then run its first attempt."""
        assert self.take is not None  # noqa: S101 - given by whoever submits new files
        taken = self.take(item)
        if isinstance(taken, ClaimMiss):
            return taken
        job, fresh = taken
        ticket.job = job
        return self.worker.process(
            job, released=self._releaser(ticket), cleared=self._clearer(ticket), fresh=fresh
        )

    def reap(self) -> Iterator[Outcome | ClaimMiss]:
        """What the attempts that ended gave, one at a time (a raise is ``crash``)."""
        for future in [f for f in self.in_flight if f.done()]:
            ticket = self.in_flight.pop(future)
            self.uploading.discard(future)
            self.started_at.pop(future, None)
            try:
                result = future.result()
            except Exception as exc:  # a bug: keep the file claimed, try again later
                job = ticket.job
                self.log.exception(
                    "sfwatch.worker_crashed",
                    job_id=ticket.job_id,
                    file=str(job.source) if job is not None else None,
                )
                if job is None:
                    # A claim that raised: its file is in the inbox, or in the work area
                    # without a row, where the next start's recovery finds it.
                    continue
                result = Outcome(OutcomeKind.CRASH, job, exc)
            yield result

    def stuck(self, now: float) -> float | None:
        """How long the oldest attempt has run, if past its timeouts (a stuck worker thread).

        An attempt's clock starts again when it gets its turn: a wait at the gate is
        the pacer's doing (an outage, a rate limit), not a stuck thread.
        """
        running = [
            ticket.granted_at or self.started_at[future]
            for future, ticket in self.in_flight.items()
            if not ticket.waiting and future in self.started_at
        ]
        oldest = min(running, default=now)
        return now - oldest if now - oldest >= self.stuck_after else None

    def close_gate(self) -> None:
        """Refuse every attempt waiting for a turn, and those yet to ask (the daemon ends).

        First thing at shutdown: a thread left waiting at the gate would block the
        interpreter's exit for ever (it joins the pool's threads).
        """
        with self.gate_lock:
            self.closed = True
        self.grant(stopping=True)

    def shutdown(self, *, wait: bool) -> None:
        """Cancel what has not started; wait for the rest unless we are abandoning them."""
        self.close_gate()
        self.pool.shutdown(wait=wait, cancel_futures=True)
        self.local_pool.shutdown(wait=wait, cancel_futures=True)


__all__ = ["UploadSlots"]
