"""Pacing: how many uploads may start now, given what the service has been saying.

Three things slow the client down, all account-wide because the service's
limits are per account, not per file:

- **rate limits** (429): the concurrency limit is halved and nothing starts until
  the server's ``Retry-After`` (or a backoff) has passed; every success after
  that grows the limit back by one per round of successes (AIMD);
  ``api.requests_per_minute`` caps starts in any 60 s window;
- **outages** (timeouts, connection errors, 5xx): after a few failures in a row
  with no success between them, a circuit opens: nothing starts until a capped
  backoff has passed, then one upload is let through as a probe;
- **account faults** (401/402/403/404): every upload pauses; the daemon probes
  ``GET /user/info`` with a capped backoff and resumes once it answers;
- **a rejected field** (a 400/422 naming a form field the config sends): every
  upload is held until the config changes. No probe can tell a config was fixed,
  so the hold asks its ``lifted`` callback (the scheduler's: "has a reload
  happened since?") and ends only when that says so.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from sfwatch.backoff import full_jitter

#: failures in a row, with no success between, that open the circuit
OPEN_AFTER = 3
MAX_PAUSE = 300.0


@dataclass(frozen=True)
class PaceState:
    """What the pacer is doing, for logs and ``sfwatch status``."""

    limit: int
    paused: str | None  # why nothing may start, or None
    paused_until: float | None  # monotonic
    #: ``paused`` as a short code: the account fault's reason (``unauthorized``, ...),
    #: ``rate_limited``, ``retry_after`` (the service asked to wait) or ``outage``
    reason: str | None = None


class Pacer:
    """Decides whether another upload may start; fed every upload's outcome."""

    def __init__(
        self,
        concurrency: int,
        requests_per_minute: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        backoff_base: float = 1.0,
    ) -> None:
        self.clock = clock
        #: seconds: the unit of every backoff here (tests shrink it; production keeps 1)
        self.base = backoff_base
        self.max_limit = concurrency
        self.limit = concurrency
        self.rpm = requests_per_minute
        self._starts: deque[float] = deque()
        self._successes_since_cut = 0
        self._hold_until = 0.0
        self._hold_reason: str | None = None
        self._hold_code: str | None = None
        self._rate_limited_in_a_row = 0
        self._failures_in_a_row = 0
        self._opens = 0
        self._half_open = False
        self.account_fault: str | None = None
        self._account_probes = 0
        self.probe_at = 0.0
        self.last_success = float("-inf")
        #: (why, key path, lifted): a held config; uploads wait until ``lifted()``
        self._config_hold: tuple[str, str, Callable[[], bool]] | None = None

    # -- questions -----------------------------------------------------------------

    def allowed(self, in_flight: int) -> bool:
        """May one more upload start now, with ``in_flight`` already running?"""
        now = self.clock()
        if self.account_fault is not None or now < self._hold_until or self.config_held():
            return False
        limit = 1 if self._half_open else self.limit
        if in_flight >= limit:
            return False
        if self.rpm is not None:
            self._forget_starts_before(now - 60)
            if len(self._starts) >= self.rpm:
                return False
        return True

    def wake_at(self) -> float | None:
        """When ``allowed`` may change without any upload finishing; never in the past.

        A time already past would make the caller's loop spin: a probe that is due
        is already running, and starts older than a minute no longer count.
        """
        now = self.clock()
        candidates = [self._hold_until] if self._hold_until > now else []
        if self.account_fault is not None and self.probe_at > now:
            candidates.append(self.probe_at)
        if self.rpm is not None:
            self._forget_starts_before(now - 60)
            if self._starts and len(self._starts) >= self.rpm:
                candidates.append(self._starts[0] + 60)
        return min(candidates) if candidates else None

    def state(self) -> PaceState:
        """A snapshot for status reports."""
        now = self.clock()
        if self.config_held() and self._config_hold is not None:
            why = self._config_hold[0]
            return PaceState(self.limit, why, None, "field_rejected")
        if self.account_fault is not None:
            return PaceState(self.limit, self.account_fault, self.probe_at, self.account_fault)
        if now < self._hold_until:
            return PaceState(self.limit, self._hold_reason, self._hold_until, self._hold_code)
        return PaceState(self.limit, None, None)

    # -- outcomes ------------------------------------------------------------------

    def started(self) -> None:
        """An upload started (counts against ``requests_per_minute``)."""
        if self.rpm is not None:
            self._starts.append(self.clock())

    def succeeded(self) -> None:
        """An upload came back with a transcript (or a file-fault answer)."""
        self.last_success = self.clock()
        self._failures_in_a_row = 0
        self._rate_limited_in_a_row = 0
        self._opens = 0
        self._account_probes = 0
        self._half_open = False
        if self.limit < self.max_limit:
            self._successes_since_cut += 1
            if self._successes_since_cut >= self.limit:
                self.limit += 1
                self._successes_since_cut = 0

    def rate_limited(self, retry_after: float | None) -> float:
        """A 429: halve the limit and hold every start; return the hold in seconds."""
        self._rate_limited_in_a_row += 1
        self.limit = max(1, self.limit // 2)
        self._successes_since_cut = 0
        wait = (
            retry_after
            if retry_after is not None
            else (full_jitter(self._rate_limited_in_a_row, cap=60.0) + 1.0) * self.base
        )
        self._hold(wait, "rate limited (429)", "rate_limited")
        return wait

    def failed(self, reason: str, retry_after: float | None = None) -> None:
        """A service-side failure (timeout, connection, 5xx)."""
        self._failures_in_a_row += 1
        if retry_after is not None:
            self._hold(retry_after, f"service asked to wait ({reason})", "retry_after")
        if self._failures_in_a_row >= OPEN_AFTER or self._half_open:
            self._opens += 1
            self._half_open = True
            wait = max(
                retry_after or 0.0,
                min(MAX_PAUSE / 2, self.base * 2.0 ** min(self._opens, 10) / 2)
                + full_jitter(self._opens, base=self.base, cap=MAX_PAUSE / 2),
            )
            self._hold(wait, f"service unavailable ({reason})", "outage")

    def account_failed(self, reason: str) -> float:
        """401/402/403/404: pause every upload until a probe succeeds; return the wait."""
        self._account_probes += 1
        self.account_fault = reason
        wait = min(MAX_PAUSE, 5.0 * self.base * 2.0 ** min(self._account_probes - 1, 10))
        self.probe_at = self.clock() + wait
        return wait

    def hold_for_config(self, why: str, key: str, lifted: Callable[[], bool]) -> bool:
        """The server refused the field ``key`` sets: hold every upload until ``lifted()``.

        False when a hold is already on (the caller logs the first one only).
        """
        if self.config_held():
            return False
        self._config_hold = (why, key, lifted)
        return True

    def config_held(self) -> bool:
        """Are uploads held for a rejected field? (Asks ``lifted`` and ends the hold.)"""
        if self._config_hold is not None and self._config_hold[2]():
            self._config_hold = None
        return self._config_hold is not None

    def account_ok(self) -> None:
        """A probe answered: resume, cautiously (one upload until one succeeds)."""
        self.account_fault = None
        self._half_open = True

    def _forget_starts_before(self, cutoff: float) -> None:
        while self._starts and self._starts[0] <= cutoff:
            self._starts.popleft()

    def _hold(self, seconds: float, reason: str, code: str) -> None:
        until = self.clock() + seconds
        if until > self._hold_until:
            self._hold_until, self._hold_reason, self._hold_code = until, reason, code
