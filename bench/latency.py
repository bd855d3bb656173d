"""b: latency of one file dropped into an idle daemon.

Files are written one at a time (one open, one write, one close) into the inbox
of a running ``sfwatch run`` with ``settle_seconds: 1`` and a fake answering at
once. The bench process watches the inbox with inotify and takes the time the
transcript is renamed into place. Figure, per file:

    (transcript appeared - writer's close returned) - settle_seconds - server time

where server time is what the fake spent on the request (it parses the body as it
arrives; latency 0). Median and p99 over every file of every run, with the
daemon's log splitting the rest into: noticing and settling (claim - close -
settle), claim → upload start, the HTTP round trip, and the finish.

``drop_files`` is shared with the baseline (``bench.baseline``).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    DaemonRun,
    FakeServer,
    Figure,
    ServerSummary,
    median,
    parse_ts,
    percentile,
    save,
    scratch,
    wav_bytes,
    write_config,
)
from bench.inotify import IN_CREATE, IN_MOVED_TO, Inotify

SETTLE = 1.0


@dataclass
class Drop:
    """One file written into the inbox and its transcript's appearance."""

    name: str
    sha256: str
    closed: float  # time.time() after close() returned
    transcript: float  # time.time() of the transcript's inotify event
    server_seconds: float = 0.0
    server_started: float = 0.0
    server_ended: float = 0.0


def drop_files(
    inbox: Path,
    count: int,
    transcript_name: Callable[[str], str],
    mask: int,
    gap: float = 0.05,
) -> list[Drop]:
    """Write ``count`` WAVs one at a time, each after the previous one's transcript.

    ``mask``: the inotify events that mean "the transcript is there": sfwatch links
    (IN_CREATE) or renames (IN_MOVED_TO) a complete file into place; a plain writer
    such as curl creates the name first, so only its IN_CLOSE_WRITE counts.
    """
    drops: list[Drop] = []
    with Inotify(inbox, mask) as watcher:
        for i in range(count):
            name = f"drop{i:04d}.wav"
            data = wav_bytes(0.25)
            with (inbox / name).open("wb") as f:
                f.write(data)
            closed = time.time()
            appeared = watcher.wait_for(transcript_name(name), 30)
            drops.append(Drop(name, hashlib.sha256(data).hexdigest(), closed, appeared))
            time.sleep(gap)
    return drops


def attach_server_times(drops: list[Drop], summary: ServerSummary) -> None:
    """Fill in what the fake spent on each drop's upload (the first upload of its content)."""
    first: dict[str, tuple[float, float]] = {}
    for u in summary.uploads:
        first.setdefault(u.sha256, (u.started, u.ended))
    for d in drops:
        started, ended = first.get(d.sha256, (0.0, 0.0))
        d.server_started, d.server_ended = started, ended
        d.server_seconds = max(0.0, ended - started)


def sfwatch_run(root: Path, count: int) -> dict[str, Any]:
    """One run: a daemon, ``count`` drops; per-file latencies and their breakdown (ms)."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    inbox = root / "inbox"
    with FakeServer(root, 0.0) as fake:
        config = write_config(root, fake.url, settle=SETTLE, level="info")
        with DaemonRun(config, profile="b") as daemon:
            daemon.wait_event("sfwatch.daemon_started")
            time.sleep(0.5)  # the start-up scan of an empty inbox
            drops = drop_files(
                inbox, count, lambda n: n.rsplit(".", 1)[0] + ".txt", IN_CREATE | IN_MOVED_TO
            )
            time.sleep(0.3)
            daemon.stop()
            by_file: dict[str, dict[str, float]] = {}
            for e in daemon.lines():
                if "file" in e and "timestamp" in e:
                    slot = by_file.setdefault(Path(str(e["file"])).name, {})
                    slot.setdefault(str(e.get("event")), parse_ts(str(e["timestamp"])))
            warnings = sorted({str(e.get("event")) for e in daemon.errors()})
        attach_server_times(drops, fake.stop())
    latencies, notice, to_upload, request, finish = [], [], [], [], []
    for d in drops:
        latencies.append((d.transcript - d.closed - SETTLE - d.server_seconds) * 1000)
        ev = by_file.get(d.name, {})
        claimed = ev.get("sfwatch.file_claimed")
        started = ev.get("sfwatch.upload_started")
        if claimed is None or started is None or not d.server_ended:
            continue
        notice.append((claimed - d.closed - SETTLE) * 1000)
        to_upload.append((started - claimed) * 1000)
        request.append((d.server_ended - started - d.server_seconds) * 1000)
        finish.append((d.transcript - d.server_ended) * 1000)
    return {
        "files": len(drops),
        "latencies_ms": [round(v, 2) for v in latencies],
        "median_ms": round(median(latencies), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "server_ms_median": round(median([d.server_seconds * 1000 for d in drops]), 3),
        "breakdown_median_ms": {
            "close_to_claim_minus_settle": round(median(notice), 2),
            "claim_to_upload_started": round(median(to_upload), 2),
            "upload_started_to_response_minus_server": round(median(request), 2),
            "response_to_transcript_in_place": round(median(finish), 2),
        },
        "breakdown_p99_ms": {
            "close_to_claim_minus_settle": round(percentile(notice, 99), 2),
            "claim_to_upload_started": round(percentile(to_upload, 99), 2),
            "upload_started_to_response_minus_server": round(percentile(request, 99), 2),
            "response_to_transcript_in_place": round(percentile(finish, 99), 2),
        },
        "warnings_logged": warnings,
    }


def run(args: argparse.Namespace) -> list[Figure]:
    root = scratch("b")
    count = 20 if args.quick else 50
    detail: dict[str, Any] = {"settle_seconds": SETTLE, "runs": []}
    pooled: list[float] = []
    medians: list[float] = []
    p99s: list[float] = []
    for i in range(args.runs):
        result = sfwatch_run(root / f"run{i}", count)
        shown = {k: v for k, v in result.items() if k != "latencies_ms"}
        print(f"  b run {i + 1}: {shown}", flush=True)
        detail["runs"].append(result)
        pooled += result["latencies_ms"]
        medians.append(result["median_ms"])
        p99s.append(result["p99_ms"])
    med, p99 = median(pooled), percentile(pooled, 99)
    detail["pooled"] = {"files": len(pooled), "median_ms": med, "p99_ms": p99}
    figures = [
        Figure(
            "b: latency - settle - server, median", round(med, 1), "ms", "≤ 20", med <= 20, medians
        ),
        Figure("b: latency - settle - server, p99", round(p99, 1), "ms", "≤ 50", p99 <= 50, p99s),
    ]
    save("b", figures, detail)
    return figures
