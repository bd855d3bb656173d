"""``python -m bench [NAME ...] [--runs N] [--quick]``: run benchmarks, print and save figures.

Names: fake, a, b, c, d, e, f, baseline; ``all`` (the default) runs every one, in
that order. Results go to ``bench/results/<name>.json`` and a one-line summary
of every figure to ``bench/results/summary.txt``.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import time
from pathlib import Path

from bench import common, profiling
from bench.common import RESULTS, Figure, machine, scratch

#: name -> module with ``run(args) -> list[Figure]``
BENCHMARKS = {
    "fake": "bench.fakeonly",
    "a": "bench.throughput",
    "b": "bench.latency",
    "c": "bench.memory",
    "d": "bench.backlog",
    "e": "bench.idle",
    "f": "bench.audioprep",
    "baseline": "bench.baseline",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", default=["all"], help="benchmarks to run")
    parser.add_argument("--runs", type=int, default=3, help="repetitions where practical")
    parser.add_argument("--quick", action="store_true", help="smaller workloads, one run")
    parser.add_argument("--profile", action="store_true", help="py-spy every daemon")
    parser.add_argument(
        "--perf", action="store_true", help="perf record every daemon (kernel and C libraries too)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folders")
    parser.add_argument(
        "--outbox",
        action="store_true",
        help="a: also a hook and a webhook on every file, compared with none (issue 11)",
    )
    parser.add_argument(
        "--transcode",
        action="store_true",
        help="a: files that must be transcoded before upload (preparing ahead of the turn)",
    )
    parser.add_argument(
        "--siblings",
        type=int,
        default=1,
        metavar="K",
        help="a, d: K daemons on the one inbox, each with its own state and C÷K uploads",
    )
    parser.add_argument(
        "--workers",
        default="1",
        metavar="N",
        help="a, d: the config's workers (processes of one daemon: N or auto)",
    )
    args = parser.parse_args(argv)
    if args.workers != "auto" and not (args.workers.isdigit() and int(args.workers) >= 1):
        parser.error("--workers must be a positive integer or auto")
    if args.siblings < 1:
        parser.error("--siblings must be at least 1")
    if args.quick:
        args.runs = 1
        common.SUFFIX = ".quick"
    if args.siblings > 1:
        common.SUFFIX += f".siblings-{args.siblings}"
    if args.workers != "1":
        common.SUFFIX += f".workers-{args.workers}"
    profiling.ENABLED = args.profile
    profiling.PERF = args.perf
    # (checked before any daemon starts: a missing profiler must not leave one running)
    if args.profile and profiling.py_spy() is None:
        parser.error("--profile needs py-spy: .venv/bin/pip install py-spy")
    if args.perf and shutil.which("perf") is None:
        parser.error("--perf needs perf (Debian: apt-get install linux-perf)")
    names = list(BENCHMARKS) if "all" in args.names else args.names
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    print(f"machine: {machine()}")
    started = time.monotonic()
    everything: list[tuple[str, Figure]] = []
    failed: list[str] = []
    for name in names:
        t0 = time.monotonic()
        load = float(Path("/proc/loadavg").read_text(encoding="ascii").split()[0])
        busy = "  (load average {load:.2f}: other work is running, figures will be noisy)"
        print(f"== {name} =={busy.format(load=load) if load > 0.5 else ''}", flush=True)
        module = importlib.import_module(BENCHMARKS[name])
        try:
            figures: list[Figure] = module.run(args)
        except Exception as exc:  # report and go on with the next benchmark
            print(f"  {name} FAILED: {exc!r}", flush=True)
            failed.append(name)
            continue
        finally:
            if not args.keep:
                shutil.rmtree(scratch(name), ignore_errors=True)
                common.note_inodes_freed()
        everything += [(name, f) for f in figures]
        print(f"  ({name}: {time.monotonic() - t0:.0f} s)", flush=True)
    if not args.keep:
        shutil.rmtree(scratch("x").parent, ignore_errors=True)
        common.note_inodes_freed()
    lines = [f"{name:<9}{fig.line().strip()}" for name, fig in everything]
    RESULTS.mkdir(parents=True, exist_ok=True)
    if set(names) == set(BENCHMARKS) and not args.quick:
        Path(RESULTS / "summary.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"== summary ({time.monotonic() - started:.0f} s) ==")
    print("\n".join(lines))
    if failed:
        print(f"failed to run: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
