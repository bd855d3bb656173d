"""What runs next: due waiting jobs, then settled files claimed only when a slot is free.

A settled file stays in the inbox, unclaimed, until its upload could start now:
a sibling daemon sharing the folder can take it meanwhile, and nothing is hoarded
behind our own slots (docs/design.md §5.1, §7). A waiting job that falls due is
looked at again first: gone is ``lost``, still being written through an old
handle is settled again; only then does it run.

The main thread only decides: it hands a settled file, with the job id it will
get, to an upload slot, and the slot's thread claims it (``Claimer.take``: the
rename, its fsyncs, the ledger row) before it prepares and uploads it. A claim
that misses comes back as a ``ClaimMiss`` for the main thread to act on.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sfwatch.claim import claim
from sfwatch.folders import Folders
from sfwatch.job import Job, new_job_id
from sfwatch.ledger import Ledger
from sfwatch.logs import get_logger
from sfwatch.scheduler import Scheduler, watch_dirs
from sfwatch.settle import SettledFile, signature_of
from sfwatch.watch import PathNotes
from sfwatch.worker import FreshClaim


@dataclass(frozen=True)
class ToClaim:
    """A settled file handed to an upload slot, and the id its job will have."""

    settled: SettledFile
    job_id: str


@dataclass(frozen=True)
class ClaimMiss:
    """A claim that did not give a job to work on; the main thread acts on it."""

    settled: SettledFile
    error: Exception | None = None


class Claimer:
    """Claims a settled file on an upload thread: the rename, then the ledger row.

    Thread-safe: it only reads the folders' registry and writes the ledger.
    """

    def __init__(self, folders: Folders, ledger: Ledger, instance: str) -> None:
        self.folders = folders
        self.ledger = ledger
        self.instance = instance
        self.log = get_logger()

    def take(self, item: ToClaim) -> tuple[Job, FreshClaim] | ClaimMiss:
        """Claim ``item``'s file: its job (its row queued, at stage prepare), or why not."""
        settled = item.settled
        watch = self.folders.get(settled.root)
        if watch is None:
            return ClaimMiss(settled)  # its folder is no longer watched (a reload removed it)
        try:
            claimed = claim(settled, watch.work_dir, self.instance, item.job_id)
        except OSError as exc:
            self.log.error("sfwatch.claim_failed", file=str(settled.path), error=str(exc))
            return ClaimMiss(settled, error=exc)
        if claimed is None:
            return ClaimMiss(settled)
        now = time.monotonic()
        job = claimed.evolve(claimed_at=now, window_start=now)
        dirs = watch_dirs(watch)
        # The row says a worker is preparing it: this thread goes on to do so. It is
        # committed while we prepare and upload; the worker waits for it before the
        # job's first durable write (``Worker.durable_claim``), and writes it again
        # then if the ledger failed it.
        row = self.ledger.claimed_later(job, self.instance, dirs, stage="prepare")

        def rewrite() -> None:
            self.ledger.claimed(job, self.instance, dirs)

        self.log.info(
            "sfwatch.file_claimed",
            job_id=job.job_id,
            file=str(job.source),
            bytes=job.signature.size,
        )
        return job, FreshClaim(row, rewrite)


#: seconds before a waiting job whose file cannot be looked at (EIO, a stale NFS handle:
#: not known to be gone) is looked at again
UNREACHABLE_RETRY = 5.0


class ReadyQueue:
    """Settled files not yet claimed, and the choice of the next job to start."""

    def __init__(
        self,
        folders: Folders,
        scheduler: Scheduler,
        ledger: Ledger,
        instance: str,
        notes: PathNotes,
    ) -> None:
        self.folders = folders
        self.scheduler = scheduler
        self.ledger = ledger
        self.instance = instance
        self.notes = notes
        self.log = get_logger()
        self.ready: deque[SettledFile] = deque()
        #: the paths in ``ready`` (intake leaves them alone until they are claimed)
        self.queued: set[Path] = set()

    def __len__(self) -> int:
        return len(self.ready)

    def add(self, settled: Iterable[SettledFile]) -> None:
        """Queue files that settled, each once."""
        for file in settled:
            if file.path not in self.queued:
                self.queued.add(file.path)
                self.ready.append(file)

    def next_job(self, uploads_allowed: bool) -> Job | ToClaim | None:
        """The next job to start: a due waiting job, else a settled file to claim now."""
        self.scheduler.run_deferred()
        while (job := self.scheduler.pop_due(uploads_allowed)) is not None:
            if job.plan is not None:
                return job  # mid-finish: the worker finds the file where it is now
            settle = self.folders.for_root(job.root).settle_seconds
            try:
                sig = signature_of(job.path, os.lstat(job.path))
            except (FileNotFoundError, NotADirectoryError):
                sig = None
            except OSError as exc:  # EIO, a stale NFS handle: not known to be gone
                delay = max(settle, UNREACHABLE_RETRY)
                self.log.warning(
                    "sfwatch.job_unreachable",
                    job_id=job.job_id,
                    file=str(job.source),
                    error=exc.strerror or str(exc),
                    retry_in=delay,
                )
                self.scheduler.wait(job, delay)
                continue
            if sig is None:
                self.scheduler.vanished(job)
                continue
            if sig != job.signature:  # still being written through an old handle
                self.scheduler.wait(job.evolve(signature=sig, sha256=None, text=None), settle)
                continue
            return job
        while uploads_allowed and self.ready:
            settled = self.ready.popleft()
            self.queued.discard(settled.path)
            if self.folders.get(settled.root) is not None:  # (a reload may have removed it)
                return ToClaim(settled, new_job_id())
        return None

    def missed(self, miss: ClaimMiss) -> None:
        """A claim handed to a slot did not give a job (see ``ClaimMiss``)."""
        if miss.error is None and os.path.lexists(miss.settled.path):
            self.notes.note(str(miss.settled.path))  # changed since it settled


__all__ = ["ClaimMiss", "Claimer", "ReadyQueue", "ToClaim"]
