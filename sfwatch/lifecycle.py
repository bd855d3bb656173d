"""What an attempt's outcome means for its job: one pure decision, no side effects.

The scheduler used to decide and act in the same breath (call the pacer, write the
ledger, log, push onto the heap), so the rules of promise P3 (docs/design.md §1) could only
be tested by running a daemon against a fake API. Here they are one function,
``decide(kind, error, state, ctx)``: it reads an outcome, the job's ``RetryState``
and a ``Context`` (the clock, the pacer's last success, the config's limits, the
jitter) and returns a ``Decision``. The scheduler applies it: it tells the pacer the
decision's ``PacerSignal``, writes the ledger, logs, and queues or drops the job.
Nothing here reads a clock, draws a random number or touches a file, so a table of
rows tests every branch (``tests/test_lifecycle.py``).

The decision table (``f`` = failures in a row, this one included, ``base`` =
``ctx.backoff_base``, ``jitter`` = ``ctx.jitter``, by default ``backoff.full_jitter``)::

    kind          when                    decision                 state              pacer
    ------------  ----------------------  -----------------------  -----------------  ------------
    done          bytes_sent > 0          Finished                 -                  succeeded
    done          nothing uploaded        Finished                 -                  -
    dedup/failed                          Finished                 -                  -
    vanished                              Lost                     -                  -
    changed                               Retry(settle_seconds)    -                  -
    fenced                                Recheck                  -                  -
    deferred      (never sent)            Retry(0)                 -                  -
    error         FileRejected            Fail(None)               attempts+1         succeeded
    error         UnusableResponse twice  Fail(None)               attempts+1         succeeded
    error         AccountError            Park                     -                  account
    error         FieldRejected           Park                     -                  field_rejected
    error         RateLimited             Retry(retry_after or 0)  last_reason        rate_limited
    error         other TransientError    Retry(max(retry_after,   f+1, last_reason,  failed
                                            jitter(f, base, 60)))  window_start=now,
                                                                   attempts+charged
                  ... attempts >= max     Fail("gave_up")          (as above)         failed
    finish_error  (OSError, sqlite3)      Retry(jitter(f,          f+1                -
                                            2*base, 300))
    crash         (a bug of ours)         Retry(as finish_error)   f+1, crashes+1,    -
                                                                   last_reason=crash
                  ... crashes >= limit,   Fail("internal_error")   (as above)         -
                  and not judged

``charged`` is ``reason != "overloaded" and ctx.last_success > state.window_start``:
a transient failure costs an attempt only if another upload succeeded since this
file's previous try, so during an outage files wait for free. A 429 never costs
one; its wait is the pacer's account-wide hold (the scheduler waits ``max(delay,
hold)``: only the pacer knows a hold it drew without a ``Retry-After``).

A ``finish_error`` (disk full, done/ not writable, the ledger locked) is never a
crash: the file keeps its paid transcript and the step is simply tried again. Only
``crash`` (a bug of ours) counts towards ``crash_limit``; a judged job (one whose
only step left is the move to failed/) is never re-judged as ``internal_error``.

``FieldRejected`` (a 400/422 naming a form field the config sends) is the
config's fault, not the file's: every file would get the same answer, so the file
is parked like for an account fault, nothing is charged, and the pacer holds every
upload until a reload (no probe can fix a config).

``fenced``: the owner found its lease stale, or the job's folder gone, before a
visible step, and did not take the step. That is not a failure of the file and
says nothing about the service, so nothing is charged or signalled: ``Recheck``
asks the scheduler to look at the job again after the next lease beat
(``RECHECK_SECONDS``), when the due-time check of the work file tells whether it is
still ours (a sibling that adopted it renamed the folder away: it is then lost to
us) rather than re-running it at once, which would spin while the lease is stale.

``deferred``: the attempt was prepared but never sent: the daemon began to stop,
or the account paused, while it waited for its turn to upload (``slots.py``).
Nothing happened to the file or the service, so it is simply queued again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Self, TypeAlias, assert_never

from sfwatch.backoff import full_jitter
from sfwatch.errors import (
    AccountError,
    FieldRejected,
    FileRejected,
    RateLimited,
    TranscribeError,
    TransientError,
    UnusableResponse,
)
from sfwatch.job import Job

#: the longest wait between tries of a failed upload (before any Retry-After)
UPLOAD_RETRY_CAP = 60.0
#: the longest a job waits between tries of a failing local step (a full disk)
FINISH_RETRY_CAP = 300.0
#: unexpected errors (our bugs) on one file before it is failed as "internal_error"
CRASH_LIMIT = 5
#: a fenced job is looked at again after this long: a lease beat is at most this far off
RECHECK_SECONDS = 2.0


class OutcomeKind(StrEnum):
    """How an attempt ended (``worker.Outcome.kind``, plus the scheduler's own kinds)."""

    DONE = "done"  # uploaded (or transcript known), moved to done/
    DEDUP = "dedup"  # a transcript already paid for was reused, moved to done/
    FAILED = "failed"  # moved to failed/ (a verdict carried out)
    ERROR = "error"  # the upload failed: ``error`` is a TranscribeError
    CHANGED = "changed"  # the file was written to during the upload
    FINISH_ERROR = "finish_error"  # a local step failed (OSError, sqlite3.Error)
    VANISHED = "vanished"  # the claimed file is gone from the work area
    CRASH = "crash"  # an unexpected exception of ours
    FENCED = "fenced"  # the lease/ownership check failed before a visible step
    DEFERRED = "deferred"  # prepared, then not sent: the daemon stops or the account paused


@dataclass(frozen=True)
class RetryState:
    """A job's retry bookkeeping, like urllib3's ``Retry``: never changed, only evolved."""

    #: upload attempts charged to the file (``api.max_attempts`` of them fail it)
    attempts: int = 0
    #: failures in a row, of any kind (drives the backoff; charges nothing)
    failures: int = 0
    #: why the last attempt failed, if it did
    last_reason: str | None = None
    #: monotonic time since which another upload's success would show the service works
    window_start: float = 0.0
    #: unexpected exceptions (our bugs) on this file
    crashes: int = 0

    def evolve(self, **changes: object) -> Self:
        """Return a copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def state_of(job: Job) -> RetryState:
    """The retry bookkeeping a job carries."""
    return RetryState(job.attempts, job.failures, job.last_reason, job.window_start, job.crashes)


def with_state(job: Job, state: RetryState) -> Job:
    """``job`` carrying ``state``."""
    return job.evolve(
        attempts=state.attempts,
        failures=state.failures,
        last_reason=state.last_reason,
        window_start=state.window_start,
        crashes=state.crashes,
    )


class Signal(StrEnum):
    """Which pacer call a decision asks for (``pacing.Pacer``)."""

    NONE = "none"
    SUCCEEDED = "succeeded"  # Pacer.succeeded(): the service answered
    RATE_LIMITED = "rate_limited"  # Pacer.rate_limited(retry_after)
    FAILED = "failed"  # Pacer.failed(reason, retry_after)
    ACCOUNT = "account"  # Pacer.account_failed(reason)
    FIELD_REJECTED = "field_rejected"  # Pacer.hold_for_config(...): until a reload


@dataclass(frozen=True)
class PacerSignal:
    """What the pacer must be told about an outcome, as data."""

    kind: Signal = Signal.NONE
    reason: str | None = None
    retry_after: float | None = None

    @classmethod
    def succeeded(cls) -> PacerSignal:
        """The service works (it transcribed or judged a file)."""
        return cls(Signal.SUCCEEDED)

    @classmethod
    def rate_limited(cls, retry_after: float | None) -> PacerSignal:
        """A 429."""
        return cls(Signal.RATE_LIMITED, None, retry_after)

    @classmethod
    def failed(cls, reason: str, retry_after: float | None) -> PacerSignal:
        """A service-side failure."""
        return cls(Signal.FAILED, reason, retry_after)

    @classmethod
    def account(cls, reason: str) -> PacerSignal:
        """An account fault: pause every upload."""
        return cls(Signal.ACCOUNT, reason)

    @classmethod
    def field_rejected(cls, key: str) -> PacerSignal:
        """The server refused a configured field (``key``): hold every upload until a reload."""
        return cls(Signal.FIELD_REJECTED, key)


NO_SIGNAL = PacerSignal()


@dataclass(frozen=True)
class Finished:
    """The job is over (done/ or failed/): count it, log it."""

    signal: PacerSignal = NO_SIGNAL


@dataclass(frozen=True)
class Lost:
    """The job's file is gone from the work area: record it lost."""

    signal: PacerSignal = NO_SIGNAL


@dataclass(frozen=True)
class Recheck:
    """Nothing happened (fenced): look again after ``delay``, state untouched."""

    delay: float = RECHECK_SECONDS
    signal: PacerSignal = NO_SIGNAL


@dataclass(frozen=True)
class Retry:
    """Run the job again after ``delay`` seconds, with ``state``."""

    delay: float
    state: RetryState
    signal: PacerSignal = NO_SIGNAL


@dataclass(frozen=True)
class Park:
    """Wait for the account pause to lift; no delay of its own (the pacer gates starts)."""

    state: RetryState
    signal: PacerSignal = NO_SIGNAL


@dataclass(frozen=True)
class Fail:
    """Send the file to failed/; ``reason`` overrides the error's own, if given."""

    reason: str | None
    state: RetryState
    signal: PacerSignal = NO_SIGNAL


Decision: TypeAlias = Finished | Lost | Recheck | Retry | Park | Fail


@dataclass(frozen=True)
class Context:
    """What a decision may depend on besides the outcome and the job's state."""

    #: monotonic time of the decision
    now: float
    #: the pacer's last successful upload (monotonic; -inf if none yet)
    last_success: float
    #: ``api.max_attempts``
    max_attempts: int
    #: the unit of every backoff, in seconds (tests shrink it)
    backoff_base: float
    #: the job's folder's ``settle_seconds`` (the wait after a ``changed``)
    settle_seconds: float
    crash_limit: int = CRASH_LIMIT
    #: bytes the attempt uploaded (0: the transcript was known; no proof the service works)
    bytes_sent: int = 0
    #: the job already carries a verdict: only its move to failed/ is left
    judged: bool = False
    #: ``(failures, base, cap) -> delay``
    jitter: Callable[[int, float, float], float] = field(default=full_jitter)


def decide(
    kind: OutcomeKind, error: BaseException | None, state: RetryState, ctx: Context
) -> Decision:
    """What the outcome means for the job (see the table in the module docstring)."""
    match kind:
        case OutcomeKind.DONE:
            return Finished(PacerSignal.succeeded() if ctx.bytes_sent > 0 else NO_SIGNAL)
        case OutcomeKind.DEDUP | OutcomeKind.FAILED:
            return Finished()
        case OutcomeKind.VANISHED:
            return Lost()
        case OutcomeKind.CHANGED:
            return Retry(ctx.settle_seconds, state)
        case OutcomeKind.FENCED:
            return Recheck()
        case OutcomeKind.DEFERRED:
            return Retry(0.0, state)
        case OutcomeKind.FINISH_ERROR:
            state = state.evolve(failures=state.failures + 1)
            return Retry(_local_delay(state, ctx), state)
        case OutcomeKind.CRASH:
            state = state.evolve(
                failures=state.failures + 1, crashes=state.crashes + 1, last_reason="crash"
            )
            if state.crashes >= ctx.crash_limit and not ctx.judged:
                return Fail("internal_error", state)
            return Retry(_local_delay(state, ctx), state)
        case OutcomeKind.ERROR:
            if not isinstance(error, TranscribeError):
                raise TypeError(f"an 'error' outcome without a TranscribeError: {error!r}")
            return _upload_failed(error, state, ctx)
    assert_never(kind)


def _local_delay(state: RetryState, ctx: Context) -> float:
    return ctx.jitter(state.failures, 2.0 * ctx.backoff_base, FINISH_RETRY_CAP)


def _upload_failed(error: TranscribeError, state: RetryState, ctx: Context) -> Decision:
    if isinstance(error, FileRejected) or (
        isinstance(error, UnusableResponse) and state.last_reason == error.reason
    ):
        # The service is up: it judged the file.
        return Fail(None, state.evolve(attempts=state.attempts + 1), PacerSignal.succeeded())
    if isinstance(error, AccountError):
        return Park(state, PacerSignal.account(error.reason))
    if isinstance(error, FieldRejected):
        return Park(state, PacerSignal.field_rejected(error.key))
    if not isinstance(error, TransientError):  # pragma: no cover - the hierarchy is closed
        raise TypeError(error)
    if isinstance(error, RateLimited):
        return Retry(
            error.retry_after or 0.0,
            state.evolve(last_reason=error.reason),
            PacerSignal.rate_limited(error.retry_after),
        )
    charged = error.reason != "overloaded" and ctx.last_success > state.window_start
    signal = PacerSignal.failed(error.reason, error.retry_after)
    state = state.evolve(
        failures=state.failures + 1,
        last_reason=error.reason,
        window_start=ctx.now,
        attempts=state.attempts + int(charged),
    )
    if state.attempts >= ctx.max_attempts:
        return Fail("gave_up", state, signal)
    delay = max(
        error.retry_after or 0.0, ctx.jitter(state.failures, ctx.backoff_base, UPLOAD_RETRY_CAP)
    )
    return Retry(delay, state, signal)
