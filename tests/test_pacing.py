"""Tests of the Pacer: AIMD on 429, the rpm cap, the circuit breaker and the account pause."""

from __future__ import annotations

import itertools

import pytest

from sfwatch.pacing import MAX_PAUSE, OPEN_AFTER, Pacer


class Clock:
    """A manual monotonic clock: time moves only when a test advances it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    """A fresh manual clock."""
    return Clock()


def capacity(pacer: Pacer, most: int = 64) -> int:
    """How many uploads may run at once right now (the largest n with allowed(n-1))."""
    n = 0
    while n < most and pacer.allowed(n):
        n += 1
    return n


def open_circuit(pacer: Pacer, reason: str = "timeout") -> None:
    """Report failures until the circuit has just opened."""
    for _ in range(OPEN_AFTER):
        pacer.failed(reason)


def until_allowed(pacer: Pacer, clock: Clock) -> float:
    """Advance the clock to the end of the current hold; return how long it was."""
    state = pacer.state()
    assert state.paused_until is not None
    hold = state.paused_until - clock.now
    clock.advance(hold)
    return hold


# -- the starting state ------------------------------------------------------------------


def test_fresh_pacer_allows_concurrency_uploads(clock: Clock) -> None:
    """Up to ``concurrency`` uploads may run; nothing is paused; no wake-up is due."""
    pacer = Pacer(4, clock=clock)
    assert capacity(pacer) == 4
    state = pacer.state()
    assert (state.limit, state.paused, state.paused_until) == (4, None, None)
    assert pacer.wake_at() is None


# -- AIMD on 429 -------------------------------------------------------------------------


def test_rate_limit_halves_the_limit_down_to_one(clock: Clock) -> None:
    """Each 429 halves the limit (8, 4, 2, 1), never below one."""
    pacer = Pacer(8, clock=clock)
    limits = []
    for _ in range(5):
        pacer.rate_limited(0.0)
        limits.append(pacer.limit)
    assert limits == [4, 2, 1, 1, 1]
    assert capacity(pacer) == 1


def test_successes_grow_the_limit_back_one_per_round(clock: Clock) -> None:
    """After a cut, ``limit`` successes in a row raise the limit by one, up to concurrency."""
    pacer = Pacer(8, clock=clock)
    for _ in range(3):
        pacer.rate_limited(0.0)
    assert pacer.limit == 1
    seen = [pacer.limit]
    for _ in range(1 + 2 + 3 + 4 + 5 + 6 + 7 + 10):
        pacer.succeeded()
        seen.append(pacer.limit)
    # at limit n the n-th success in a row raises it to n + 1; at 8 it stays
    expected = [1] + [x for n in range(1, 8) for x in [n] * (n - 1) + [n + 1]] + [8] * 10
    assert seen == expected
    assert capacity(pacer) == 8


def test_rate_limit_during_recovery_cuts_again(clock: Clock) -> None:
    """A 429 while growing back halves the current limit and restarts the round."""
    pacer = Pacer(8, clock=clock)
    pacer.rate_limited(0.0)  # 4
    for _ in range(3):
        pacer.succeeded()  # 3 of the 4 needed
    assert pacer.limit == 4
    pacer.rate_limited(0.0)  # 2, and the round starts over
    assert pacer.limit == 2
    pacer.succeeded()
    assert pacer.limit == 2
    pacer.succeeded()
    assert pacer.limit == 3


def test_rate_limit_holds_every_start_until_retry_after(clock: Clock) -> None:
    """Nothing starts until the server's Retry-After has passed; state says why."""
    pacer = Pacer(4, clock=clock)
    assert pacer.rate_limited(12.5) == 12.5
    assert not pacer.allowed(0)
    state = pacer.state()
    assert state.paused is not None
    assert "rate limited" in state.paused
    assert state.paused_until == clock.now + 12.5
    assert pacer.wake_at() == clock.now + 12.5
    clock.advance(12.4)
    assert not pacer.allowed(0)
    clock.advance(0.1)
    assert pacer.allowed(0)
    assert capacity(pacer) == 2
    assert pacer.state().paused is None


def test_rate_limit_without_retry_after_backs_off(clock: Clock) -> None:
    """Without Retry-After the hold is a jittered backoff of at least a second, then lifts."""
    pacer = Pacer(4, clock=clock)
    hold = pacer.rate_limited(None)
    assert 1.0 <= hold <= 2.0
    assert not pacer.allowed(0)
    clock.advance(hold)
    assert pacer.allowed(0)


def test_shorter_hold_does_not_shorten_a_longer_one(clock: Clock) -> None:
    """A second 429 asking for less time does not end the first one's hold early."""
    pacer = Pacer(4, clock=clock)
    pacer.rate_limited(30.0)
    pacer.rate_limited(1.0)
    clock.advance(29.0)
    assert not pacer.allowed(0)
    clock.advance(1.0)
    assert pacer.allowed(0)


