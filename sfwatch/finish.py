"""finish: put the transcript where the user expects it, then move the original.

Every finish follows a *plan* (``job.Plan``): the names it will create, chosen
first and recorded durably by the caller (``record``) before anything visible
is made (docs/design.md §5). Then, for a transcribed file:

1. the transcript is written (tagged temp file, fsync, link into place, fsync);
2. the original moves to done/ (link + unlink, or a verified copy across file
   systems).

For a failed file the error file is written first and the original moved
second, so an original in failed/ always has its ``.error.json``.

Each step is idempotent, so a killed or failed finish is simply run again with
the same plan: a name that already holds what the step would put there (the
job's inode, or its size and SHA-256; our transcript's bytes; an error file
naming our job) is accepted as done. A planned name taken by a stranger meanwhile
makes a new plan (``PlanConflict``); names are never overwritten, and the
transcript and the original always share one stem: ``a (1).txt`` beside
``done/a (1).mp3``.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from sfwatch.config import WatchConfig
from sfwatch.fsutil import (
    free_stems,
    make_dirs,
    move_no_replace_at,
    same_content_at,
    temp_leaf,
    write_new_at,
)
from sfwatch.job import Job, Plan
from sfwatch.safefs import anchored, folder, fsync_fd, read_at, work_area

#: a longer "suffix" is part of the stem, so that derived names can be cut to fit
MAX_SUFFIX_BYTES = 32
#: what failed/ puts beside an original's name
ERROR_SUFFIX = ".error.json"
#: new plans tried when strangers keep taking the planned names (each one re-looks)
MAX_PLANS = 50


class PlanConflict(FileExistsError):
    """A planned name was taken by someone else's file before our step made it."""


@dataclass(frozen=True)
class Placed:
    """Where finish put things."""

    original: Path
    transcript: Path | None = None
    error_file: Path | None = None


def transcript_folder(job: Job, watch: WatchConfig) -> Path:
    """The folder the transcript goes to: beside where the audio arrived, or transcript_dir."""
    base = watch.transcript_dir if watch.transcript_dir is not None else watch.path
    return base / job.rel.parent


def transcript_bytes(text: str) -> bytes:
    """UTF-8, ending with exactly one newline."""
    return (text.rstrip("\n") + "\n").encode("utf-8")


def _split(name: str) -> tuple[str, str]:
    path = Path(name)
    if len(os.fsencode(path.suffix)) > MAX_SUFFIX_BYTES:
        return name, ""  # "a.<200 bytes>" has no extension worth keeping whole
    return path.stem, path.suffix


def _nothing(_plan: Plan) -> None:
    return None


def _always() -> None:
    return None


# -- plans -------------------------------------------------------------------------------


def plan_done(job: Job, watch: WatchConfig) -> Plan:
    """Free names for the transcript and the original in done/, sharing one stem."""
    stem, suffix = _split(job.name)
    tdir = transcript_folder(job, watch)
    ddir = watch.done_dir / job.rel.parent
    candidate = next(free_stems(stem, [(tdir, ".txt"), (ddir, suffix)]))
    return Plan(
        "done", original=ddir / f"{candidate}{suffix}", transcript=tdir / f"{candidate}.txt"
    )


def plan_failed(job: Job, watch: WatchConfig, error: dict[str, Any]) -> Plan:
    """Free names for the original in failed/ and its error file."""
    stem, suffix = _split(job.name)
    fdir = watch.failed_dir / job.rel.parent
    candidate = next(free_stems(stem, [(fdir, suffix), (fdir, f"{suffix}{ERROR_SUFFIX}")]))
    target = fdir / f"{candidate}{suffix}"
    return Plan(
        "failed",
        original=target,
        error_file=target.with_name(f"{target.name}{ERROR_SUFFIX}"),
        error=error,
    )


# -- carrying a plan out -----------------------------------------------------------------


