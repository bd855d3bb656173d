"""f: audio preparation with ``sfwatch.audio`` (PyAV), on one core.

Each measurement runs in a child process pinned to one CPU
(``python -m bench.audioprep OP ...``), which reports its CPU time
(``resource.getrusage``: every thread of the process) and its peak RSS (VmHWM).

- **probe**: ``audio.probe`` on 100 ten-second files, 20 each of WAV, MP3, FLAC,
  M4A (AAC) and OGG (Opus); CPU ms per file.
- **transcode and split**: what ``prepare`` does with a 2-hour WAV (44.1 kHz
  mono, 635 MB: over the 50 MB limit): ``loudness`` (one decoding pass, for the
  cut points), ``choose_cuts`` at 3,528 s (the one-hour limit x 0.98), then
  ``transcode`` into 16 kHz mono MP3 parts; CPU s per audio hour. The child's
  peak RSS is the figure "peak memory preparing a 2-hour file".
- **stream-copy split**: a 90-minute MP3 (16 kHz mono, 64 kbit/s: 43 MB, so only
  too long, not too big) is cut without re-encoding: ``stream_copy`` CPU s per audio hour; the
  ``loudness`` pass ``prepare`` runs first to place the cuts is reported apart.

The sources (tone + noise with a 2 s silence every 5 minutes, made with
``tests.audiogen``) are cached in ``bench/results/cache/``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, RESULTS, Figure, median, save, scratch
from sfwatch import audio
from tests.audiogen import write_audio

CACHE = RESULTS / "cache"
HOURS = 2
MAX_SECONDS = 3600 * 0.98
PROBE_FORMATS = (".wav", ".mp3", ".flac", ".m4a", ".ogg")
PROBE_EACH = 20


def _vmhwm_mb() -> float:
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- sources (made once, cached) -------------------------------------------------------


def _silences(seconds: float) -> list[tuple[float, float]]:
    return [(t, t + 2.0) for t in range(300, int(seconds), 300)]


def source(name: str, hours: float) -> Path:
    """A cached source file (``.wav``: 44.1 kHz mono; ``.mp3``: 16 kHz mono)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / name
    if not path.exists():
        seconds = hours * 3600.0
        tmp = path.with_name(f"tmp-{name}")
        started = time.monotonic()
        if name.endswith(".wav"):
            write_audio(tmp, seconds, rate=44_100, silences=_silences(seconds))
        else:
            write_audio(tmp, seconds, rate=16_000, silences=_silences(seconds))
        tmp.rename(path)
        print(f"  f: made {path.name} in {time.monotonic() - started:.0f} s", flush=True)
    return path


def probe_files(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [
        write_audio(folder / f"p{i:02d}{suffix}", 10.0, seed=i)
        for suffix in PROBE_FORMATS
        for i in range(PROBE_EACH)
    ]


# -- the child: one measurement --------------------------------------------------------


def child(op: str, src: Path, out: Path) -> dict[str, Any]:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    result: dict[str, Any] = {"op": op, "rss_after_imports_mb": _vmhwm_mb()}
    if op == "probe":
        per_format: dict[str, list[float]] = {}
        for path in sorted(src.iterdir()):
            t0 = time.process_time()
            audio.probe(path)
            per_format.setdefault(path.suffix, []).append((time.process_time() - t0) * 1000)
        every = [v for values in per_format.values() for v in values]
        result["files"] = len(every)
        result["ms_per_file_median"] = round(median(every), 3)
        result["ms_per_file_mean"] = round(sum(every) / len(every), 3)
        result["ms_per_file_by_format_median"] = {
            k: round(median(v), 3) for k, v in per_format.items()
        }
    else:
        out.mkdir(parents=True, exist_ok=True)
        c0 = _cpu()
        w0 = time.monotonic()
        levels = audio.loudness(src)
        cuts = audio.choose_cuts(levels, MAX_SECONDS)
        c1 = _cpu()
        convert = audio.transcode if op == "transcode" else audio.stream_copy
        parts = convert(src, lambda i: out / f"part{i:03d}.mp3", cuts)
        c2 = _cpu()
        w2 = time.monotonic()
        hours = len(levels) * audio.BLOCK_SECONDS / 3600
        result.update(
            audio_hours=round(hours, 3),
            cuts=cuts,
            parts=len(parts),
            part_bytes=[p.stat().st_size for p in parts],
            loudness_cpu_s=round(c1 - c0, 2),
            convert_cpu_s=round(c2 - c1, 2),
            wall_s=round(w2 - w0, 2),
            loudness_cpu_s_per_hour=round((c1 - c0) / hours, 2),
            convert_cpu_s_per_hour=round((c2 - c1) / hours, 2),
            total_cpu_s_per_hour=round((c2 - c0) / hours, 2),
        )
    result["peak_rss_mb"] = _vmhwm_mb()
    return result


def run_child(op: str, src: Path, out: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.audioprep", op, str(src), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    if done.returncode != 0:
        raise RuntimeError(f"audioprep {op} failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run(args: argparse.Namespace) -> list[Figure]:
    root = scratch("f")
    detail: dict[str, Any] = {"hours": HOURS, "max_seconds": MAX_SECONDS}
    files = probe_files(root / "probe")
    probes = [run_child("probe", files[0].parent, root) for _ in range(args.runs)]
    detail["probe"] = probes
    print(f"  f probe: {probes[-1]}", flush=True)
    wav, mp3 = source("2h-44k.wav", HOURS), source("90min-16k.mp3", 1.5)
    transcode = run_child("transcode", wav, root / "transcode")
    shutil.rmtree(root / "transcode", ignore_errors=True)
    print(f"  f transcode and split: {transcode}", flush=True)
    copy = run_child("stream_copy", mp3, root / "copy")
    shutil.rmtree(root / "copy", ignore_errors=True)
    print(f"  f stream-copy split: {copy}", flush=True)
    detail.update(transcode=transcode, stream_copy=copy)
    probe_ms = median([p["ms_per_file_median"] for p in probes])
    t_hour = transcode["total_cpu_s_per_hour"]
    c_hour = copy["convert_cpu_s_per_hour"]
    peak = transcode["peak_rss_mb"]
    figures = [
        Figure(
            "f: probe, CPU per file (median)",
            probe_ms,
            "ms",
            "< 10",
            probe_ms < 10,
            [p["ms_per_file_median"] for p in probes],
        ),
        Figure("f: transcode+split, CPU per audio hour", t_hour, "s", "< 60", t_hour < 60),
        Figure("f:   of which loudness pass", transcode["loudness_cpu_s_per_hour"], "s"),
        Figure("f: stream-copy split, CPU per audio hour", c_hour, "s", "< 1", c_hour < 1),
        Figure("f:   its loudness pass (decode)", copy["loudness_cpu_s_per_hour"], "s"),
        Figure("f: peak RSS preparing a 2-hour WAV", peak, "MB", "< 150", peak < 150),
    ]
    save("f", figures, detail)
    return figures


if __name__ == "__main__":
    op_, src_, out_ = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    print(json.dumps(child(op_, src_, out_)))