def test_success_does_not_end_a_hold(clock: Clock) -> None:
    """An upload that was already in flight succeeding does not lift a Retry-After hold."""
    pacer = Pacer(4, clock=clock)
    pacer.rate_limited(10.0)
    pacer.succeeded()
    assert not pacer.allowed(0)


# -- requests per minute -----------------------------------------------------------------


def test_rpm_caps_starts_in_a_sliding_minute(clock: Clock) -> None:
    """After N starts within 60 s nothing more starts until the oldest is a minute old."""
    pacer = Pacer(10, requests_per_minute=3, clock=clock)
    for _ in range(3):
        assert pacer.allowed(0)
        pacer.started()
        clock.advance(10.0)
    first = clock.now - 30.0
    assert not pacer.allowed(0)  # t=30: three starts at 0, 10, 20
    assert pacer.wake_at() == first + 60.0
    clock.advance(29.9)
    assert not pacer.allowed(0)
    clock.advance(0.1)  # t=60: the start at 0 has left the window
    assert pacer.allowed(0)
    pacer.started()
    assert not pacer.allowed(0)
    clock.advance(10.0)  # t=70: the start at 10 has left it
    assert pacer.allowed(0)


def test_rpm_none_means_no_cap(clock: Clock) -> None:
    """Without requests_per_minute any number of starts is fine."""
    pacer = Pacer(2, clock=clock)
    for _ in range(1000):
        pacer.started()
    assert pacer.allowed(0)
    assert pacer.wake_at() is None


# -- the circuit breaker -----------------------------------------------------------------


def test_circuit_opens_after_failures_in_a_row(clock: Clock) -> None:
    """OPEN_AFTER failures with no success between them stop every start; state says why."""
    pacer = Pacer(4, clock=clock)
    for _ in range(OPEN_AFTER - 1):
        pacer.failed("timeout")
    assert capacity(pacer) == 4
    pacer.failed("timeout")
    assert not pacer.allowed(0)
    state = pacer.state()
    assert state.paused is not None
    assert "service unavailable" in state.paused
    assert "timeout" in state.paused
    assert state.paused_until is not None
    assert 0 < state.paused_until - clock.now <= MAX_PAUSE
    assert pacer.wake_at() == state.paused_until


def test_a_success_between_failures_keeps_the_circuit_closed(clock: Clock) -> None:
    """Failures interleaved with successes never open the circuit."""
    pacer = Pacer(4, clock=clock)
    for _ in range(10):
        for _ in range(OPEN_AFTER - 1):
            pacer.failed("server_error")
        pacer.succeeded()
    assert capacity(pacer) == 4
    assert pacer.state().paused is None


def test_half_open_lets_exactly_one_through_and_success_closes(clock: Clock) -> None:
    """After the open hold one probe may start; its success restores full concurrency."""
    pacer = Pacer(4, clock=clock)
    open_circuit(pacer)
    until_allowed(pacer, clock)
    assert pacer.allowed(0)
    assert not pacer.allowed(1)
    assert pacer.state().paused is None
    pacer.started()
    pacer.succeeded()
    assert capacity(pacer) == 4
    pacer.failed("timeout")  # the count started over with that success
    assert capacity(pacer) == 4


def test_failed_probe_reopens_with_growing_holds(clock: Clock) -> None:
    """Each failed probe reopens the circuit for longer (jittered), up to MAX_PAUSE."""
    pacer = Pacer(4, clock=clock)
    open_circuit(pacer, "connection")
    holds = [until_allowed(pacer, clock)]
    for _ in range(15):
        assert capacity(pacer) == 1
        pacer.started()
        pacer.failed("connection")
        assert not pacer.allowed(0)
        holds.append(until_allowed(pacer, clock))
    assert all(0 < hold <= MAX_PAUSE for hold in holds)
    assert holds[0] <= 2.0  # a blip costs a second or two
    assert holds[:8] == sorted(holds[:8])  # doubling while far below the cap
    assert all(later >= earlier / 2 for earlier, later in itertools.pairwise(holds))
    assert min(holds[9:]) >= MAX_PAUSE / 2  # a long outage is probed every few minutes
    pacer.succeeded()
    assert capacity(pacer) == 4


def test_retry_after_on_a_failure_holds_starts(clock: Clock) -> None:
    """A 5xx with Retry-After holds starts that long, even with the circuit closed."""
    pacer = Pacer(4, clock=clock)
    pacer.failed("overloaded", retry_after=7.0)
    assert not pacer.allowed(0)
    clock.advance(6.9)
    assert not pacer.allowed(0)
    clock.advance(0.1)
    assert capacity(pacer) == 4


def test_open_circuit_honours_a_longer_retry_after(clock: Clock) -> None:
    """When the circuit opens on a reply with a long Retry-After, the hold is at least that."""
    pacer = Pacer(4, clock=clock)
    for _ in range(OPEN_AFTER - 1):
        pacer.failed("server_error")
    pacer.failed("server_error", retry_after=250.0)
    clock.advance(249.9)
    assert not pacer.allowed(0)
    clock.advance(0.1)
    assert pacer.allowed(0)


