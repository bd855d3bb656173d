"""e: CPU of an idle daemon over a big watched tree.

The tree is what an inbox looks like after months of use: 100 subfolders, each
with 40 transcripts (``.txt``) where recordings arrived and 20 files that do not
match ``include`` (``.jpg``, ``.pdf``), and ``done/`` holding the 40 originals
of each subfolder (small WAVs): 10,000 files in 201 folders, no audio waiting.
``sfwatch run`` (default settle and ``rescan_seconds: 60``) starts; once it has
been up for 5 s, its CPU time (utime + stime from /proc/<pid>/stat) is read
over 60 s, in which nothing arrives; the window includes one periodic rescan.
Figures: CPU % of one core with inotify (``poll: false``) and with polling
(``poll: true``: watchdog's polling observer walks the tree every 2 s), and,
for reference, with an empty inbox.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from bench.common import (
    DaemonRun,
    FakeServer,
    Figure,
    cpu_seconds,
    save,
    scratch,
    wav_bytes,
    write_config,
)

FOLDERS = 100
TRANSCRIPTS = 40
OTHERS = 20
WARMUP = 5.0


def build_tree(inbox: Path) -> int:
    """The 10,000-file tree; returns the number of files written."""
    count = 0
    wav = wav_bytes(0.1)
    for i in range(FOLDERS):
        sub, done = inbox / f"s{i:03d}", inbox / "done" / f"s{i:03d}"
        sub.mkdir(parents=True)
        done.mkdir(parents=True)
        for j in range(TRANSCRIPTS):
            (sub / f"rec{j:03d}.txt").write_text(f"transcript {i} {j}\n", encoding="utf-8")
            (done / f"rec{j:03d}.wav").write_bytes(wav)
            count += 2
        for j in range(OTHERS):
            suffix = ".jpg" if j % 2 else ".pdf"
            (sub / f"other{j:03d}{suffix}").write_bytes(b"x" * 100)
            count += 1
    return count


def idle_run(root: Path, *, poll: bool, tree: bool, seconds: float) -> dict[str, Any]:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    files = build_tree(root / "inbox") if tree else 0
    with FakeServer(root, 0.0) as fake:
        config = write_config(root, fake.url, settle=3.0, poll=poll, rescan=60.0)
        with DaemonRun(
            config, sample_interval=1.0, profile=f"e-{'poll' if poll else 'inotify'}"
        ) as d:
            started = d.wait_event("sfwatch.watch_started")[0]
            time.sleep(WARMUP)
            before = cpu_seconds(d.pid) or 0.0
            t0 = time.monotonic()
            time.sleep(seconds)
            after = cpu_seconds(d.pid) or 0.0
            elapsed = time.monotonic() - t0
            d.stop()
            assert d.sampler is not None
            peak = d.sampler.peak_rss_mb
            claimed = len(d.events("sfwatch.file_claimed"))
        fake.stop()
    return {
        "files": files,
        "poll": poll,
        "polling_reported": started.get("polling"),
        "seconds": round(elapsed, 1),
        "cpu_seconds": round(after - before, 2),
        "cpu_percent": round(100 * (after - before) / elapsed, 3),
        "peak_rss_mb": peak,
        "files_claimed": claimed,
    }


def run(args: argparse.Namespace) -> list[Figure]:
    root = scratch("e")
    seconds = 20.0 if args.quick else 60.0
    detail: dict[str, Any] = {"runs": []}
    results: dict[str, dict[str, Any]] = {}
    for label, poll, tree, secs in (
        ("inotify", False, True, seconds),
        ("polling", True, True, seconds),
        ("inotify, empty inbox", False, False, seconds / 2),
    ):
        result = idle_run(
            root / label.replace(" ", "-").replace(",", ""), poll=poll, tree=tree, seconds=secs
        )
        result["label"] = label
        print(f"  e {label}: {result}", flush=True)
        detail["runs"].append(result)
        results[label] = result
    ino = results["inotify"]["cpu_percent"]
    pol = results["polling"]["cpu_percent"]
    empty = results["inotify, empty inbox"]["cpu_percent"]
    figures = [
        Figure("e: idle CPU, 10,000 files, inotify", ino, "%", "≤ 0.3", ino <= 0.3),
        Figure("e: idle CPU, 10,000 files, polling", pol, "%", "documented"),
        Figure("e: idle CPU, empty inbox, inotify", empty, "%"),
    ]
    save("e", figures, detail)
    return figures
