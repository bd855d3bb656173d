"""Start-up reconcile and resume: the ledger and the work area against memory.

After a crash, a kill or a cold stop, the ledger and the work area say what
this instance was doing; memory says nothing. At start-up every open ledger row
is checked against the file system (docs/design.md §6.1) and every claim left in
the work area is resumed (§6.2); a folder a reload adds is resumed the same way.
Afterwards no row is ``claimed`` that has no job in memory, and no claim of this
instance sits in a work area unknown to the scheduler.

Claims in folders that have left the config finish there, with the settings the
ledger recorded at claim: their folders are *retired* in the registry (folders.py).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path

from sfwatch.claim import claimed_files
from sfwatch.config import WatchConfig
from sfwatch.folders import Folders
from sfwatch.ledger import Ledger
from sfwatch.logs import get_logger
from sfwatch.recovery import job_from_row, retired_watch
from sfwatch.safefs import work_area
from sfwatch.scheduler import Scheduler
from sfwatch.slots import UploadSlots


class Reconciler:
    """Brings the jobs of the ledger and of the work areas back under the scheduler."""

    def __init__(
        self,
        folders: Folders,
        ledger: Ledger,
        scheduler: Scheduler,
        slots: UploadSlots,
        instance: str,
        *,
        not_mine: Callable[[str], bool] | None = None,
    ) -> None:
        self.folders = folders
        self.ledger = ledger
        self.scheduler = scheduler
        self.slots = slots
        self.instance = instance
        #: whether an instance is another worker process's: its rows are its own
        self.not_mine = not_mine
        self.log = get_logger()

    def startup(self) -> None:
        """Every open ledger row against the file system, then every left-over claim."""
        for watch in self.folders.watched():  # split parts are made again when needed
            with contextlib.suppress(OSError), work_area(watch.path).folder(["tmp"]) as tmp:
                shutil.rmtree(self.instance, dir_fd=tmp)
        rows = self.ledger.open_jobs(skip=self.not_mine)
        for row in rows:  # claims of folders that have left the config finish there
            if Path(row.root) not in self.folders:
                watch = retired_watch(row)
                self.folders.retire(watch)
                self.log.warning(
                    "sfwatch.retired_watch_resumed", path=str(watch.path), job_id=row.job_id
                )
        roots = {Path(r.root) for r in rows} | {w.path for w in self.folders.watched()}
        for root in sorted(roots):
            self.recover(self.folders.for_root(root))
        live = self._live_jobs()
        for row in rows:
            if row.job_id in live:
                continue
            job = job_from_row(row, self.instance)
            if row.plan is not None:
                self.scheduler.resume(job, self.instance)  # the worker finds where it went
            elif job.path.exists():
                continue  # another instance name's work folder: its lease decides
            else:
                self.scheduler.vanished(job)

    def recover(self, watch: WatchConfig) -> None:
        """Resume the claims an earlier run of this instance left in ``watch``'s work area."""
        # A folder removed and re-added by reloads may hold jobs we are still working on.
        live = self._live_jobs()
        for job in claimed_files(watch.work_dir, self.instance, watch.path):
            if job.job_id not in live:
                self.scheduler.resume(job, self.instance)

    def _live_jobs(self) -> set[str]:
        live = self.slots.job_ids()  # (claims under way included)
        live.update(j.job_id for _, _, j in self.scheduler.waiting)
        return live


__all__ = ["Reconciler"]
