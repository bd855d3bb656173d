"""a: throughput with a backlog present at start, against a slow API.

1,000 small WAVs are in the inbox before ``sfwatch run --burst`` starts; the fake
answers each upload after 0.25 s. With ``concurrency`` C the ceiling is C ÷ 0.25
files/s. Figure: achieved files/s ÷ (C ÷ latency), where achieved files/s is the
file count over the time from the first ``upload_started`` to the last
``job_finished`` (both from the daemon's log). Also reported: the steady-state
rate (between the C-th and the (N-C)-th finished file, free of ramp-up and tail),
the fake's peak concurrency, the daemon's CPU per file and its peak RSS.

``backlog_run`` is shared with benchmark d (the same run with 10,000 files, no latency).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from bench.common import (
    DaemonRun,
    FakeServer,
    Figure,
    make_wavs,
    median,
    parse_ts,
    save,
    scratch,
    times_of,
    write_config,
)


def backlog_run(
    root: Path,
    files: int,
    latency: float,
    concurrency: int,
    *,
    settle: float = 0.5,
    timeout: float = 600.0,
    profile: str | None = None,
) -> dict[str, Any]:
    """One burst run over ``files`` present at start; the measured quantities."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    with FakeServer(root, latency) as fake:
        config = write_config(root, fake.url, concurrency=concurrency, settle=settle)
        make_wavs(root / "inbox", files, seconds=0.1)
        with DaemonRun(config, "--burst", profile=profile) as daemon:
            code = daemon.wait_exit(timeout)
            assert daemon.sampler is not None
            cpu, peak = daemon.sampler.cpu, daemon.sampler.peak_rss_mb
            started = times_of(daemon.events("sfwatch.upload_started"))
            finished_events = daemon.events("sfwatch.job_finished")
            launched = daemon.launched
            ready = parse_ts(str(daemon.events("sfwatch.daemon_started")[0]["timestamp"]))
            problems = sorted({str(e.get("event")) for e in daemon.errors()})
        summary = fake.stop()
    finished = times_of(finished_events)
    outcomes = sorted({str(e.get("outcome")) for e in finished_events})
    n = len(finished)
    window = finished[-1] - started[0]
    rate = n / window
    k1, k2 = min(concurrency, n // 4), max(n - concurrency, 3 * n // 4)
    steady = (k2 - k1) / (finished[k2] - finished[k1])
    server_done = [u for u in summary.uploads if u.status == 200]
    return {
        "files": files,
        "latency": latency,
        "concurrency": concurrency,
        "settle_seconds": settle,
        "exit_code": code,
        "finished": n,
        "outcomes": outcomes,
        "uploads_seen_by_fake": len(summary.uploads),
        "uploads_200": len(server_done),
        "fake_max_concurrent": summary.max_concurrent,
        "fake_cpu_seconds": round(summary.cpu_seconds, 2),
        "launch_to_ready_s": round(ready - launched, 3),
        "launch_to_first_upload_s": round(started[0] - launched, 3),
        "first_upload_to_last_finish_s": round(window, 3),
        "launch_to_last_finish_s": round(finished[-1] - launched, 3),
        "files_per_s": round(rate, 2),
        "files_per_s_from_launch": round(n / (finished[-1] - launched), 2),
        "steady_files_per_s": round(steady, 2),
        "daemon_cpu_seconds": round(cpu, 2),
        "daemon_cpu_ms_per_file": round(cpu / max(n, 1) * 1000, 2),
        "peak_rss_mb": peak,
        "warnings_logged": problems,
    }


def run(args: argparse.Namespace) -> list[Figure]:
    root = scratch("a")
    files = 300 if args.quick else 1000
    latency = 0.25
    figures: list[Figure] = []
    detail: dict[str, Any] = {"runs": []}
    for concurrency in (8, 32):
        ratios: list[float] = []
        steady: list[float] = []
        for i in range(args.runs):
            result = backlog_run(
                root / f"c{concurrency}-{i}",
                files,
                latency,
                concurrency,
                profile=f"a-c{concurrency}" if i == 0 else None,
            )
            ideal = concurrency / latency
            result["ratio"] = round(result["files_per_s"] / ideal, 3)
            result["steady_ratio"] = round(result["steady_files_per_s"] / ideal, 3)
            print(f"  a C={concurrency} run {i + 1}: {result}", flush=True)
            detail["runs"].append(result)
            ratios.append(result["ratio"])
            steady.append(result["steady_ratio"])
        figures.append(
            Figure(
                f"a: C={concurrency} files/s ÷ (C÷L)",
                median(ratios),
                "ratio",
                "≥ 0.95",
                median(ratios) >= 0.95,
                ratios,
            )
        )
        figures.append(
            Figure(f"a: C={concurrency} steady-state ratio", median(steady), "ratio", runs=steady)
        )
    save("a", figures, detail)
    return figures
