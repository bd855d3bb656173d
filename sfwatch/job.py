"""The job record that flows from stage to stage.

A ``Job`` is immutable: each stage returns a new one (``dataclasses.replace``)
instead of changing what an earlier stage handed it, so a job seen in a log line
or a test is exactly what that stage saw.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Self

from sfwatch.subtitles import Timing


@dataclass(frozen=True)
class FileSignature:
    """What settle compares to decide that nobody is writing a file any more."""

    size: int
    mtime_ns: int
    inode: int
    device: int


@dataclass(frozen=True)
class Verdict:
    """A decision to fail the file, kept while the move to failed/ cannot be made."""

    error: Exception
    reason: str | None = None


@dataclass(frozen=True)
class Plan:
    """Where finish will put a job's files, recorded durably before any of them is made.

    Recovery reads it back to tell "finished but not yet recorded" from "lost",
    and to find the temporary files a killed step left (docs/design.md §5).
    """

    #: "done" or "failed"
    kind: str
    #: where the original goes (done/… or failed/…)
    original: Path
    transcript: Path | None = None
    error_file: Path | None = None
    #: for "failed": the fields of the error file
    error: dict[str, Any] | None = None
    #: for "done": the other outputs beside ``transcript`` (``a.srt``, ``a.json``), one stem
    outputs: tuple[Path, ...] = ()

    def to_json(self) -> str:
        """The ledger's (and the job sidecar's) form."""
        return json.dumps(
            {
                "kind": self.kind,
                "original": str(self.original),
                "transcript": str(self.transcript) if self.transcript else None,
                "error_file": str(self.error_file) if self.error_file else None,
                "error": self.error,
                "outputs": [str(p) for p in self.outputs],
            },
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Read back what ``to_json`` wrote."""
        data = json.loads(text)
        return cls(
            kind=str(data["kind"]),
            original=Path(data["original"]),
            transcript=Path(data["transcript"]) if data.get("transcript") else None,
            error_file=Path(data["error_file"]) if data.get("error_file") else None,
            error=data.get("error"),
            # (plans written before outputs existed have none)
            outputs=tuple(Path(p) for p in data.get("outputs") or ()),
        )

    def paths(self) -> tuple[Path, ...]:
        """Every name this plan makes."""
        named = (self.transcript, *self.outputs, self.error_file, self.original)
        return tuple(p for p in named if p)

    def written(self) -> tuple[Path, ...]:
        """The files a done plan writes beside the audio: the transcript, then the others."""
        return tuple(p for p in (self.transcript, *self.outputs) if p)


@dataclass(frozen=True)
class Job:
    """One dropped file on its way from the inbox to done/ or failed/."""

    job_id: str
    #: the watched folder (``WatchConfig.path``) it arrived in
    root: Path
    #: where it arrived, relative to ``root`` (kept for done/, failed/ and the transcript)
    rel: PurePosixPath
    #: where it is now: the inbox before claim, the work area after
    path: Path
    signature: FileSignature
    sha256: str | None = None
    #: upload attempts charged to this file so far (docs/design.md §1, P3)
    attempts: int = 0
    trace_ids: tuple[str, ...] = ()
    #: the transcript, once an upload returned it (so a failed finish never pays twice)
    text: str | None = None
    #: the transcript's segments, language and duration, when timed outputs asked for them
    timing: Timing | None = None
    #: service-side failures in a row (drives this file's backoff; not charged)
    failures: int = 0
    #: why the last attempt failed, if it did
    last_reason: str | None = None
    #: monotonic time since which another upload's success would show the service works
    window_start: float = 0.0
    #: unexpected exceptions (our bugs) on this file; ``lifecycle.CRASH_LIMIT`` fail it
    crashes: int = 0
    #: monotonic time of the claim (for duration_ms)
    claimed_at: float = 0.0
    #: the file has been judged (e.g. a 400) but could not be moved to failed/ yet:
    #: the next try only moves it, it does not upload again
    verdict: Verdict | None = None
    #: where finish puts things, once chosen (recorded in the ledger first)
    plan: Plan | None = None

    @property
    def source(self) -> Path:
        """Where the file arrived in the inbox."""
        return self.root / self.rel

    @property
    def identity(self) -> tuple[int, int]:
        """(device, inode) of the claimed file: a link() keeps it, so a moved file is found."""
        return (self.signature.device, self.signature.inode)

    @property
    def name(self) -> str:
        """The file's own name as it arrived."""
        return self.rel.name

    def evolve(self, **changes: object) -> Self:
        """Return a copy with ``changes`` applied (the record itself never changes)."""
        # What dataclasses.replace does (Job has no __post_init__ to run), without its
        # call of __init__ through every field: a job evolves a dozen times on its way
        # (docs/benchmarks.md, "Third look").
        if unknown := changes.keys() - _JOB_FIELDS:
            raise TypeError(f"Job has no field {min(unknown)!r}")
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__, **changes)
        return copy


#: the names ``Job.evolve`` may change
_JOB_FIELDS = frozenset(field.name for field in dataclasses.fields(Job))


def new_job_id() -> str:
    """A short, unique, file-name-safe id for a job (also names its work folder)."""
    return secrets.token_hex(6)
