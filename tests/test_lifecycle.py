"""The job-lifecycle decision: every row of ``lifecycle.py``'s table, then the scheduler.

``decide`` is pure, so each branch is one row: an outcome, the job's retry state
and a context go in, one decision (its type, state, delay and pacer signal, compared
whole) comes out. The jitter is the backoff's ceiling, so delays are exact.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from sfwatch.config import Secret, load_config
from sfwatch.errors import (
    AccountError,
    FieldRejected,
    FileRejected,
    RateLimited,
    TransientError,
    UnusableResponse,
)
from sfwatch.job import FileSignature, Job, Verdict
from sfwatch.ledger import TERMINAL, JobStatus, Ledger
from sfwatch.lifecycle import (
    FINISH_RETRY_CAP,
    RECHECK_SECONDS,
    UPLOAD_RETRY_CAP,
    Context,
    Decision,
    Fail,
    Finished,
    Lost,
    OutcomeKind,
    PacerSignal,
    Park,
    Recheck,
    Retry,
    RetryState,
    decide,
    state_of,
    with_state,
)
from sfwatch.pacing import Pacer
from sfwatch.scheduler import Scheduler
from sfwatch.transcribe import Transcriber
from sfwatch.worker import Outcome, Worker
from tests.conftest import API_KEY, write_config

NOW = 1000.0
NEVER = float("-inf")


def ceiling(failures: int, base: float, cap: float) -> float:
    """A deterministic jitter: the top of full jitter's range."""
    return min(cap, base * 2.0 ** (failures - 1))


CTX = Context(
    now=NOW,
    last_success=NEVER,
    max_attempts=3,
    backoff_base=1.0,
    settle_seconds=3.0,
    crash_limit=3,
    jitter=ceiling,
)
#: another upload succeeded since the job's window opened (at 0.0)
SUCCESS_SINCE = {"last_success": 500.0}

E500 = TransientError("HTTP 500", http_status=500, reason="server_error")
OVERLOADED = TransientError("HTTP 503 (50505)", http_status=503, reason="overloaded")
SLOW_DOWN = TransientError("HTTP 503", http_status=503, reason="server_error", retry_after=30.0)
E429 = RateLimited("HTTP 429", http_status=429, retry_after=7.0)
E429_NO_HINT = RateLimited("HTTP 429", http_status=429)
E400 = FileRejected("HTTP 400", http_status=400, reason="api_rejected")
E401 = AccountError("HTTP 401", http_status=401, reason="invalid_key")
E400_FIELD = FieldRejected(
    "HTTP 400: 'language'", http_status=400, field="language", key="watch[0].request.language"
)
NO_TEXT = UnusableResponse("a 200 without text", http_status=200)
DISK_FULL = OSError(28, "No space left on device")
BUG = KeyError("oops")

S0 = RetryState()
FAILED_500 = PacerSignal.failed("server_error", None)

