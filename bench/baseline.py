"""baseline: the same workloads for what a Linux user writes instead of sfwatch.

``bench/baseline.sh``: ``inotifywait -m -e close_write,moved_to`` piped into a
loop that posts each audio file with ``curl -F`` and writes the answer beside it
(``PARALLEL`` > 1: ``xargs -P``). Measured here:

- **a, files present at start**: 1,000 files in the inbox before the loop starts.
- **a, files moved in after start** (the only way it sees them): latency 0.25 s;
  the plain loop with 100 files, ``xargs -P 8`` and ``-P 32`` with 1,000. Files/s
  from the first rename into the inbox to the last transcript closed, ÷ (P ÷ latency).
- **b**: the latency workload (one file at a time, latency 0): transcript closed
  - writer's close - server time (no settle to subtract).
- **slow writer**: a WAV written in 5 chunks, the file closed and reopened
  between chunks (0.3 s apart), as SMB/NFS clients and some recorders do. What
  the fake received from the baseline, and from sfwatch (``settle_seconds: 1``).

inotify-tools and curl are installed with apt-get when missing (needs root).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.common import (
    REPO,
    DaemonRun,
    FakeServer,
    Figure,
    daemon_env,
    make_wavs,
    median,
    percentile,
    save,
    scratch,
    wait_for,
    wav_bytes,
    write_config,
)
from bench.inotify import IN_CLOSE_WRITE, IN_CREATE, IN_MOVED_TO, Inotify
from bench.latency import attach_server_times, drop_files

SCRIPT = REPO / "bench" / "baseline.sh"
LATENCY = 0.25
BASH = shutil.which("bash") or "/bin/bash"


def ensure_tools() -> None:
    """inotifywait and curl, installed with apt-get when missing."""
    if shutil.which("inotifywait") and shutil.which("curl"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)  # noqa: S607
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "inotify-tools", "curl"],  # noqa: S607
        check=True,
        env=env,
    )


class Baseline:
    """``bench/baseline.sh INBOX URL PARALLEL`` in its own process group."""

    def __init__(self, inbox: Path, url: str, parallel: int = 1) -> None:
        self.inbox = inbox
        self.url = url
        self.parallel = parallel
        self.stderr = inbox.parent / f"baseline-{time.monotonic_ns()}.err"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Baseline:
        with self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                [BASH, str(SCRIPT), str(self.inbox), self.url, str(self.parallel)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=daemon_env(),
                start_new_session=True,
            )
        wait_for(
            lambda: b"Watches established" in self.stderr.read_bytes(), 10, "inotifywait to start"
        )
        return self

    def curl_errors(self) -> list[str]:
        lines = self.stderr.read_text(encoding="utf-8", errors="replace").splitlines()
        return [line for line in lines if "curl" in line][:5]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group of the script we started
            self.proc.wait(10)


def fresh(root: Path) -> Path:
    if root.exists():
        shutil.rmtree(root)
    (root / "inbox").mkdir(parents=True)
    return root


def present_at_start(root: Path, files: int = 1000, wait: float = 5.0) -> dict[str, Any]:
    fresh(root)
    make_wavs(root / "inbox", files, seconds=0.1)
    with FakeServer(root, LATENCY) as fake:
        with Baseline(root / "inbox", fake.url):
            time.sleep(wait)
        summary = fake.stop()
    return {"files": files, "waited_s": wait, "uploads": len(summary.uploads)}


def moved_in(root: Path, files: int, parallel: int) -> dict[str, Any]:
    fresh(root)
    staging = root / "staging"
    paths = make_wavs(staging, files, seconds=0.1)
    inbox = root / "inbox"
    with FakeServer(root, LATENCY) as fake:
        with Baseline(inbox, fake.url, parallel) as base, Inotify(inbox, IN_CLOSE_WRITE) as ino:
            t0 = time.time()
            for p in paths:
                p.rename(inbox / p.name)
            names = [p.stem + ".txt" for p in paths]
            last = max(ino.wait_for(n, 60 + files * LATENCY / parallel * 2) for n in names)
            errors = base.curl_errors()
        summary = fake.stop()
    rate = files / (last - t0)
    return {
        "files": files,
        "parallel": parallel,
        "seconds": round(last - t0, 3),
        "files_per_s": round(rate, 2),
        "ratio": round(rate / (parallel / LATENCY), 3),
        "uploads": len(summary.uploads),
        "fake_max_concurrent": summary.max_concurrent,
        "curl_errors": errors,
    }


def latency_run(root: Path, count: int) -> dict[str, Any]:
    fresh(root)
    inbox = root / "inbox"
    with FakeServer(root, 0.0) as fake:
        with Baseline(inbox, fake.url):
            drops = drop_files(inbox, count, lambda n: n.rsplit(".", 1)[0] + ".txt", IN_CLOSE_WRITE)
        attach_server_times(drops, fake.stop())
    latencies = [(d.transcript - d.closed - d.server_seconds) * 1000 for d in drops]
    return {
        "files": count,
        "latencies_ms": [round(v, 2) for v in latencies],
        "median_ms": round(median(latencies), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
    }


def slow_write(path: Path, data: bytes, chunks: int = 5, pause: float = 0.3) -> None:
    """Write ``data`` in ``chunks`` pieces, closing and reopening the file in between."""
    step = math.ceil(len(data) / chunks)
    for i in range(chunks):
        with path.open("wb" if i == 0 else "ab") as f:
            f.write(data[i * step : (i + 1) * step])
        if i < chunks - 1:
            time.sleep(pause)


def slow_writer(root: Path, system: str) -> dict[str, Any]:
    """What the fake received when a file is written in 5 reopened chunks."""
    fresh(root)
    inbox = root / "inbox"
    data = wav_bytes(2.0)
    whole = hashlib.sha256(data).hexdigest()
    with FakeServer(root, 0.0) as fake:
        if system == "baseline":
            with Baseline(inbox, fake.url):
                slow_write(inbox / "slow.wav", data)
                time.sleep(1.5)
        else:
            config = write_config(root, fake.url, settle=1.0)
            with (
                DaemonRun(config) as daemon,
                Inotify(inbox, IN_CREATE | IN_MOVED_TO) as ino,
            ):
                daemon.wait_event("sfwatch.daemon_started")
                time.sleep(0.5)
                slow_write(inbox / "slow.wav", data)
                ino.wait_for("slow.txt", 10)
                daemon.stop()
        summary = fake.stop()
    return {
        "system": system,
        "file_bytes": len(data),
        "uploads": len(summary.uploads),
        "sizes": [u.size for u in summary.uploads],
        "complete_file_uploads": sum(1 for u in summary.uploads if u.sha256 == whole),
        "partial_uploads": sum(1 for u in summary.uploads if u.sha256 != whole),
    }


def run(args: argparse.Namespace) -> list[Figure]:
    ensure_tools()
    root = scratch("baseline")
    detail: dict[str, Any] = {"latency": LATENCY}
    start = present_at_start(root / "start")
    print(f"  baseline, files present at start: {start}", flush=True)
    detail["present_at_start"] = start
    moved: list[dict[str, Any]] = []
    scale = 0.3 if args.quick else 1.0
    for parallel, files in ((1, 100), (8, 1000), (32, 1000)):
        result = moved_in(root / f"moved-p{parallel}", int(files * scale), parallel)
        print(f"  baseline, moved in, P={parallel}: {result}", flush=True)
        moved.append(result)
    detail["moved_in"] = moved
    lat = latency_run(root / "latency", 20 if args.quick else 50)
    print(f"  baseline, latency: median {lat['median_ms']} ms, p99 {lat['p99_ms']} ms", flush=True)
    detail["latency_run"] = lat
    slow = [slow_writer(root / f"slow-{s}", s) for s in ("baseline", "sfwatch")]
    for s in slow:
        print(f"  slow writer: {s}", flush=True)
    detail["slow_writer"] = slow
    figures = [
        Figure(
            "baseline: files present at start, uploaded", start["uploads"], f"of {start['files']}"
        ),
        *(
            Figure(f"baseline: moved in, P={m['parallel']}: files/s / (P/L)", m["ratio"], "ratio")
            for m in moved
        ),
        Figure("baseline: latency - server, median", lat["median_ms"], "ms"),
        Figure("baseline: latency - server, p99", lat["p99_ms"], "ms"),
        Figure("baseline: slow writer, uploads (partial)", slow[0]["uploads"], "uploads"),
        Figure("sfwatch: slow writer, uploads", slow[1]["uploads"], "uploads"),
    ]
    save("baseline", figures, detail)
    return figures