def finish_done(
    job: Job,
    text: str,
    watch: WatchConfig,
    *,
    plan: Plan | None = None,
    record: Callable[[Plan], None] = _nothing,
    guard: Callable[[], None] = _always,
) -> Placed:
    """Write the transcript, then move the original to done/, following ``plan``.

    Without a plan (or when a stranger took a planned name) a new one is made
    and passed to ``record`` before any file is written under it. ``guard`` is
    called before each visible step (it raises to stop them).
    """
    data = transcript_bytes(text)
    for _ in range(MAX_PLANS):
        if plan is None or plan.kind != "done":
            plan = plan_done(job, watch)
            record(plan)
        try:
            return _carry_out_done(job, data, plan, watch, guard)
        except PlanConflict:
            undo(job, plan, data, watch)
            plan = None
    raise PlanConflict(f"no free name for {job.rel} after {MAX_PLANS} tries")


def finish_failed(
    job: Job,
    error: dict[str, Any],
    watch: WatchConfig,
    *,
    plan: Plan | None = None,
    record: Callable[[Plan], None] = _nothing,
    guard: Callable[[], None] = _always,
) -> Placed:
    """Write ``<name>.error.json`` in failed/, then move the original beside it."""
    for _ in range(MAX_PLANS):
        if plan is None or plan.kind != "failed":
            plan = plan_failed(job, watch, error)
            record(plan)
        try:
            return _carry_out_failed(job, plan, watch, guard)
        except PlanConflict:
            undo(job, plan, b"", watch)
            plan = None
    raise PlanConflict(f"no free name for {job.rel} after {MAX_PLANS} tries")


def _carry_out_done(
    job: Job, data: bytes, plan: Plan, watch: WatchConfig, guard: Callable[[], None]
) -> Placed:
    assert plan.transcript is not None  # noqa: S101 - a done plan always names one
    guard()
    mode = _source_mode(job, watch)
    with target_folder(plan.transcript, watch) as dfd:
        _write_once(dfd, plan.transcript.name, data, tag=job.job_id, mode=mode, ours=_holds(data))
    guard()
    original = place_original(job, plan.original, watch)
    return Placed(original=original, transcript=plan.transcript)


def _carry_out_failed(
    job: Job, plan: Plan, watch: WatchConfig, guard: Callable[[], None]
) -> Placed:
    assert plan.error_file is not None  # noqa: S101 - a failed plan always names one
    body = error_body(job, plan.error or {})
    guard()
    mode = _source_mode(job, watch)
    with target_folder(plan.error_file, watch) as dfd:
        _write_once(
            dfd, plan.error_file.name, body, tag=job.job_id, mode=mode, ours=_ours(job.job_id)
        )
    guard()
    original = place_original(job, plan.original, watch)
    return Placed(original=original, error_file=plan.error_file)


def _write_once(
    dfd: int, name: str, data: bytes, *, tag: str, mode: int, ours: Callable[[int, str], bool]
) -> None:
    """Create ``name`` unless an earlier run of this step already did."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp_leaf(name, tag), dir_fd=dfd)  # a killed earlier write's leftover
    if ours(dfd, name):
        return
    try:
        write_new_at(dfd, name, data, tag=tag, mode=mode)
    except FileExistsError as exc:
        raise PlanConflict(name) from exc


# -- where things are: folder handles below the configured folders (safefs.py) -----------


def _roots(watch: WatchConfig) -> tuple[Path | None, ...]:
    # The watched folder first: a done/ inside it is reached through the share's entry.
    return (watch.path, watch.done_dir, watch.failed_dir, watch.transcript_dir)


@contextmanager
def target_folder(path: Path, watch: WatchConfig, *, create: bool = True) -> Iterator[int]:
    """A handle of the folder a planned name goes in; no link below the root followed.

    A symlink or a file where a folder must be is an OSError (ELOOP, ENOTDIR):
    the step fails and is tried again later; nothing is written elsewhere.
    """
    root, parts = anchored(path.parent, _roots(watch))
    if create and not root.is_dir():
        make_dirs(root)  # a configured folder (trusted as given) that is not there yet
    with folder(root, parts, create=create) as fd:
        yield fd


@contextmanager
def source_folder(job: Job, watch: WatchConfig) -> Iterator[int]:
    """A handle of the folder in the work area holding the claimed file."""
    parts = PurePosixPath(job.path.parent.relative_to(watch.work_dir).as_posix()).parts
    with work_area(watch.path).folder(parts, create=False) as fd:
        yield fd


def _source_mode(job: Job, watch: WatchConfig) -> int:
    """The recording's permission bits: what we write for it gets no more (0600 if gone)."""
    try:
        with source_folder(job, watch) as sfd:
            st = os.stat(job.name, dir_fd=sfd, follow_symlinks=False)
    except OSError:
        return 0o600
    return stat.S_IMODE(st.st_mode) & 0o666


