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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sfwatch.config import WatchConfig
from sfwatch.fsutil import (
    free_stems,
    fsync_dir,
    move_no_replace,
    same_content,
    temp_name,
    write_new_file,
)
from sfwatch.job import Job, Plan

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
            return _carry_out_done(job, data, plan, guard)
        except PlanConflict:
            undo(job, plan, data)
            plan = None
    raise PlanConflict(f"no free name for {job.rel} after {MAX_PLANS} tries")


def _carry_out_done(job: Job, data: bytes, plan: Plan, guard: Callable[[], None]) -> Placed:
    assert plan.transcript is not None  # noqa: S101 - a done plan always names one
    guard()
    _write_once(plan.transcript, data, job.job_id, lambda p: holds_bytes(p, data))
    guard()
    original = place_original(job, plan.original)
    return Placed(original=original, transcript=plan.transcript)


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
            return _carry_out_failed(job, plan, guard)
        except PlanConflict:
            undo(job, plan, b"")
            plan = None
    raise PlanConflict(f"no free name for {job.rel} after {MAX_PLANS} tries")


def _carry_out_failed(job: Job, plan: Plan, guard: Callable[[], None]) -> Placed:
    assert plan.error_file is not None  # noqa: S101 - a failed plan always names one
    body = error_body(job, plan.error or {})
    guard()
    _write_once(plan.error_file, body, job.job_id, lambda p: is_our_error_file(p, job.job_id))
    guard()
    original = place_original(job, plan.original)
    return Placed(original=original, error_file=plan.error_file)


def _write_once(path: Path, data: bytes, tag: str, ours: Callable[[Path], bool]) -> None:
    """Create ``path`` unless an earlier run of this step already did."""
    temp_name(path, tag).unlink(missing_ok=True)  # a killed earlier write's leftover
    if ours(path):
        return
    try:
        write_new_file(path, data, tag=tag)
    except FileExistsError as exc:
        raise PlanConflict(str(path)) from exc


def place_original(job: Job, target: Path) -> Path:
    """Move the claimed file to ``target``; accept it there if an earlier try moved it.

    FileNotFoundError when the file is neither claimed nor at ``target`` (a
    person removed it, or a sibling daemon adopted the job).
    """
    temp_name(target, job.job_id).unlink(missing_ok=True)  # a killed copy's leftover

    def held() -> bool:
        return same_content(target, job.signature.size, job.identity, job.sha256)

    if not os.path.lexists(job.path):
        if held():
            return target  # moved by an earlier try that did not get to record it
        raise FileNotFoundError(2, "the claimed file is gone from the work area", str(job.path))
    try:
        move_no_replace(job.path, target, tag=job.job_id)
    except FileExistsError as exc:
        if not held():
            raise PlanConflict(str(target)) from exc
        # Killed between link() (or the copy) and unlink() last time: it is there.
        job.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            fsync_dir(job.path.parent)
    return target


def undo(job: Job, plan: Plan, transcript: bytes) -> None:
    """Remove what an abandoned plan made of ours (never a stranger's file), and its temps."""
    if plan.transcript is not None and holds_bytes(plan.transcript, transcript):
        plan.transcript.unlink(missing_ok=True)
    if plan.error_file is not None and is_our_error_file(plan.error_file, job.job_id):
        plan.error_file.unlink(missing_ok=True)
    remove_temps(job.job_id, plan)


def remove_temps(job_id: str, plan: Plan) -> None:
    """Remove the tagged temporary files a killed step of ``plan`` may have left."""
    for path in plan.paths():
        with contextlib.suppress(OSError):
            temp_name(path, job_id).unlink(missing_ok=True)


def holds_bytes(path: Path, data: bytes) -> bool:
    """Is ``path`` a regular file holding exactly ``data``?"""
    try:
        st = path.lstat()
        return stat.S_ISREG(st.st_mode) and st.st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def is_our_error_file(path: Path, job_id: str) -> bool:
    """Is ``path`` an error file that this job wrote?"""
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return False
        return bool(json.loads(path.read_bytes()).get("job_id") == job_id)
    except (OSError, ValueError, AttributeError):
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
