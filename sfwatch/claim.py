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
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from sfwatch.errors import PrepareError
from sfwatch.fsutil import link_or_rename_at, write_and_close
from sfwatch.job import FileSignature, Job, Plan, new_job_id
from sfwatch.safefs import PRIVATE_DIR, WORK_AREA, folder, fsync_fd, open_below, work_area
from sfwatch.settle import SettledFile
from sfwatch.subtitles import Timing


def instance_dir(work_dir: Path, instance: str) -> Path:
    """This daemon's own folder in a watched folder's work area."""
    return work_dir / "work" / instance


#: in a job's folder: what a sibling needs to finish the job without paying again
SIDECAR = ".sfwatch-job.json"


def work_parts(job: Job) -> tuple[str, ...]:
    """Where a claimed file is below ``<root>/.sfwatch``: ``work, <instance>, <job_id>, …``.

    Cut from the paths' parts (parsed once per path), not made with ``relative_to``:
    asked several times a file, and paths cost more than the system calls they name
    (docs/benchmarks.md).
    """
    parts, base = job.path.parts, len(job.root.parts)
    if parts[base : base + 1] != (WORK_AREA,) or parts[:base] != job.root.parts:
        raise ValueError(f"{job.path} is not in {job.root / WORK_AREA}")
    return parts[base + 1 :]


def _work_parts_or_none(job: Job) -> tuple[str, ...] | None:
    """``work_parts``, or None for a path that is not a claimed file's (an old or
    damaged ledger row)."""
    try:
        parts = work_parts(job)
    except ValueError:
        return None
    return parts if len(parts) == len(job.rel.parts) + 3 else None  # (work, instance, id)


def claim(
    settled: SettledFile, work_dir: Path, instance: str, job_id: str | None = None
) -> Job | None:
    """Rename the file into this instance's work folder; None if it changed or is gone.

    ``job_id`` names the job (and its work folder); a new one if not given.

    Done on folder handles (safefs.py): the source's folders are opened without
    following links, the entry must still be the regular file that settled
    (same device and inode, size and mtime), and the rename goes from handle to
    handle, so swapping a folder for a symlink at any moment cannot make us take
    a file from elsewhere. What the rename took is checked once more: anything
    but the settled file is put back.
    """
    rel = PurePosixPath(settled.path.relative_to(settled.root).as_posix())
    name = rel.name
    job_id = job_id or new_job_id()
    dest = instance_dir(work_dir, instance) / job_id / rel
    job = Job(job_id=job_id, root=settled.root, rel=rel, path=dest, signature=settled.signature)
    try:
        source = open_below(settled.root, rel.parent.parts)
    except FileNotFoundError:
        return None
    try:
        if _signature_at(source, name) != settled.signature:
            return None  # written to since it settled, gone, or not a regular file now
        with work_area(settled.root).folder(["work", instance]) as mine:
            # The new folders and the rename are made durable later, before the job's first
            # durable ledger write (``make_durable``): not on the way to the upload.
            target = open_below(
                mine, [job_id, *rel.parent.parts], create=True, mode=PRIVATE_DIR, durable=False
            )
            try:
                if not _rename(source, target, mine, job):
                    return None
                if _signature_at(target, name) != settled.signature:
                    _put_back(target, name, source)
                    return None
            finally:
                os.close(target)
    finally:
        os.close(source)
    return job


def make_durable(job: Job) -> None:
    """fsync what a claim changed: its new folders in their parents, the file's new
    entry and its old one (docs/design.md §5.1).

    Called before the job's first durable ledger write, which must not outlive (on a
    power loss) the claim it is about. Until then a power loss is as a crash right
    after the rename: the file is in the inbox or in the work area, both recovered.
    Errors are ignored: the rename has happened, the file is ours whatever the
    fsyncs say (and a failure here must not make us forget a claim).
    """
    with contextlib.suppress(OSError):
        with job_folder(job, work_parts(job)[: -len(job.rel.parts) - 1]) as fd:
            level = os.dup(fd)
        try:
            fsync_fd(level)  # (the instance folder: the job folder's entry)
            for part in [job.job_id, *job.rel.parent.parts]:
                child = open_below(level, [part])
                os.close(level)
                level = child
                fsync_fd(level)
        finally:
            os.close(level)
        with folder(job.root, job.rel.parent.parts) as source:
            fsync_fd(source)


