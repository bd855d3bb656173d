"""What runs next: due waiting jobs, then settled files claimed only when a slot is free.

A settled file stays in the inbox, unclaimed, until its upload could start now:
a sibling daemon sharing the folder can take it meanwhile, and nothing is hoarded
behind our own slots (docs/design.md §5.1, §7). A waiting job that falls due is
looked at again first: gone is ``lost``, still being written through an old
handle is settled again; only then does it run.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path

from sfwatch.claim import claim
from sfwatch.folders import Folders
from sfwatch.job import Job
from sfwatch.ledger import Ledger
from sfwatch.logs import get_logger
from sfwatch.scheduler import Scheduler
from sfwatch.settle import SettledFile, signature_of
from sfwatch.watch import PathNotes


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

    def next_job(self, uploads_allowed: bool) -> Job | None:
        """The next job to start: a due waiting job, else a settled file claimed now."""
        self.scheduler.run_deferred()
        while (job := self.scheduler.pop_due(uploads_allowed)) is not None:
            if job.plan is not None:
                return job  # mid-finish: the worker finds the file where it is now
            sig = signature_of(job.path)
            if sig is None:
                self.scheduler.vanished(job)
                continue
            if sig != job.signature:  # still being written through an old handle
                self.scheduler.wait(
                    job.evolve(signature=sig, sha256=None, text=None),
                    self.folders.for_root(job.root).settle_seconds,
                )
                continue
            return job
        while uploads_allowed and self.ready:
            if (job := self._claim(self.ready.popleft())) is not None:
                return job
        return None

    def _claim(self, settled: SettledFile) -> Job | None:
        self.queued.discard(settled.path)
        watch = self.folders.get(settled.root)
        if watch is None:
            return None  # its folder is no longer watched (a reload removed it)
        try:
            claimed = claim(settled, watch.work_dir, self.instance)
        except OSError as exc:
            self.log.error("sfwatch.claim_failed", file=str(settled.path), error=str(exc))
            return None
        if claimed is None:
            if os.path.lexists(settled.path):
                self.notes.note(str(settled.path))  # changed since it settled
            return None
        now = time.monotonic()
        job = claimed.evolve(claimed_at=now, window_start=now)
        if not self.scheduler.record_claim(job, self.instance):
            return None  # resumed once the ledger takes the row
        self.log.info(
            "sfwatch.file_claimed",
            job_id=job.job_id,
            file=str(job.source),
            bytes=job.signature.size,
        )
        return job


__all__ = ["ReadyQueue"]
