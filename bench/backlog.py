"""d: a backlog of 10,000 files at start-up, against an instant API.

10,000 small WAVs are in the inbox when ``sfwatch run --burst`` starts
(``concurrency: 8``, ``settle_seconds: 0.5``, the fake answering at once).
Figures: seconds from launching the process to the first ``upload_started``
(settle included); files/s over the whole backlog (10,000 ÷ (last
``job_finished`` - launch)); the daemon's peak memory: its RSS, or with several
processes (``--workers``, ``--siblings``) their summed PSS, which counts the
libraries they share once. The run is
``bench.throughput.backlog_run``, as in benchmark a.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench.common import Figure, median, save, scratch
from bench.throughput import backlog_run

CONCURRENCY = 8
SETTLE = 0.5


def run(args: argparse.Namespace) -> list[Figure]:
    root = scratch("d")
    files = 2000 if args.quick else 10_000
    runs = max(1, min(args.runs, 2))  # ~1 min each; two keep `all` within budget
    detail: dict[str, Any] = {"concurrency": CONCURRENCY, "settle_seconds": SETTLE, "runs": []}
    first: list[float] = []
    rates: list[float] = []
    peaks: list[float] = []
    for i in range(runs):
        result = backlog_run(
            root / f"run{i}",
            files,
            0.0,
            CONCURRENCY,
            settle=SETTLE,
            timeout=900,
            profile="d" if i == 0 else None,
            siblings=args.siblings,
            workers=args.workers,
            quiet_inodes=True,
        )
        print(f"  d run {i + 1}: {result}", flush=True)
        detail["runs"].append(result)
        first.append(result["launch_to_first_upload_s"])
        rates.append(result["files_per_s_from_launch"])
        peaks.append(result["peak_memory_mb"])
    f, r, p = median(first), median(rates), median(peaks)
    figures = [
        Figure("d: launch → first upload (settle 0.5 s incl.)", f, "s", "≤ 1", f <= 1, first),
        Figure("d: files/s over the whole backlog", r, "files/s", "≥ 300", r >= 300, rates),
        # RSS of one process; PSS summed over workers or siblings (bench/common.py)
        Figure("d: peak memory (RSS; PSS if several)", p, "MB", "≤ 150", p <= 150, peaks),
    ]
    save("d", figures, detail)
    return figures