# -- the account pause -------------------------------------------------------------------


def test_account_fault_pauses_everything_until_account_ok(clock: Clock) -> None:
    """An account fault blocks every start, even past probe_at, until account_ok."""
    pacer = Pacer(4, clock=clock)
    wait = pacer.account_failed("unauthorized")
    assert wait == 5.0
    assert pacer.probe_at == clock.now + 5.0
    assert pacer.wake_at() == pacer.probe_at
    state = pacer.state()
    assert (state.paused, state.paused_until) == ("unauthorized", pacer.probe_at)
    assert not pacer.allowed(0)
    clock.advance(3600)
    assert not pacer.allowed(0)  # only a successful probe resumes
    assert pacer.state().paused == "unauthorized"


def test_a_rejected_field_holds_every_start_until_lifted(clock: Clock) -> None:
    """hold_for_config: no start, no probe time, no timer ends it; only lifted() does."""
    pacer = Pacer(4, clock=clock)
    reloaded = [False]
    assert pacer.hold_for_config("watch[0].request.language: refused", "k", lambda: reloaded[0])
    assert not pacer.hold_for_config("again", "k", lambda: True), "one hold at a time"
    assert not pacer.allowed(0)
    state = pacer.state()
    assert (state.paused, state.paused_until, state.reason) == (
        "watch[0].request.language: refused",
        None,
        "field_rejected",
    )
    assert pacer.account_fault is None, "the account probe has nothing to do with it"
    clock.advance(86_400)
    assert not pacer.allowed(0)
    reloaded[0] = True
    assert pacer.allowed(0)
    assert pacer.state().paused is None


def test_account_probe_backs_off_to_a_cap(clock: Clock) -> None:
    """Probes wait 5, 10, 20, … s, capped at MAX_PAUSE; probe_at follows the clock."""
    pacer = Pacer(4, clock=clock)
    waits = []
    for _ in range(10):
        waits.append(pacer.account_failed("no_balance"))
        assert pacer.probe_at == clock.now + waits[-1]
        clock.advance(waits[-1])
    assert waits == [5, 10, 20, 40, 80, 160, 300, 300, 300, 300]
    assert MAX_PAUSE == 300


def test_account_ok_resumes_half_open(clock: Clock) -> None:
    """After a good probe one upload may start; its success restores full concurrency."""
    pacer = Pacer(4, clock=clock)
    pacer.account_failed("forbidden")
    pacer.account_ok()
    assert pacer.state().paused is None
    assert pacer.wake_at() is None
    assert capacity(pacer) == 1
    pacer.started()
    pacer.succeeded()
    assert capacity(pacer) == 4


def test_success_resets_the_account_backoff(clock: Clock) -> None:
    """After the service works again, the next account fault starts at 5 s again."""
    pacer = Pacer(4, clock=clock)
    for _ in range(4):
        pacer.account_failed("unauthorized")
    pacer.account_ok()
    pacer.succeeded()
    assert pacer.account_failed("unauthorized") == 5.0


def test_account_pause_outranks_a_hold_in_state(clock: Clock) -> None:
    """With both a 429 hold and an account fault, state reports the account fault."""
    pacer = Pacer(4, clock=clock)
    pacer.rate_limited(60.0)
    pacer.account_failed("no_balance")
    assert pacer.state().paused == "no_balance"
    pacer.account_ok()
    state = pacer.state()
    assert state.paused is not None
    assert "rate limited" in state.paused  # the 429 hold still stands
    assert not pacer.allowed(0)


# -- wake_at: when the daemon must look again --------------------------------------------


def test_wake_at_is_the_earliest_future_change(clock: Clock) -> None:
    """With a hold and an account pause, wake_at is the earlier of the two."""
    pacer = Pacer(4, clock=clock)
    pacer.rate_limited(3.0)
    pacer.account_failed("unauthorized")  # probe in 5 s
    assert pacer.wake_at() == clock.now + 3.0
    clock.advance(3.0)
    assert pacer.wake_at() == clock.now + 2.0


def test_wake_at_is_never_in_the_past_with_an_rpm_cap(clock: Clock) -> None:
    """Starts older than a minute do not give a wake-up time in the past (a busy loop)."""
    pacer = Pacer(1, requests_per_minute=3, clock=clock)
    for _ in range(3):
        pacer.started()
    clock.advance(100.0)
    assert not pacer.allowed(1)  # saturated: the one upload allowed is still running
    wake = pacer.wake_at()
    assert wake is None or wake > clock.now


def test_wake_at_is_never_in_the_past_while_probing(clock: Clock) -> None:
    """Once probe_at has passed (the probe is running), wake_at does not ask to wake now."""
    pacer = Pacer(4, clock=clock)
    pacer.account_failed("unauthorized")
    clock.advance(6.0)
    wake = pacer.wake_at()
    assert wake is None or wake > clock.now
