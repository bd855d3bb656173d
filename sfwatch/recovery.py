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

import contextlib
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sfwatch.claim import adopted_by, claimed_files, instance_dir
from sfwatch.config import WatchConfig
from sfwatch.config_request import DEFAULT_OUTPUTS, DEFAULT_TRANSCRIPT_NAME
from sfwatch.errors import Fenced
from sfwatch.folders import Folders
from sfwatch.job import FileSignature, Job
from sfwatch.ledger import JobRow
from sfwatch.logs import get_logger
from sfwatch.safefs import folder, work_area

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
        workers: set[str] | None = None,
    ) -> None:
        self.instance = instance
        #: this run's other worker processes: the face starts them again, and they resume
        #: their own claims; adopting those would race them (workers.py)
        self.workers = workers or set()
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
            try:
                with work_area(work_dir.parent).folder(["work", self.instance]) as mine:
                    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                    os.close(os.open(LEASE_NAME, flags, 0o600, dir_fd=mine))
                    os.utime(LEASE_NAME, dir_fd=mine, follow_symlinks=False)
            except OSError as exc:
                renewed = False
                self.log.warning(
                    "sfwatch.lease_failed",
                    path=str(instance_dir(work_dir, self.instance) / LEASE_NAME),
                    error=str(exc),
                )
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
            try:
                with work_area(work_dir.parent).folder(["work"]) as work:
                    for other in sorted(os.listdir(work)):  # noqa: PTH208 - a handle
                        if other in (self.instance, *self.workers) or not _ours(work, other):
                            continue
                        if self._expired(work, work_dir / "work" / other, now):
                            adopted.extend(self._adopt(work_dir, work, other))
            except OSError as exc:  # a third daemon adopted and removed it first
                self.log.warning("sfwatch.adopt_failed", path=str(work_dir), error=str(exc))
        return adopted

    def _expired(self, work: int, other: Path, now: float) -> bool:
        try:
            st = os.stat(f"{other.name}/{LEASE_NAME}", dir_fd=work, follow_symlinks=False)
        except FileNotFoundError:
            st = os.stat(other.name, dir_fd=work, follow_symlinks=False)  # never wrote a lease
        mtime = st.st_mtime_ns
        seen = self._seen.get(other)
        if seen is None or seen.mtime_ns != mtime:
            self._seen[other] = _Seen(mtime, now)
            return False
        return now - seen.since >= self.lease_seconds

    def _adopt(self, work_dir: Path, work: int, other: str) -> list[Job]:
        """Rename the dead instance's job folders into ours (only real folders of our user)."""
        taken: set[str] = set()
        with folder(work, [other]) as theirs, folder(work, [self.instance], create=True) as mine:
            for job_dir in sorted(os.listdir(theirs)):  # noqa: PTH208 - a handle
                if job_dir.startswith(".") or not _ours(theirs, job_dir):
                    continue
                try:
                    os.rename(job_dir, job_dir, src_dir_fd=theirs, dst_dir_fd=mine)
                except OSError:
                    continue  # a sibling adopted it first
                taken.add(job_dir)
            with contextlib.suppress(OSError):
                os.unlink(LEASE_NAME, dir_fd=theirs)
        with contextlib.suppress(OSError):
            os.rmdir(other, dir_fd=work)  # (not empty: its owner came back meanwhile)
        jobs = [
            j for j in claimed_files(work_dir, self.instance, work_dir.parent) if j.job_id in taken
        ]
        if taken:
            self.log.warning(
                "sfwatch.claims_adopted",
                from_instance=other,
                jobs=len(jobs),
                path=str(work_dir.parent),
            )
        self._seen.pop(work_dir / "work" / other, None)
        return jobs


def _ours(dfd: int, name: str) -> bool:
    """A real folder of our user (a sibling's instance or job folder), not a planted link."""
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()


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

    def hook(key: str) -> tuple[str, ...] | None:
        value = dirs.get(key)
        return tuple(str(a) for a in value) if isinstance(value, list) else None

    return WatchConfig(
        path=root,
        done_dir=folder("done_dir", root / "done"),
        failed_dir=folder("failed_dir", root / "failed"),
        transcript_dir=Path(dirs["transcript_dir"]) if dirs.get("transcript_dir") else None,
        model=dirs.get("model"),
        on_done=hook("on_done"),
        on_failed=hook("on_failed"),
        # (the request no longer matters: a retired folder's claims are only finished)
        outputs=hook("outputs") or DEFAULT_OUTPUTS,
        transcript_name=str(dirs.get("transcript_name") or DEFAULT_TRANSCRIPT_NAME),
    )