ROWS: list[tuple[str, OutcomeKind, BaseException | None, RetryState, dict[str, Any], Decision]] = [
    # -- finished ---------------------------------------------------------------------
    (
        "done-uploaded",
        OutcomeKind.DONE,
        None,
        S0,
        {"bytes_sent": 1},
        Finished(PacerSignal.succeeded()),
    ),
    ("done-known-text", OutcomeKind.DONE, None, S0, {}, Finished()),
    ("dedup", OutcomeKind.DEDUP, None, S0, {"bytes_sent": 0}, Finished()),
    ("failed", OutcomeKind.FAILED, E400, S0, {}, Finished()),
    ("vanished", OutcomeKind.VANISHED, FileNotFoundError(), S0, {}, Lost()),
    # -- nothing of the file's doing -------------------------------------------------
    (
        "changed",
        OutcomeKind.CHANGED,
        None,
        RetryState(attempts=1),
        {},
        Retry(3.0, RetryState(attempts=1)),
    ),
    ("fenced", OutcomeKind.FENCED, None, RetryState(failures=2), {}, Recheck(RECHECK_SECONDS)),
    (
        "deferred",
        OutcomeKind.DEFERRED,
        None,
        RetryState(attempts=1, failures=2),
        {},
        Retry(0.0, RetryState(attempts=1, failures=2)),
    ),
    # -- the file's own fault ----------------------------------------------------------
    (
        "400",
        OutcomeKind.ERROR,
        E400,
        S0,
        {},
        Fail(None, RetryState(attempts=1), PacerSignal.succeeded()),
    ),
    (
        "unusable-first",
        OutcomeKind.ERROR,
        NO_TEXT,
        S0,
        {},
        Retry(
            1.0,
            RetryState(failures=1, last_reason="unusable_response", window_start=NOW),
            PacerSignal.failed("unusable_response", None),
        ),
    ),
    (
        "unusable-twice",
        OutcomeKind.ERROR,
        NO_TEXT,
        RetryState(failures=1, last_reason="unusable_response"),
        {},
        Fail(
            None,
            RetryState(attempts=1, failures=1, last_reason="unusable_response"),
            PacerSignal.succeeded(),
        ),
    ),
    # -- the account ---------------------------------------------------------------------
    (
        "401",
        OutcomeKind.ERROR,
        E401,
        RetryState(attempts=1),
        SUCCESS_SINCE,
        Park(RetryState(attempts=1), PacerSignal.account("invalid_key")),
    ),
    # -- the config: a field the server refuses is no file's fault -----------------------
    (
        "400-field-rejected",
        OutcomeKind.ERROR,
        E400_FIELD,
        RetryState(attempts=1),
        SUCCESS_SINCE,
        Park(RetryState(attempts=1), PacerSignal.field_rejected("watch[0].request.language")),
    ),
    # -- rate limits: never charged -----------------------------------------------------
    (
        "429-retry-after",
        OutcomeKind.ERROR,
        E429,
        RetryState(attempts=1),
        SUCCESS_SINCE,
        Retry(
            7.0, RetryState(attempts=1, last_reason="rate_limited"), PacerSignal.rate_limited(7.0)
        ),
    ),
    (
        "429-pacer-hold",
        OutcomeKind.ERROR,
        E429_NO_HINT,
        S0,
        {},
        Retry(0.0, RetryState(last_reason="rate_limited"), PacerSignal.rate_limited(None)),
    ),
    # -- other transient failures --------------------------------------------------------
    (
        "500-in-an-outage-is-free",
        OutcomeKind.ERROR,
        E500,
        RetryState(attempts=2, window_start=600.0),
        SUCCESS_SINCE,
        Retry(
            1.0,
            RetryState(attempts=2, failures=1, last_reason="server_error", window_start=NOW),
            FAILED_500,
        ),
    ),
    (
        "500-while-others-succeed-is-charged",
        OutcomeKind.ERROR,
        E500,
        RetryState(attempts=1, failures=1),
        SUCCESS_SINCE,
        Retry(
            2.0,
            RetryState(attempts=2, failures=2, last_reason="server_error", window_start=NOW),
            FAILED_500,
        ),
    ),
    (
        "overloaded-is-never-charged",
        OutcomeKind.ERROR,
        OVERLOADED,
        S0,
        SUCCESS_SINCE,
        Retry(
            1.0,
            RetryState(failures=1, last_reason="overloaded", window_start=NOW),
            PacerSignal.failed("overloaded", None),
        ),
    ),
    (
        "retry-after-outranks-a-shorter-backoff",
        OutcomeKind.ERROR,
        SLOW_DOWN,
        S0,
        {},
        Retry(
            30.0,
            RetryState(failures=1, last_reason="server_error", window_start=NOW),
            PacerSignal.failed("server_error", 30.0),
        ),
    ),
    (
        "backoff-is-capped",
        OutcomeKind.ERROR,
        E500,
        RetryState(failures=20),
        {},
        Retry(
            UPLOAD_RETRY_CAP,
            RetryState(failures=21, last_reason="server_error", window_start=NOW),
            FAILED_500,
        ),
    ),
    (
        "gave-up-at-max-attempts",
        OutcomeKind.ERROR,
        E500,
        RetryState(attempts=2, failures=4),
        SUCCESS_SINCE,
        Fail(
            "gave_up",
            RetryState(attempts=3, failures=5, last_reason="server_error", window_start=NOW),
            FAILED_500,
        ),
    ),
    (
        "free-failures-never-give-up",
        OutcomeKind.ERROR,
        E500,
        RetryState(attempts=2, failures=4, window_start=600.0),
        SUCCESS_SINCE,
        Retry(
            16.0,
            RetryState(attempts=2, failures=5, last_reason="server_error", window_start=NOW),
            FAILED_500,
        ),
    ),
    # -- a local step failed: not the file's fault, not a crash ---------------------------
    (
        "finish-error",
        OutcomeKind.FINISH_ERROR,
        DISK_FULL,
        RetryState(attempts=1, failures=2, last_reason="server_error"),
        {},
        Retry(8.0, RetryState(attempts=1, failures=3, last_reason="server_error")),
    ),
    (
        "finish-error-after-crashes-is-no-crash",
        OutcomeKind.FINISH_ERROR,
        DISK_FULL,
        RetryState(failures=9, last_reason="crash", crashes=2),
        {},
        Retry(FINISH_RETRY_CAP, RetryState(failures=10, last_reason="crash", crashes=2)),
    ),
    # -- our bugs --------------------------------------------------------------------------
    (
        "crash",
        OutcomeKind.CRASH,
        BUG,
        RetryState(attempts=1),
        {},
        Retry(2.0, RetryState(attempts=1, failures=1, last_reason="crash", crashes=1)),
    ),
    (
        "crash-limit",
        OutcomeKind.CRASH,
        BUG,
        RetryState(failures=2, crashes=2),
        {},
        Fail("internal_error", RetryState(failures=3, last_reason="crash", crashes=3)),
    ),
    (
        "crash-limit-judged-keeps-its-verdict",
        OutcomeKind.CRASH,
        BUG,
        RetryState(failures=2, crashes=2),
        {"judged": True},
        Retry(8.0, RetryState(failures=3, last_reason="crash", crashes=3)),
    ),
]


