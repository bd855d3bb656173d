"""c: memory does not grow with file size (uploads stream from the file).

Four 45 MB WAVs (8 kHz mono noise, 47 min each: under the API's 50 MB and one
hour, so each is uploaded as it is) are in the inbox when ``sfwatch run --burst``
starts with ``concurrency: 4``; the fake takes 0.5 s per answer, so all four
uploads are in flight together. Then the same with four 1 MB WAVs. Figure: the
daemon's peak RSS in each case (the larger of every VmRSS and VmHWM read from
/proc/<pid>/status every 20 ms) and their ratio. The fake's record of each
upload's size and SHA-256 confirms that whole files were sent.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path
from typing import Any

from bench.common import (
    DaemonRun,
    FakeServer,
    Figure,
    median,
    save,
    scratch,
    write_big_wav,
    write_config,
)

CASES = {"45MB": 45_000_000, "1MB": 1_000_000}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def memory_run(root: Path, size: int, files: int = 4) -> dict[str, Any]:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    inbox = root / "inbox"
    paths = [write_big_wav(inbox / f"big{i}.wav", size) for i in range(files)]
    digests = {sha256_of(p) for p in paths}
    with FakeServer(root, 0.5) as fake:
        config = write_config(root, fake.url, concurrency=files, settle=0.5)
        with DaemonRun(config, "--burst", sample_interval=0.02, profile="c") as daemon:
            code = daemon.wait_exit(300)
            assert daemon.sampler is not None
            peak = daemon.sampler.peak_rss_mb
            done = [e for e in daemon.events("sfwatch.job_finished") if e.get("outcome") == "done"]
        summary = fake.stop()
    received = {u.sha256 for u in summary.uploads if u.status == 200}
    return {
        "file_bytes": size,
        "files": files,
        "exit_code": code,
        "done": len(done),
        "whole_files_received": len(digests & received),
        "fake_max_concurrent": summary.max_concurrent,
        "peak_rss_mb": peak,
    }


def run(args: argparse.Namespace) -> list[Figure]:
    root = scratch("c")
    peaks: dict[str, list[float]] = {name: [] for name in CASES}
    detail: dict[str, Any] = {"runs": []}
    for i in range(args.runs):
        for name, size in CASES.items():
            result = memory_run(root / f"{name}-{i}", size)
            result["case"] = name
            print(f"  c {name} run {i + 1}: {result}", flush=True)
            detail["runs"].append(result)
            peaks[name].append(result["peak_rss_mb"])
    big, small = median(peaks["45MB"]), median(peaks["1MB"])
    ratio = big / small
    figures = [
        Figure("c: peak RSS, 4 x 45 MB at once", big, "MB", "≤ 100", big <= 100, peaks["45MB"]),
        Figure("c: peak RSS, 4 x 1 MB at once", small, "MB", "≤ 100", small <= 100, peaks["1MB"]),
        Figure("c: peak RSS ratio 45 MB ÷ 1 MB", round(ratio, 3), "ratio", "≤ 1.10", ratio <= 1.10),
    ]
    save("c", figures, detail)
    return figures
