"""finish: put the transcript where the user expects it, then move the original.

Order matters for promise 1: the transcript is written first (temp file, fsync,
link into place, fsync the folder), and only then is the original moved out of
the work area. A crash in between leaves a complete transcript and the original
still claimed; recovery finishes the move. Names are never overwritten: a taken
name gets `` (1)``, `` (2)``, … and the transcript and the original share it.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sfwatch.config import WatchConfig
from sfwatch.fsutil import free_stems, move_no_replace, numbered, write_new_file
from sfwatch.job import Job

#: a longer "suffix" is part of the stem, so that derived names can be cut to fit
MAX_SUFFIX_BYTES = 32
#: what failed/ puts beside an original's name
ERROR_SUFFIX = ".error.json"


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


def finish_done(
    job: Job,
    text: str,
    watch: WatchConfig,
    transcript_at: Path | None = None,
    plan: Callable[[Path], None] | None = None,
) -> Placed:
    """Write the transcript, then move the original to done/.

    ``transcript_at`` names a transcript an interrupted earlier finish already
    wrote; it is kept instead of writing a second copy. ``plan`` is told each
    name before a transcript is written under it (the ledger records it, so a
    crash right after the write is recognised on resume).
    """
    stem, suffix = _split(job.name)
    tdir = transcript_folder(job, watch)
    ddir = watch.done_dir / job.rel.parent
    data = transcript_bytes(text)
    transcript = transcript_at
    if transcript is None:
        for candidate in free_stems(stem, [(tdir, ".txt"), (ddir, suffix)]):
            if plan is not None:
                plan(tdir / f"{candidate}.txt")
            try:
                write_new_file(tdir / f"{candidate}.txt", data, tag=job.job_id)
            except FileExistsError:
                continue  # taken since we looked: try the next number
            transcript = tdir / f"{candidate}.txt"
            break
    assert transcript is not None  # noqa: S101 - free_stems never ends
    original = _move_original(job, ddir, transcript.stem, suffix)
    return Placed(original=original, transcript=transcript)


def _move_original(job: Job, folder: Path, preferred_stem: str, suffix: str) -> Path:
    """Move the claimed file to ``folder``, under the transcript's stem if it is free."""
    target = folder / f"{preferred_stem}{suffix}"
    try:
        move_no_replace(job.path, target)
    except FileExistsError:
        if _same_file(job.path, target):
            # A crash between link() and unlink() last time: it is already there.
            job.path.unlink()
            return target
    else:
        return target
    for candidate in free_stems(preferred_stem, [(folder, suffix)]):
        target = folder / f"{candidate}{suffix}"
        try:
            move_no_replace(job.path, target)
        except FileExistsError:
            continue
        return target
    raise AssertionError("unreachable")  # pragma: no cover


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def _linked_earlier(job: Job, folder: Path, stem: str, suffix: str) -> Path | None:
    """The name (``a.mp3``, ``a (1).mp3``, …) an interrupted move already gave this file."""
    for n in itertools.count():
        target = folder / numbered(stem, n, suffix, f"{suffix}{ERROR_SUFFIX}")
        if not os.path.lexists(target):
            return None
        if _same_file(job.path, target):
            return target
    return None  # pragma: no cover - count() never ends


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
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def finish_failed(job: Job, error: dict[str, Any], watch: WatchConfig) -> Placed:
    """Move the original to failed/ and write ``<name>.error.json`` beside it."""
    stem, suffix = _split(job.name)
    fdir = watch.failed_dir / job.rel.parent
    earlier = _linked_earlier(job, fdir, stem, suffix)
    if earlier is not None:
        # A crash between link() and unlink() last time: it is already there.
        job.path.unlink()
        target = earlier
    else:
        for candidate in free_stems(stem, [(fdir, suffix), (fdir, f"{suffix}{ERROR_SUFFIX}")]):
            target = fdir / f"{candidate}{suffix}"
            try:
                move_no_replace(job.path, target)
            except FileExistsError:
                continue
            break
    record = error_record(job, error)
    body = (json.dumps(record, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
    error_file: Path | None = None
    try:
        wanted = target.with_name(f"{target.name}{ERROR_SUFFIX}")
        try:
            write_new_file(wanted, body)
        except FileExistsError:  # created since we looked: keep it, put ours beside it
            wanted = fdir / numbered(target.name, 0, f".{job.job_id}{ERROR_SUFFIX}")
            write_new_file(wanted, body)
        error_file = wanted
    except OSError:
        # The original is safe in failed/ already (what matters most); the reason is
        # still in the ledger and the log. Retrying would find the original gone.
        error_file = None
    return Placed(original=target, error_file=error_file)
