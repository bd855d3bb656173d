"""Profiles of the daemon under a benchmark, with py-spy (``pip install py-spy``).

``python -m bench a --profile`` attaches ``py-spy record`` to each daemon the
benchmark starts (sampling every thread, on-CPU samples only, plus ``--gil``
for a second profile of who holds the GIL) and writes the collapsed stacks to
``bench/results/profile-<tag>.txt`` plus a summary of the top entries: self time
(the innermost frame) and inclusive time (every frame on the stack, once).

``python -m bench a --perf`` attaches ``perf record`` instead (or as well): it sees
what py-spy cannot, the kernel and the C libraries (the interpreter itself, SQLite,
FFmpeg), and writes ``bench/results/perf-<tag>.data`` plus a summary: the share of
the daemon's CPU in each library and in a few kernel paths that decide our figures
(docs/benchmarks.md, "Where the CPU goes").
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
#: set by ``python -m bench --profile``
ENABLED = False
#: set by ``python -m bench --perf``
PERF = False


def py_spy() -> str | None:
    """The py-spy executable (the venv's, else one on PATH)."""
    return shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")


RATE = 200


def attach(pid: int, tag: str, *, gil: bool = False, rate: int = RATE) -> subprocess.Popen[bytes]:
    """Start ``py-spy record`` on ``pid``; it stops by itself when the process exits."""
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
    command += ["--output", str(RESULTS / f"profile-{tag}.txt"), "--nonblocking", "--threads"]
    if gil:
        command.append("--gil")
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _frame_name(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``func (module.py)``: one entry per function."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rstrip(")")
    short = "/".join(Path(file).parts[-2:]) if file else ""
    return f"{name} ({short})" if short else name


def _thread_group(frame: str) -> str:
    """``thread (123): sfwatch-upload_7`` -> ``sfwatch-upload``."""
    name = frame.partition("): ")[2] or "?"
    return re.sub(r"[_-]\d+$", "", name)


def summarize(path: Path, top: int = 25, ticks: float | None = None) -> str:
    """The top self and inclusive entries of a collapsed-stack file, as text.

    ``ticks`` (sampling rate x seconds profiled) turns each thread group's sample
    count into the share of wall time it was on the CPU (or, with --gil, held the GIL).
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    main_own: Counter[str] = Counter()
    total = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        raw = stack.split(";")
        if raw[0].startswith("thread "):
            threads[_thread_group(raw[0])] += count
        frames = [_frame_name(f) for f in raw]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        if raw[0].endswith(": MainThread"):
            main_own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    lines = [f"{path.name}: {total} samples"]
    if ticks:
        lines.append("  share of wall time, by thread:")
        lines += [f"    {100 * c / ticks:5.1f}%  {name}" for name, c in threads.most_common()]
    main_total = sum(main_own.values())
    tables = [("self", own, total), ("inclusive", inclusive, total)]
    if main_total:
        tables.append(("self, main thread only (share of its samples)", main_own, main_total))
    for title, counter, base in tables:
        lines.append(f"  top {title}:")
        lines += [
            f"    {100 * c / max(base, 1):5.1f}%  {name}" for name, c in counter.most_common(top)
        ]
    return "\n".join(lines)


def _ended(proc: subprocess.Popen[bytes], path: Path, wait: float) -> bool:
    """Wait for a profiler to end (ending it after ``wait`` s); whether it wrote ``path``."""
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait(wait)
    return path.exists()


def finish(proc: subprocess.Popen[bytes], tag: str, seconds: float | None = None) -> str:
    """Wait for py-spy to write its file; write and return the summary."""
    path = RESULTS / f"profile-{tag}.txt"
    if not _ended(proc, path, 30):
        return f"{path.name}: no profile written"
    text = summarize(path, ticks=seconds * RATE if seconds else None)
    (RESULTS / f"profile-{tag}.summary.txt").write_text(text + "\n", encoding="utf-8")
    return text


#: kernel and interpreter entry points worth a line of their own (inclusive shares)
PERF_PATHS = {
    "__ext4_new_inode": "making an inode (ext4)",
    "do_fsync": "fsync",
    "__x64_sys_futex": "futex: the interpreter lock's hand-offs",
    "__schedule": "task switches",
    "__x64_sys_openat": "openat",
    "gc_collect_main": "the cyclic garbage collector",
    "_PyEval_EvalFrameDefault": "the bytecode loop (its own time)",
}


def attach_perf(pid: int, tag: str) -> subprocess.Popen[bytes]:
    """Start ``perf record`` on ``pid`` (every thread, call graphs); it ends with the process."""
    exe = shutil.which("perf")
    if exe is None:
        raise RuntimeError("perf is not installed (Debian: apt-get install linux-perf)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = [exe, "record", "-e", "cpu-clock", "-F", "999", "-g", "-p", str(pid)]
    command += ["-o", str(RESULTS / f"perf-{tag}.data")]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _perf_report(data: Path, *options: str) -> list[tuple[float, float | None, str]]:
    """``perf report`` rows as (share, self share or None, name)."""
    command = ["perf", "report", "-i", str(data), "--stdio", "-g", "none", *options]
    text = subprocess.run(command, capture_output=True, text=True, check=False).stdout
    rows = []
    for line in text.splitlines():
        match = re.match(r"\s*([\d.]+)%\s+(?:([\d.]+)%\s+)?(?:\[[.k]\]\s+)?(.+?)\s*$", line)
        if match and not line.startswith("#"):
            own = float(match[2]) if match[2] is not None else None
            rows.append((float(match[1]), own, match[3]))
    return rows


def finish_perf(proc: subprocess.Popen[bytes], tag: str) -> str:
    """Wait for perf to write its file; write and return the summary."""
    data = RESULTS / f"perf-{tag}.data"
    if not _ended(proc, data, 60):
        return f"{data.name}: no profile written"
    lines = [f"{data.name}: share of the daemon's CPU", "  by library:"]
    libraries = _perf_report(data, "--no-children", "--sort", "dso")
    lines += [f"    {share:5.1f}%  {name}" for share, _, name in libraries[:8]]
    lines.append("  paths (inclusive; the bytecode loop: its own time):")
    symbols = {name: (share, own) for share, own, name in _perf_report(data, "--sort", "sym")}
    for symbol, meaning in PERF_PATHS.items():
        share, own = symbols.get(symbol, (0.0, 0.0))
        shown = own if symbol == "_PyEval_EvalFrameDefault" and own is not None else share
        lines.append(f"    {shown:5.1f}%  {meaning} ({symbol})")
    text = "\n".join(lines)
    (RESULTS / f"perf-{tag}.summary.txt").write_text(text + "\n", encoding="utf-8")
    return text