@pytest.mark.parametrize(
    ("kind", "error", "state", "changes", "expected"),
    [pytest.param(*row[1:], id=row[0]) for row in ROWS],
)
def test_decide(
    kind: OutcomeKind,
    error: BaseException | None,
    state: RetryState,
    changes: dict[str, Any],
    expected: Decision,
) -> None:
    """Each row of the decision table: type, state (charged attempts), delay, pacer signal."""
    assert decide(kind, error, state, dataclasses.replace(CTX, **changes)) == expected


def test_every_kind_has_a_row() -> None:
    """The table covers every outcome kind."""
    assert {row[1] for row in ROWS} == set(OutcomeKind)


def test_decide_passes_failures_base_and_cap_to_the_jitter() -> None:
    """The jitter gets (failures, base, cap): 60 s for uploads, 2 x base and 300 s locally."""
    calls: list[tuple[int, float, float]] = []

    def record(failures: int, base: float, cap: float) -> float:
        calls.append((failures, base, cap))
        return 0.5

    ctx = dataclasses.replace(CTX, backoff_base=0.25, jitter=record)
    decide(OutcomeKind.ERROR, E500, RetryState(failures=3), ctx)
    decide(OutcomeKind.FINISH_ERROR, DISK_FULL, RetryState(failures=3), ctx)
    decide(OutcomeKind.CRASH, BUG, RetryState(failures=3), ctx)
    assert calls == [(4, 0.25, UPLOAD_RETRY_CAP), *[(4, 0.5, FINISH_RETRY_CAP)] * 2]


def test_an_error_outcome_needs_a_transcribe_error() -> None:
    """An 'error' outcome carrying anything but a TranscribeError is a programming error."""
    with pytest.raises(TypeError):
        decide(OutcomeKind.ERROR, DISK_FULL, S0, CTX)


def test_retry_state_round_trips_through_a_job() -> None:
    """state_of and with_state map the job's fields both ways; nothing else changes."""
    job = _job(Path("/nowhere"))
    state = RetryState(attempts=2, failures=3, last_reason="timeout", window_start=5.0, crashes=1)
    moved = with_state(job, state)
    assert state_of(moved) == state
    assert with_state(moved, RetryState()) == job


def test_only_claimed_is_not_terminal() -> None:
    """Every ledger status but 'claimed' is final."""
    assert set(JobStatus) - TERMINAL == {JobStatus.CLAIMED}


# -- the scheduler applies the decisions, on an injected clock ---------------------------


