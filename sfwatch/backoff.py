"""Backoff arithmetic: exponential with full jitter, and ``Retry-After`` parsing."""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Mapping
from datetime import UTC

#: the longest wait a server's Retry-After may impose on us
MAX_RETRY_AFTER = 300.0


def full_jitter(
    failures: int, base: float = 1.0, cap: float = 60.0, rng: random.Random | None = None
) -> float:
    """A delay drawn uniformly from [0, min(cap, base * 2**(failures-1))].

    Full jitter spreads retries of many files that failed together (an outage
    ending) instead of bringing them back in one burst.
    """
    ceiling = min(cap, base * 2 ** max(0, min(failures - 1, 30)))
    return (rng or random).uniform(0, ceiling)


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date).

    Negative, unparsable and absent values give None; large ones are capped.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    value: float | None = None
    if "retry-after-ms" in lowered:
        try:
            value = float(lowered["retry-after-ms"]) / 1000
        except ValueError:
            value = None
    if value is None and "retry-after" in lowered:
        raw = lowered["retry-after"].strip()
        try:
            value = float(raw)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                return None
            if when.tzinfo is None:  # asctime and "-0000" dates: HTTP dates are always GMT
                when = when.replace(tzinfo=UTC)
            value = when.timestamp() - (time.time() if now is None else now)
    if value is None or math.isnan(value) or value < 0:
        return None
    return min(value, MAX_RETRY_AFTER)
