"""prepare: make a claimed file into what will be uploaded.

Today this identifies the content (SHA-256, which the ledger uses to avoid
paying twice) and refuses files that cannot be audio (empty ones). Probing,
transcoding and splitting with PyAV slot in here: the stage already returns a
list of parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sfwatch.errors import PrepareError
from sfwatch.fsutil import sha256_file
from sfwatch.job import Job


@dataclass(frozen=True)
class Part:
    """One upload: a file to send and the name to send it under."""

    path: Path
    upload_name: str


@dataclass(frozen=True)
class Prepared:
    """A job ready for upload, and its parts in transcript order."""

    job: Job
    parts: tuple[Part, ...]
    audio_seconds: float | None = None


def identify(job: Job) -> Job:
    """Add the content's SHA-256 to the job (reads the whole file once)."""
    try:
        digest = sha256_file(job.path)
    except PermissionError as exc:
        raise PrepareError("unreadable", f"cannot read the file: {exc.strerror}") from exc
    return job.evolve(sha256=digest)


def prepare(job: Job) -> Prepared:
    """The parts to upload for ``job`` (one: the file itself, when it fits the API)."""
    if job.signature.size == 0:
        raise PrepareError("empty", "the file is empty (0 bytes)")
    return Prepared(job=job, parts=(Part(job.path, job.name),))
