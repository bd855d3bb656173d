"""claim: take a settled file out of the inbox with one atomic rename.

The work area is ``<watched>/.sfwatch/work/<instance>/<job_id>/<relative path>``:
on the same file system as the inbox (so the rename is atomic), and self-
describing (the job id and where the file arrived can be read back from the
path alone, which is how claims are recovered after a crash). When several
daemons watch one folder, each renames into its own instance folder; the one
whose rename finds the file gone has lost the race, which is normal.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from sfwatch.fsutil import fsync_dir, remove_empty_dirs
from sfwatch.job import Job, new_job_id
from sfwatch.settle import SettledFile, signature_of


def instance_dir(work_dir: Path, instance: str) -> Path:
    """This daemon's own folder in a watched folder's work area."""
    return work_dir / "work" / instance


def claim(settled: SettledFile, work_dir: Path, instance: str) -> Job | None:
    """Rename the file into this instance's work folder; None if it changed or is gone."""
    if signature_of(settled.path) != settled.signature:
        return None  # written to since it settled, or gone: settle it again
    job_id = new_job_id()
    rel = PurePosixPath(settled.path.relative_to(settled.root).as_posix())
    job_dir = instance_dir(work_dir, instance) / job_id
    dest = job_dir / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    job = Job(job_id=job_id, root=settled.root, rel=rel, path=dest, signature=settled.signature)
    try:
        settled.path.rename(dest)
    except OSError as exc:
        if os.path.lexists(dest):
            # The rename happened after all (an NFS reply lost and retried): it is ours.
            return job
        # Only our own empty folders go; never a file (rmtree here could delete one).
        remove_empty_dirs(dest.parent, instance_dir(work_dir, instance))
        if isinstance(exc, FileNotFoundError):
            return None  # another daemon was faster
        if exc.errno == errno.EXDEV:
            raise OSError(
                exc.errno, "work area is on another file system than the file", str(settled.path)
            ) from exc
        raise
    fsync_dir(dest.parent)
    fsync_dir(settled.path.parent)
    return job


def claimed_files(work_dir: Path, instance: str, root: Path) -> Iterator[Job]:
    """The jobs an earlier run of this instance left in its work folder."""
    base = instance_dir(work_dir, instance)
    if not base.is_dir():
        return
    for job_dir in sorted(base.iterdir()):
        if not job_dir.is_dir() or job_dir.name.startswith("."):
            continue
        files = [Path(d) / f for d, _, names in os.walk(job_dir) for f in names]
        if not files:
            shutil.rmtree(job_dir, ignore_errors=True)  # a claim that never happened
            continue
        for path in files:
            if path.name.startswith(".") and path.name.endswith(".sfwatch-tmp"):
                path.unlink(missing_ok=True)  # a temp file of ours, not the user's
                continue
            sig = signature_of(path)
            if sig is None:
                continue
            rel = PurePosixPath(path.relative_to(job_dir).as_posix())
            yield Job(job_id=job_dir.name, root=root, rel=rel, path=path, signature=sig)


def release(job: Job, work_dir: Path, instance: str) -> None:
    """Remove a finished job's (now empty) folders from the work area."""
    remove_empty_dirs(job.path.parent, instance_dir(work_dir, instance))
