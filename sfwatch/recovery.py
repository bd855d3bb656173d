"""Leases: how sibling daemons find and recover a crashed daemon's claims.

Each daemon keeps a lease file, ``<watched>/.sfwatch/work/<instance>/.lease``,
and touches it every few seconds while it runs. A sibling sharing the folder
watches the other instances' lease files. Time is measured on the *watcher's*
own monotonic clock — "this mtime has not moved for ``lease_seconds``" — so the
clocks of other hosts (or a NAS) never need to agree. When a lease expires,
the sibling renames each of the dead instance's job folders into its own work
area (atomic, so two siblings cannot both adopt one) and resumes them.

A daemon that restarts under its own instance name recovers its claims itself,
at once, without waiting for any lease (``reconcile.Reconciler``).

**Fencing** (docs/design.md §6): a daemon that was frozen (SIGSTOP, a hung NFS
call) may wake up after a sibling adopted its claims. Before each visible step
a worker calls ``LeaseKeeper.fence``: the lease must have been renewed within
half its lifetime, and the job's folder must not sit in another instance's
work folder. The adopter finishes the job from its sidecar (the paid text, the
plan), accepting a target that already holds the file instead of copying it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sfwatch.claim import adopted_by, claimed_files, instance_dir
from sfwatch.config import WatchConfig
from sfwatch.errors import Fenced
from sfwatch.folders import Folders
from sfwatch.job import FileSignature, Job
from sfwatch.ledger import JobRow
from sfwatch.logs import get_logger

#: a lease not renewed for this long (on our clock) belongs to a dead daemon
DEFAULT_LEASE_SECONDS = 120.0
LEASE_NAME = ".lease"


@dataclass
class _Seen:
    mtime_ns: int
    since: float


class LeaseKeeper:
    """Renews this instance's leases and adopts the claims of expired ones."""

    def __init__(
        self,
        instance: str,
        folders: Folders,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.instance = instance
        #: leases are kept in the folders watched now (a reload changes them)
        self.folders = folders
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.log = get_logger()
        self._seen: dict[Path, _Seen] = {}
        self._next_check = 0.0
        #: when every lease was last renewed (our clock); read by worker threads
        self.last_beat = clock()

    def beat(self) -> None:
        """Renew this instance's lease in every watched folder."""
        renewed = True
        for work_dir in self.folders.work_dirs():
            lease = instance_dir(work_dir, self.instance) / LEASE_NAME
            try:
                lease.parent.mkdir(parents=True, exist_ok=True)
                lease.touch()
                os.utime(lease)
            except OSError as exc:
                renewed = False
                self.log.warning("sfwatch.lease_failed", path=str(lease), error=str(exc))
        if renewed:
            self.last_beat = self.clock()

    def fence(self, job: Job) -> None:
        """Raise ``Fenced`` unless this daemon still owns ``job`` (see the module docstring)."""
        stale = self.clock() - self.last_beat
        if stale > self.lease_seconds / 2:
            raise Fenced(f"lease not renewed for {stale:.0f} s: a sibling may own the job")
        sibling = adopted_by(job)
        if sibling is not None:
            raise Fenced(f"adopted by {sibling}")

    def adopt_expired(self) -> list[Job]:
        """Take over the claims of instances whose lease has expired; return them."""
        now = self.clock()
        if now < self._next_check:
            return []
        self._next_check = now + max(0.2, self.lease_seconds / 8)
        adopted: list[Job] = []
        for work_dir in self.folders.work_dirs():
            base = work_dir / "work"
            try:
                others = [d for d in base.iterdir() if d.is_dir() and d.name != self.instance]
            except OSError:
                continue
            for other in others:
                if not self._expired(other, now):
                    continue
                try:
                    adopted.extend(self._adopt(work_dir, other))
                except OSError as exc:  # a third daemon adopted and removed it first
                    self.log.warning("sfwatch.adopt_failed", path=str(other), error=str(exc))
        return adopted

    def _expired(self, other: Path, now: float) -> bool:
        try:
            mtime = (other / LEASE_NAME).stat().st_mtime_ns
        except FileNotFoundError:
            try:
                mtime = other.stat().st_mtime_ns  # an instance that never wrote a lease
            except OSError:
                return False
        except OSError:
            return False
        seen = self._seen.get(other)
        if seen is None or seen.mtime_ns != mtime:
            self._seen[other] = _Seen(mtime, now)
            return False
        return now - seen.since >= self.lease_seconds

    def _adopt(self, work_dir: Path, other: Path) -> list[Job]:
        mine = instance_dir(work_dir, self.instance)
        mine.mkdir(parents=True, exist_ok=True)
        taken: set[str] = set()
        for job_dir in sorted(other.iterdir()):
            if not job_dir.is_dir():
                continue
            try:
                job_dir.rename(mine / job_dir.name)
            except OSError:
                continue  # a sibling adopted it first, or it is not ours to take
            taken.add(job_dir.name)
        jobs = [
            j for j in claimed_files(work_dir, self.instance, work_dir.parent) if j.job_id in taken
        ]
        if taken:
            self.log.warning(
                "sfwatch.claims_adopted",
                from_instance=other.name,
                jobs=len(jobs),
                path=str(work_dir.parent),
            )
        for leftover in (other / LEASE_NAME, other):
            try:
                leftover.rmdir() if leftover.is_dir() else leftover.unlink()
            except OSError:
                break  # not empty: its owner came back, or more claims arrived
        self._seen.pop(other, None)
        return jobs


def job_from_row(row: JobRow, instance: str) -> Job:
    """The job a ledger row describes (for a row whose claimed file may have moved on)."""
    root = Path(row.root)
    rel = PurePosixPath(row.rel)
    work_path = (
        Path(row.work_path)
        if row.work_path
        else instance_dir(root / ".sfwatch", instance) / row.job_id / rel
    )
    return Job(
        job_id=row.job_id,
        root=root,
        rel=rel,
        path=work_path,
        signature=FileSignature(row.size, 0, row.inode or 0, row.device or 0),
        sha256=row.sha256,
        attempts=row.attempts,
        trace_ids=row.trace_ids,
        text=row.text,
        plan=row.plan,
    )


def retired_watch(row: JobRow) -> WatchConfig:
    """Settings for a folder that left the config, from what the ledger recorded at claim."""
    dirs = row.dirs or {}
    root = Path(row.root)

    def folder(key: str, default: Path) -> Path:
        value = dirs.get(key)
        return Path(value) if value else default

    return WatchConfig(
        path=root,
        done_dir=folder("done_dir", root / "done"),
        failed_dir=folder("failed_dir", root / "failed"),
        transcript_dir=Path(dirs["transcript_dir"]) if dirs.get("transcript_dir") else None,
        model=dirs.get("model"),
    )
