"""prepare: make a claimed file into what will be uploaded.

1. **identify**: the content's SHA-256 (the ledger's key for never paying twice);
2. **probe** (PyAV): a file without decodable audio fails as ``not_audio``
   before any upload;
3. **fit**: a file larger than ``api.max_upload_bytes``, longer than
   ``api.max_audio_seconds``, or in a container the API may not take (video
   containers, AMR, WMA, AIFF, …) is re-encoded to 16 kHz mono MP3; if it is
   still too long it is split at the quietest moment near each limit. An MP3
   that is only too long is split without re-encoding. ``prepare.transcode``
   (auto | always | never) overrides the choice.

Parts are written to a scratch folder in the work area (same file system,
never watched) and are deterministic: a job resumed after a crash produces the
same parts, so the parts whose transcripts the ledger already holds are skipped.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sfwatch import audio, cores
from sfwatch.config import Config
from sfwatch.errors import PrepareError
from sfwatch.fsutil import sha256_file
from sfwatch.job import Job
from sfwatch.safefs import work_area

#: parts are cut this much short of the duration limit (encoder padding, rounding)
DURATION_MARGIN = 0.98
#: and so that their size stays this far below the byte limit at the target bitrate
SIZE_MARGIN = 0.9


@dataclass(frozen=True)
class Part:
    """One upload: a file to send and the name to send it under."""

    path: Path
    upload_name: str
    #: where it starts in the original, in seconds: its segment times are shifted by it
    offset: float = 0.0


@dataclass(frozen=True)
class Prepared:
    """A job ready for upload, and its parts in transcript order."""

    job: Job
    parts: tuple[Part, ...]
    audio_seconds: float | None = None
    how: str = "as_is"  # as_is | transcoded | split | stream_copy_split


def identify(job: Job) -> Job:
    """Add the content's SHA-256 to the job (reads the whole file once)."""
    try:
        digest = sha256_file(job.path)
    except PermissionError as exc:
        raise PrepareError("unreadable", f"cannot read the file: {exc.strerror}") from exc
    return job.evolve(sha256=digest)


def scratch_dir(job: Job, instance: str) -> Path:
    """Where a job's parts are written: ``<watched>/.sfwatch/tmp/<instance>/<job_id>``."""
    return job.root / ".sfwatch" / "tmp" / instance / job.job_id


@contextmanager
def scratch_folder(job: Job, instance: str) -> Iterator[Path]:
    """The job's scratch folder as ``/proc/self/fd/N`` (reached by handles: safefs.py)."""
    with work_area(job.root).folder(["tmp", instance]) as fd:
        yield Path(f"/proc/self/fd/{fd}") / job.job_id  # (made only when parts are written)


def clean_scratch(job: Job, instance: str) -> None:
    """Remove a job's parts (after it finished, or before a fresh start)."""
    with contextlib.suppress(OSError), work_area(job.root).folder(["tmp", instance]) as tmp:
        shutil.rmtree(job.job_id, dir_fd=tmp)


def prepare(job: Job, config: Config, instance: str, scratch: Path | None = None) -> Prepared:
    """The parts to upload for ``job``, in order (parts are written to ``scratch``)."""
    size = job.signature.size
    if size == 0:
        raise PrepareError("empty", "the file is empty (0 bytes)")
    info = audio.probe(job.path, Path(job.name).suffix)
    api = config.api
    mode = config.prepare.transcode
    too_big = size > api.max_upload_bytes
    too_long = info.duration is not None and info.duration > api.max_audio_seconds
    foreign = not info.accepted_as(Path(job.name).suffix)
    if mode == "never" or (mode == "auto" and not (too_big or too_long or foreign)):
        return Prepared(job, (Part(job.path, job.name),), info.duration)
    max_seconds = max(
        1.0,  # a part must hold some audio, whatever the limits say
        min(
            api.max_audio_seconds * DURATION_MARGIN,
            api.max_upload_bytes * 8 / audio.TARGET_BITRATE * SIZE_MARGIN,
        ),
    )
    scratch = scratch or scratch_dir(job, instance)
    scratch.mkdir(parents=True, exist_ok=True)
    stem = Path(job.name).stem[:150] or "audio"
    duration = info.duration
    cuts: list[float] = []
    copy_only = mode == "auto" and not too_big and not foreign and info.container == "mp3"
    convert = audio.stream_copy if copy_only else audio.transcode
    with cores.wide():  # PyAV's and numpy's work may use a CPU of its own
        if duration is None or duration > max_seconds:
            levels = audio.loudness(job.path)
            duration = len(levels) * audio.BLOCK_SECONDS
            cuts = audio.choose_cuts(levels, max_seconds)
        paths = convert(job.path, lambda i: scratch / f"part{i:03d}.mp3", cuts)
    if not paths:
        raise PrepareError("not_audio", "decoding produced no audio")
    if len(paths) == 1:
        parts: tuple[Part, ...] = (Part(paths[0], f"{stem}.mp3"),)
    else:
        # Part i starts at cut i-1 (cuts at or past the end make no part).
        offsets = [0.0, *cuts]
        parts = tuple(
            Part(p, f"{stem}.part{i + 1:03d}.mp3", offsets[i]) for i, p in enumerate(paths)
        )
    how = "stream_copy_split" if copy_only else ("split" if len(parts) > 1 else "transcoded")
    return Prepared(job, parts, duration, how)
