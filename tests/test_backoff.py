"""Tests of the backoff arithmetic: full jitter and Retry-After parsing."""

from __future__ import annotations

import email.utils
import random
import statistics
import time
from collections.abc import Iterator

import pytest

from sfwatch.backoff import MAX_RETRY_AFTER, full_jitter, parse_retry_after

NOW = 1_700_000_000.0  # a fixed "now" for HTTP dates (2023-11-14 22:13:20 UTC)


@pytest.mark.parametrize(("base", "cap"), [(1.0, 60.0), (0.5, 8.0), (2.0, 300.0)])
def test_full_jitter_stays_within_bounds(base: float, cap: float) -> None:
    """Every delay is in [0, min(cap, base * 2**(n-1))], for small and huge failure counts."""
    rng = random.Random(1234)
    for failures in [*range(1, 16), 31, 64, 1000, 10**6]:
        ceiling = min(cap, base * 2 ** min(failures - 1, 60))
        for _ in range(200):
            delay = full_jitter(failures, base=base, cap=cap, rng=rng)
            assert 0.0 <= delay <= ceiling, (failures, delay, ceiling)


def test_full_jitter_zero_failures_is_bounded() -> None:
    """A failure count below one does not raise and waits at most ``base``."""
    rng = random.Random(7)
    assert all(0.0 <= full_jitter(n, base=2.0, rng=rng) <= 2.0 for n in (0, -3) for _ in range(50))


@pytest.mark.parametrize("failures", [1, 3, 6, 20])
def test_full_jitter_spreads_over_the_whole_range(failures: int) -> None:
    """Delays are spread uniformly over [0, ceiling], not clustered at the ceiling."""
    rng = random.Random(failures)
    ceiling = min(60.0, 2.0 ** (failures - 1))
    delays = [full_jitter(failures, base=1.0, cap=60.0, rng=rng) for _ in range(2000)]
    assert min(delays) < 0.05 * ceiling
    assert max(delays) > 0.95 * ceiling
    assert 0.45 * ceiling < statistics.fmean(delays) < 0.55 * ceiling
    assert len(set(delays)) > 1990


def test_full_jitter_ceiling_grows_exponentially() -> None:
    """The largest delay seen doubles with each failure until the cap."""
    rng = random.Random(99)
    tops = [max(full_jitter(n, cap=60.0, rng=rng) for _ in range(500)) for n in range(1, 9)]
    for n, top in enumerate(tops, start=1):
        assert 0.9 * min(60.0, 2.0 ** (n - 1)) < top <= min(60.0, 2.0 ** (n - 1))


def test_full_jitter_is_reproducible_with_a_seeded_rng() -> None:
    """The same seed gives the same delays (the rng argument is really used)."""
    first = [full_jitter(5, rng=random.Random(42)) for _ in range(3)]
    again = [full_jitter(5, rng=random.Random(42)) for _ in range(3)]
    other = full_jitter(5, rng=random.Random(43))
    assert first == again
    assert other != first[0]


def test_full_jitter_without_rng() -> None:
    """Without an rng the module's random is used, within the same bounds."""
    assert all(0.0 <= full_jitter(4) <= 8.0 for _ in range(100))


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "5"}, 5.0),
        ({"Retry-After": "0"}, 0.0),
        ({"Retry-After": " 1.5 "}, 1.5),
        ({"retry-after-ms": "2500"}, 2.5),
        ({"retry-after-ms": "0"}, 0.0),
        ({"retry-after-ms": "1500", "Retry-After": "9"}, 1.5),
        ({"retry-after-ms": "soon", "Retry-After": "9"}, 9.0),
        ({"RETRY-AFTER": "3"}, 3.0),
        ({"Retry-After-Ms": "750"}, 0.75),
        ({"rEtRy-AfTeR": "4"}, 4.0),
        ({"Retry-After": "100000"}, MAX_RETRY_AFTER),
        ({"Retry-After": "inf"}, MAX_RETRY_AFTER),
        ({"retry-after-ms": "999999999"}, MAX_RETRY_AFTER),
        ({"Retry-After": "-5"}, None),
        ({"retry-after-ms": "-1"}, None),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": ""}, None),
        ({"Retry-After": "nan"}, None),
        ({"retry-after-ms": "nan"}, None),
        ({"retry-after-ms": "x"}, None),
        ({"Content-Type": "application/json"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    """Seconds and milliseconds, any header case; negative and garbage are None; capped."""
    assert parse_retry_after(headers, now=NOW) == expected


def gmt(when: float) -> str:
    """``when`` as an IMF-fixdate, the preferred HTTP date format."""
    return email.utils.formatdate(when, usegmt=True)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (gmt(NOW + 30), 30.0),
        (gmt(NOW), 0.0),
        (gmt(NOW + 3600), MAX_RETRY_AFTER),
        (gmt(NOW - 30), None),
        ("Tuesday, 14-Nov-23 22:13:50 GMT", 30.0),  # RFC 850, obsolete but to be accepted
        ("Tue Nov 14 22:13:50 2023", 30.0),  # asctime, also always GMT
        ("Tue, 14 Nov 2023 22:13:50 -0000", 30.0),
        ("Tue, 14 Nov 2023 23:13:50 +0100", 30.0),
        ("Tue, 31 Feb 2023 99:99:99 GMT", None),
        ("Fri, 31 Dec 9999 23:59:59 -2359", MAX_RETRY_AFTER),
        ("Mon, 01 Jan 0001 00:00:00 +2359", None),
    ],
    ids=[
        "fixdate",
        "now",
        "far",
        "past",
        "rfc850",
        "asctime",
        "minus-zero",
        "offset",
        "bad",
        "year-9999",
        "year-1",
    ],
)
@pytest.mark.parametrize("tz", ["UTC", "Asia/Shanghai", "America/Los_Angeles"])
def test_parse_retry_after_http_date(
    value: str, expected: float | None, tz: str, local_timezone: Iterator[None]
) -> None:
    """An HTTP date gives the seconds until then, whatever the machine's time zone."""
    assert parse_retry_after({"Retry-After": value}, now=NOW) == expected


def test_parse_retry_after_http_date_against_the_clock() -> None:
    """Without ``now`` the wall clock is used."""
    value = parse_retry_after({"Retry-After": gmt(time.time() + 60)})
    assert value is not None
    assert 57 <= value <= 60


@pytest.fixture
def local_timezone(tz: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run the test with the process's local time zone set to ``tz``, then restore it."""
    monkeypatch.setenv("TZ", tz)
    time.tzset()
    try:
        yield
    finally:
        monkeypatch.undo()
        time.tzset()