class Clock:
    """A manual monotonic clock."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def _job(root: Path) -> Job:
    rel = PurePosixPath("a.wav")
    return Job("0123456789ab", root, rel, root / rel, FileSignature(10, 1, 2, 3))


@pytest.fixture
def scheduler(tmp_path: Path) -> Iterator[Scheduler]:
    """A scheduler, pacer and ledger on a manual clock; no daemon, no API."""
    config = load_config(write_config(tmp_path, "http://127.0.0.1:9"))
    clock = Clock()
    ledger = Ledger.in_state_dir(config.state_dir)
    transcriber = Transcriber(config.api.base_url, Secret(API_KEY))
    worker = Worker(config, transcriber, ledger)
    try:
        yield Scheduler(config, Pacer(4, clock=clock), ledger, worker, clock=clock)
    finally:
        transcriber.close()
        ledger.close()


def _claimed(scheduler: Scheduler) -> Job:
    job = _job(scheduler.config.watch[0].path).evolve(claimed_at=NOW, window_start=NOW)
    scheduler.ledger.claimed(job, "local")
    return job


def _clear(scheduler: Scheduler) -> None:
    """Forget every waiting job (both heaps)."""
    scheduler.uploads.clear()
    scheduler.local.clear()


def _again(scheduler: Scheduler, outcome: Outcome) -> Job:
    """Handle ``outcome``; take back the one job it queued, not yet judged."""
    scheduler.handle(outcome)
    [(_, _, job)] = scheduler.waiting
    _clear(scheduler)
    assert job.verdict is None
    return job


def test_scheduler_waits_a_rate_limited_job_for_the_hold(scheduler: Scheduler) -> None:
    """A 429 with Retry-After: the job is due exactly then, uncharged; the limit halves."""
    clock = typing.cast(Clock, scheduler.clock)
    scheduler.handle(Outcome(OutcomeKind("error"), _claimed(scheduler), E429))
    assert scheduler.next_due() == NOW + 7.0
    assert scheduler.pacer.limit == 2
    clock.now += 6.9
    assert scheduler.pop_due() is None
    clock.now += 0.1
    job = scheduler.pop_due()
    assert job is not None
    assert (job.attempts, job.last_reason) == (0, "rate_limited")


def test_scheduler_fails_a_file_at_the_crash_limit_only_for_crashes(
    scheduler: Scheduler,
) -> None:
    """Finish errors between crashes never count: the fifth crash fails it internal_error."""
    job = _claimed(scheduler)
    for _ in range(4):
        job = _again(scheduler, Outcome(OutcomeKind("crash"), job, BUG))
        job = _again(scheduler, Outcome(OutcomeKind("finish_error"), job, DISK_FULL))
    for _ in range(4):
        job = _again(scheduler, Outcome(OutcomeKind("finish_error"), job, DISK_FULL))
    assert (job.crashes, job.failures) == (4, 12)
    scheduler.handle(Outcome(OutcomeKind("crash"), job, BUG))
    [(_, _, failed)] = scheduler.waiting
    assert failed.verdict is not None
    assert failed.verdict.reason == "internal_error"
    assert isinstance(failed.verdict.error, RuntimeError)


def test_scheduler_charges_a_500_only_after_another_success(scheduler: Scheduler) -> None:
    """During an outage a 500 is free; once another upload succeeded, the next one costs."""
    clock = typing.cast(Clock, scheduler.clock)
    scheduler.handle(Outcome(OutcomeKind("error"), _claimed(scheduler), E500))
    [(due, _, job)] = scheduler.waiting
    _clear(scheduler)
    assert NOW <= due <= NOW + scheduler.pacer.base
    assert (job.attempts, job.failures, job.window_start) == (0, 1, NOW)
    clock.now += 10
    scheduler.pacer.succeeded()  # another file's upload
    scheduler.handle(Outcome(OutcomeKind("error"), job, E500))
    [(_, _, job)] = scheduler.waiting
    assert (job.attempts, job.failures, job.window_start) == (1, 2, NOW + 10)
    row = scheduler.ledger.job(job.job_id)
    assert row is not None
    assert row.attempts == 1


def test_a_judged_job_keeps_its_verdict(scheduler: Scheduler) -> None:
    """A job whose move to failed/ keeps crashing is retried, never re-judged."""
    job = _claimed(scheduler).evolve(verdict=Verdict(E400), crashes=10)
    scheduler.handle(Outcome(OutcomeKind("crash"), job, BUG))
    [(_, _, job)] = scheduler.waiting
    assert job.verdict == Verdict(E400)
