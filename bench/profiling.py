"""Profiles of the daemon under a benchmark, with py-spy (``pip install py-spy``).

``python -m bench a --profile`` attaches ``py-spy record`` to each daemon the
benchmark starts (sampling every thread, on-CPU samples only, plus ``--gil``
for a second profile of who holds the GIL) and writes the collapsed stacks to
``bench/results/profile-<tag>.txt`` plus a summary of the top entries: self time
(the innermost frame) and inclusive time (every frame on the stack, once).
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


def finish(proc: subprocess.Popen[bytes], tag: str, seconds: float | None = None) -> str:
    """Wait for py-spy to write its file; write and return the summary."""
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait(10)
    path = RESULTS / f"profile-{tag}.txt"
    if not path.exists():
        return f"{path.name}: no profile written"
    text = summarize(path, ticks=seconds * RATE if seconds else None)
    (RESULTS / f"profile-{tag}.summary.txt").write_text(text + "\n", encoding="utf-8")
    return text
