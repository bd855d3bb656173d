"""claim: take a settled file out of the inbox with one atomic rename.

The work area is ``<watched>/.sfwatch/work/<instance>/<job_id>/<relative path>``:
on the same file system as the inbox (so the rename is atomic), and self-
describing (the job id and where the file arrived can be read back from the
path alone, which is how claims are recovered after a crash). When several
daemons watch one folder, each renames into its own instance folder; the one
whose rename finds the file gone has lost the race, which is normal.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from sfwatch.fsutil import files_below, fsync_dir, make_dirs, remove_empty_dirs
from sfwatch.job import FileSignature, Job, Plan, new_job_id
from sfwatch.settle import SettledFile, signature_of


def instance_dir(work_dir: Path, instance: str) -> Path:
    """This daemon's own folder in a watched folder's work area."""
    return work_dir / "work" / instance


#: in a job's folder: what a sibling needs to finish the job without paying again
SIDECAR = ".sfwatch-job.json"


def job_dir(job: Job) -> Path:
    """``<work>/<instance>/<job_id>``: the folder a claim renamed the file into."""
    return job.path.parents[len(job.rel.parts) - 1]


def claim(settled: SettledFile, work_dir: Path, instance: str) -> Job | None:
    """Rename the file into this instance's work folder; None if it changed or is gone."""
    if signature_of(settled.path) != settled.signature:
        return None  # written to since it settled, or gone: settle it again
    job_id = new_job_id()
    rel = PurePosixPath(settled.path.relative_to(settled.root).as_posix())
    dest = instance_dir(work_dir, instance) / job_id / rel
    make_dirs(dest.parent)
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
    # The rename has happened: the file is ours whatever the fsyncs say (a failure
    # here must not make us forget a claim that sits in the work area).
    with contextlib.suppress(OSError):
        fsync_dir(dest.parent)
        fsync_dir(settled.path.parent)
    return job


def claimed_files(work_dir: Path, instance: str, root: Path) -> Iterator[Job]:
    """The jobs an earlier run of this instance (or an adopted one) left in its work folder.

    A job folder whose file has already moved out but whose sidecar names a plan
    is yielded too (its ``path`` no longer exists): finish accepts the file where
    the plan put it.
    """
    base = instance_dir(work_dir, instance)
    if not base.is_dir():
        return
    for folder in sorted(base.iterdir()):
        if not folder.is_dir() or folder.is_symlink() or folder.name.startswith("."):
            continue
        sidecar = read_sidecar(folder)
        files = [path for path in files_below(folder) if path != folder / SIDECAR]
        if not files and sidecar is None:
            shutil.rmtree(folder, ignore_errors=True)  # a claim that never happened
            continue
        found = False
        for path in files:
            if path.name.startswith(".") and path.name.endswith(".sfwatch-tmp"):
                path.unlink(missing_ok=True)  # a temp file of ours, not the user's
                continue
            sig = signature_of(path)
            if sig is None:
                continue
            found = True
            rel = PurePosixPath(path.relative_to(folder).as_posix())
            yield _with_sidecar(
                Job(job_id=folder.name, root=root, rel=rel, path=path, signature=sig), sidecar
            )
        if not found and sidecar is not None and sidecar.get("plan"):
            rel = PurePosixPath(sidecar["rel"])
            sig = FileSignature(
                size=int(sidecar["size"]),
                mtime_ns=0,
                inode=int(sidecar["inode"]),
                device=int(sidecar["device"]),
            )
            job = Job(job_id=folder.name, root=root, rel=rel, path=folder / rel, signature=sig)
            yield _with_sidecar(job, sidecar)


def _with_sidecar(job: Job, sidecar: dict[str, Any] | None) -> Job:
    """The job as its sidecar describes it (text, hash, plan), when it has one."""
    if sidecar is None or sidecar.get("rel") != str(job.rel):
        return job
    return job.evolve(
        sha256=sidecar.get("sha256"),
        text=sidecar.get("text"),
        attempts=int(sidecar.get("attempts") or 0),
        trace_ids=tuple(sidecar.get("trace_ids") or ()),
        plan=Plan.from_json(sidecar["plan"]) if sidecar.get("plan") else None,
    )


def write_sidecar(job: Job) -> None:
    """Leave what a sibling needs in the job's folder: the paid text and the plan."""
    data = {
        "rel": str(job.rel),
        "size": job.signature.size,
        "inode": job.signature.inode,
        "device": job.signature.device,
        "sha256": job.sha256,
        "text": job.text,
        "attempts": job.attempts,
        "trace_ids": list(job.trace_ids),
        "plan": job.plan.to_json() if job.plan else None,
    }
    path = job_dir(job) / SIDECAR
    body = json.dumps(data, ensure_ascii=False).encode()
    tmp = path.with_name(f"{SIDECAR}.sfwatch-tmp")  # (removed by claimed_files if left)
    try:
        with tmp.open("wb") as out:
            out.write(body)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # our own file in our own folder: replacing is what we want


def read_sidecar(folder: Path) -> dict[str, Any] | None:
    """What ``write_sidecar`` left in a job folder, if anything readable."""
    try:
        data = json.loads((folder / SIDECAR).read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def adopted_by(job: Job) -> str | None:
    """The sibling instance whose work folder now holds this job's folder, if any."""
    mine = job_dir(job)
    base = mine.parent.parent
    try:
        others = [d for d in base.iterdir() if d.name != mine.parent.name]
    except OSError:
        return None
    for other in others:
        if os.path.lexists(other / job.job_id):
            return other.name
    return None


def release(job: Job) -> None:
    """Remove a finished job's sidecar and (now empty) folders from the work area."""
    folder = job_dir(job)
    (folder / SIDECAR).unlink(missing_ok=True)
    remove_empty_dirs(job.path.parent, folder.parent)