def _rename(source: int, target: int, mine: int, job: Job) -> bool:
    """The claim's rename; False if another daemon was faster."""
    name = job.rel.name
    try:
        os.rename(name, name, src_dir_fd=source, dst_dir_fd=target)
    except OSError as exc:
        if _lexists_at(target, name):
            return True  # the rename happened after all (an NFS reply lost and retried)
        _remove_empty(mine, job.job_id)  # only our own empty folders; never a file
        if isinstance(exc, FileNotFoundError):
            return False
        if exc.errno == errno.EXDEV:
            raise OSError(
                exc.errno, "work area is on another file system than the file", str(job.path)
            ) from exc
        raise
    return True


def _signature_at(dfd: int, name: str) -> FileSignature | None:
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return FileSignature(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def _lexists_at(dfd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except OSError:
        return False
    return True


def _put_back(target: int, name: str, source: int) -> None:
    """Return what a claim took by mistake (swapped in after our check) to where it was."""
    with contextlib.suppress(OSError):
        link_or_rename_at(target, name, source, name)
        os.unlink(name, dir_fd=target)


def _remove_empty(mine: int, job_id: str) -> None:
    """Remove a job folder that holds no file (finished, or a claim that did not happen)."""
    if not _holds_files(mine, job_id):
        with contextlib.suppress(OSError):
            shutil.rmtree(job_id, dir_fd=mine)


def _holds_files(mine: int, job_id: str) -> bool:
    try:
        with folder(mine, [job_id]) as fd:
            return any(files for _, _, files, _ in os.fwalk(dir_fd=fd))
    except OSError:
        return True  # not sure: keep it


def claimed_files(work_dir: Path, instance: str, root: Path) -> Iterator[Job]:
    """The jobs an earlier run of this instance (or an adopted one) left in its work folder.

    Walked on folder handles; only regular files are jobs (a symlink or a device
    is never taken), and only job folders owned by our user are looked into. A
    job folder whose file has already moved out but whose sidecar names a plan
    is yielded too (its ``path`` no longer exists): finish accepts the file where
    the plan put it.
    """
    del work_dir  # (always <root>/.sfwatch: the WorkArea reaches it by handles)
    base = root / WORK_AREA / "work" / instance
    try:
        mine = work_area(root).open(["work", instance], create=False)
    except OSError:
        return  # none yet, or refused (the WorkArea logged why, once)
    try:
        for entry in sorted(os.listdir(mine)):  # noqa: PTH208 - a handle, not a path
            if entry.startswith("."):
                continue
            yield from _jobs_in(mine, entry, root, base / entry)
    finally:
        os.close(mine)


def _jobs_in(mine: int, entry: str, root: Path, where: Path) -> Iterator[Job]:
    try:
        st = os.stat(entry, dir_fd=mine, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            return  # not a job folder of ours: never taken
        jfd = open_below(mine, [entry])
    except OSError:
        return
    found: list[Job] = []
    try:
        sidecar = _read_sidecar_at(jfd)
        for top, _dirs, names, tfd in os.fwalk(dir_fd=jfd):
            for name in names:
                if top == "." and name == SIDECAR:
                    continue
                if name.startswith(".") and name.endswith(".sfwatch-tmp"):
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=tfd)  # a temp file of ours, not the user's
                    continue
                sig = _signature_at(tfd, name)
                if sig is None:
                    continue
                rel = PurePosixPath(top) / name
                job = Job(job_id=entry, root=root, rel=rel, path=where / rel, signature=sig)
                found.append(_with_sidecar(job, sidecar))
        if not found and sidecar is not None and sidecar.get("plan"):
            rel = PurePosixPath(sidecar["rel"])
            sig = FileSignature(
                size=int(sidecar["size"]),
                mtime_ns=0,
                inode=int(sidecar["inode"]),
                device=int(sidecar["device"]),
            )
            job = Job(job_id=entry, root=root, rel=rel, path=where / rel, signature=sig)
            found.append(_with_sidecar(job, sidecar))
        elif not found and sidecar is None:
            _remove_empty(mine, entry)  # a claim that never happened
    finally:
        os.close(jfd)
    yield from found


def _with_sidecar(job: Job, sidecar: dict[str, Any] | None) -> Job:
    """The job as its sidecar describes it (text, hash, plan), when it has one."""
    if sidecar is None or sidecar.get("rel") != str(job.rel):
        return job
    return job.evolve(
        sha256=sidecar.get("sha256"),
        text=sidecar.get("text"),
        timing=Timing.from_dict(sidecar.get("timing")),
        attempts=int(sidecar.get("attempts") or 0),
        trace_ids=tuple(sidecar.get("trace_ids") or ()),
        plan=Plan.from_json(sidecar["plan"]) if sidecar.get("plan") else None,
    )


@contextmanager
def job_folder(job: Job, parts: Sequence[str] | None = None) -> Iterator[int]:
    """A handle of the job's folder in the work area (or of ``.sfwatch/<parts>``)."""
    if parts is None:
        parts = work_parts(job)[: -len(job.rel.parts)]
    with work_area(job.root).folder(parts, create=False) as fd:
        yield fd


@contextmanager
def reading(job: Job) -> Iterator[Path]:
    """The claimed file, opened without following links, as a path that reaches it alone.

    ``/proc/self/fd/N`` names the open file itself: PyAV and the upload can open
    it by name, and no rename or symlink in the share can make that name lead
    anywhere else. PrepareError ``unreadable`` when our user may not read it.
    """
    with job_folder(job, work_parts(job)[:-1]) as pfd:
        try:
            fd = os.open(
                job.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=pfd
            )
        except PermissionError as exc:
            raise PrepareError("unreadable", f"cannot read the file: {exc.strerror}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "the claimed file is not a regular file", str(job.path))
        yield Path(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def write_sidecar(job: Job) -> None:
    """Leave what a sibling needs in the job's folder: the paid text and the plan."""
    data = {
        "rel": str(job.rel),
        "size": job.signature.size,
        "inode": job.signature.inode,
        "device": job.signature.device,
        "sha256": job.sha256,
        "text": job.text,
        "timing": job.timing.to_dict() if job.timing is not None else None,
        "attempts": job.attempts,
        "trace_ids": list(job.trace_ids),
        "plan": job.plan.to_json() if job.plan else None,
    }
    body = json.dumps(data, ensure_ascii=False).encode()
    tmp = f"{SIDECAR}.sfwatch-tmp"  # (removed by claimed_files if left)
    with job_folder(job) as jfd:
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600, dir_fd=jfd
            )
            write_and_close(fd, body, sync=False)
            # Our own file in our own folder: replacing the older sidecar is what we want.
            os.replace(tmp, SIDECAR, src_dir_fd=jfd, dst_dir_fd=jfd)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=jfd)


def _read_sidecar_at(jfd: int) -> dict[str, Any] | None:
    """What ``write_sidecar`` left in a job folder, if anything readable."""
    try:
        fd = os.open(SIDECAR, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=jfd)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            data = json.loads(f.read(1 << 24))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def adopted_by(job: Job) -> str | None:
    """The sibling instance whose work folder now holds this job's folder, if any."""
    parts = _work_parts_or_none(job)
    if parts is None:
        return None  # (a row whose work path is in no work folder: nobody's to adopt)
    mine = parts[1]
    # A sibling adopts a job by renaming its folder into its own work folder
    # (recovery.py): while the folder is in ours, nobody has. This is asked before
    # every step of every job, so the siblings' folders are listed only when it is not.
    if work_area(job.root).holds_folder(["work", mine], job.job_id):
        return None
    try:
        with work_area(job.root).folder(["work"], create=False) as work:
            for other in os.listdir(work):  # noqa: PTH208 - a handle, not a path
                if other != mine and _lexists_at(work, f"{other}/{job.job_id}"):
                    return other
    except OSError:
        return None
    return None


def release(job: Job) -> None:
    """Remove a finished job's sidecar and (now empty) folders from the work area."""
    parts = _work_parts_or_none(job)
    if parts is None:
        return  # (a row whose work path is in no work folder: nothing of ours to remove)
    instance = parts[1]
    try:
        mine = work_area(job.root).open(["work", instance], create=False)
    except FileNotFoundError:
        return  # nothing left to remove
    try:
        with contextlib.suppress(FileNotFoundError), folder(mine, [job.job_id]) as jfd:
            os.unlink(SIDECAR, dir_fd=jfd)
        _remove_empty(mine, job.job_id)
    finally:
        os.close(mine)
