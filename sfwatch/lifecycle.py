"""The life of a job: outcome kinds (placeholder until decide() lands)."""

from __future__ import annotations

from enum import StrEnum


class OutcomeKind(StrEnum):
    """What one attempt at a job came to."""

    DONE = "done"
    DEDUP = "dedup"
    FAILED = "failed"
    ERROR = "error"
    CHANGED = "changed"
    FINISH_ERROR = "finish_error"
    VANISHED = "vanished"
    CRASH = "crash"
    FENCED = "fenced"