def place_original(job: Job, target: Path, watch: WatchConfig) -> Path:
    """Move the claimed file to ``target``; accept it there if an earlier try moved it.

    FileNotFoundError when the file is neither claimed nor at ``target`` (a
    person removed it, or a sibling daemon adopted the job).
    """
    with target_folder(target, watch) as dfd:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_leaf(target.name, job.job_id), dir_fd=dfd)  # a killed copy's

        def held() -> bool:
            return same_content_at(dfd, target.name, job.signature.size, job.identity, job.sha256)

        try:
            with source_folder(job, watch) as sfd:
                try:
                    move_no_replace_at(sfd, job.name, dfd, target.name, tag=job.job_id)
                except FileExistsError as exc:
                    if not held():
                        raise PlanConflict(str(target)) from exc
                    # Killed between link() (or the copy) and unlink() last time: it is there.
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(job.name, dir_fd=sfd)
                    with contextlib.suppress(OSError):
                        fsync_fd(sfd)
        except FileNotFoundError:
            if held():
                return target  # moved by an earlier try that did not get to record it
            raise FileNotFoundError(
                2, "the claimed file is gone from the work area", str(job.path)
            ) from None
    return target


def undo(job: Job, plan: Plan, transcript: bytes, watch: WatchConfig) -> None:
    """Remove what an abandoned plan made of ours (never a stranger's file), and its temps."""
    made = [(plan.transcript, _holds(transcript)), (plan.error_file, _ours(job.job_id))]
    for path, ours in made:
        if path is None:
            continue
        with contextlib.suppress(OSError), target_folder(path, watch, create=False) as dfd:
            if ours(dfd, path.name):
                os.unlink(path.name, dir_fd=dfd)
    remove_temps(job.job_id, plan, watch)


def remove_temps(job_id: str, plan: Plan, watch: WatchConfig) -> None:
    """Remove the tagged temporary files a killed step of ``plan`` may have left."""
    for path in plan.paths():
        with contextlib.suppress(OSError), target_folder(path, watch, create=False) as dfd:
            os.unlink(temp_leaf(path.name, job_id), dir_fd=dfd)


def _holds(data: bytes) -> Callable[[int, str], bool]:
    """Is ``name`` in a folder a regular file holding exactly ``data``?"""

    def check(dfd: int, name: str) -> bool:
        try:
            return read_at(dfd, name, len(data) + 1) == data
        except OSError:
            return False

    return check


def _ours(job_id: str) -> Callable[[int, str], bool]:
    """Is ``name`` in a folder an error file that this job wrote?"""

    def check(dfd: int, name: str) -> bool:
        try:
            return bool(json.loads(read_at(dfd, name)).get("job_id") == job_id)
        except (OSError, ValueError, AttributeError):
            return False

    return check


def holds_bytes(path: Path, data: bytes) -> bool:
    """Is ``path`` a regular file holding exactly ``data``?"""
    try:
        with folder(path.parent, ()) as dfd:
            return _holds(data)(dfd, path.name)
    except OSError:
        return False


def is_our_error_file(path: Path, job_id: str) -> bool:
    """Is ``path`` an error file that this job wrote?"""
    try:
        with folder(path.parent, ()) as dfd:
            return _ours(job_id)(dfd, path.name)
    except OSError:
        return False


def error_record(job: Job, error: dict[str, Any]) -> dict[str, Any]:
    """The content of ``<name>.error.json``."""
    return {
        "file": str(job.rel),
        "reason": error.get("reason"),
        "message": error.get("message"),
        "http_status": error.get("http_status"),
        "api_message": error.get("api_message"),
        "trace_id": error.get("trace_id"),
        "trace_ids": list(job.trace_ids),
        "attempts": job.attempts,
        "sha256": job.sha256,
        "job_id": job.job_id,
        "time": error.get("time") or datetime.now(UTC).isoformat(timespec="seconds"),
    }


def error_body(job: Job, error: dict[str, Any]) -> bytes:
    """``error_record`` as the bytes of the file."""
    return (json.dumps(error_record(job, error), ensure_ascii=False, indent=2) + "\n").encode()
