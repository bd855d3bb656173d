"""Kill-point and I/O-error sweep: a SIGKILL or an EIO at any syscall of a job converges.

docs/design.md promises P1, P4 and P8, proven on the real daemon: ``sfwatch run`` in a
subprocess, the fake API on 127.0.0.1, tiny real WAVs, ``api.concurrency: 1``.
strace injects the fault into one syscall of the job; one judge (`judge`) then
checks the end state of every case.

How a point is hit. strace counts ``when=N`` per *thread* and per *syscall*
(not per process, not per syscall set), so a daemon started under ``strace -f``
cannot reach a worker's first calls: the main thread's start-up writes and
fsyncs use up every small N first. So each point is one syscall, in one thread,
counted from a known moment:

1. the daemon starts (no strace) and finishes a warm-up file, so that its one
   upload thread exists (the only thread that appears then);
2. ``strace -p TID -e inject=SYSCALL:signal=KILL:when=N`` (or ``error=EIO``)
   attaches to that thread alone, or to the main thread (claims, the ledger
   rows the scheduler writes, log lines);
3. the test files are dropped: ``sub/good.wav`` (to ``done/``) and ``bad.wav``,
   which the fake rejects with a 400 (to ``failed/``).

A calibration run per scenario (every thread traced, nothing injected) counts
each syscall per thread: N sweeps 1..count. The call that was hit is read back
from strace's own trace, so every report names it.

- kill sweep: SIGKILL at the point, then ``sfwatch run --burst`` without
  strace until it exits (bounded), then the judge;
- error sweep: EIO (ENOSPC for write/fsync, EXDEV for rename/link) at the point,
  the daemon left running: it must converge by itself within ``CONVERGE`` s;
- stale-handle sweep: ESTALE (what NFS answers once the server removed or replaced
  the file or folder a handle names) at an open or a stat (renames and unlinks too
  with SFWATCH_SWEEP=full), or EIO at an open, on ``disk``: like an error point,
  the daemon must converge by itself (all of its 191 ESTALE and 60 EIO points did
  when it was written, after two fixes it called for);
- scenarios: ``disk`` (one file system), ``tmpfs`` (``done_dir`` and
  ``failed_dir`` on /dev/shm, so every move is a cross-file-system copy) and
  ``outputs`` (one file system, each file written as .txt, .srt and .json: a kill
  or an error between two outputs must still leave all of them or none).

Budget: by default each test runs a deterministic sample of its points (a
stride with a seeded offset): 2 kill points and 1 error point per test, about
70 s for the module on two cores. A point costs 1.5-3 s, one that does not
converge CONVERGE s more.

- ``SFWATCH_SWEEP=full``: every point (~450 points; 6 min of kills, about 35 min
  of errors while many points do not converge);
- ``SFWATCH_SWEEP=<n>``: n points per test;
- ``SFWATCH_SWEEP_SEED=<s>``: another sample (default 9);
- ``SFWATCH_SWEEP_POINTS=linkat#4@worker,write#2@main EIO``: only these points (as
  printed; without the errno, every error at that call);
- ``SFWATCH_SWEEP_REPORT=<file>``: append one JSON line per point (for triage).

``pytest -s tests/test_sweep.py`` prints each point and the figures. Needs
strace and ptrace (skipped otherwise); Linux only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    API_KEY,
    DaemonProcess,
    daemon_process,
    poll_until,
    run_cli,
    write_config,
)
from tests.fakeapi import FakeAPI, Reply, Upload
from tests.test_crash import wav

#: the syscall groups swept; each syscall of a group is swept on its own
GROUPS: dict[str, tuple[str, ...]] = {
    "rename": ("rename", "renameat", "renameat2"),
    "link": ("link", "linkat"),
    "unlink": ("unlink", "unlinkat"),
    "fsync": ("fsync", "fdatasync"),
    "write": ("write", "pwrite64"),
}
#: more syscalls swept for ESTALE alone (``test_stale_handle_sweep``)
STALE_GROUPS: dict[str, tuple[str, ...]] = {
    "open": ("openat",),
    "stat": ("newfstatat", "fstat", "getdents64"),
}
#: every group the calibration counts
ALL_GROUPS = {**GROUPS, **STALE_GROUPS}
#: the errors injected per group (besides EIO, the one each group meets in real life)
ERRORS: dict[str, tuple[str, ...]] = {
    "rename": ("EIO", "EXDEV"),
    "link": ("EIO", "EXDEV"),
    "unlink": ("EIO",),
    "fsync": ("EIO", "ENOSPC"),
    "write": ("EIO", "ENOSPC"),
}
SCENARIOS = ("disk", "tmpfs", "outputs")
#: what the ``outputs`` scenario writes per file (the others: txt only)
OUTPUTS = ("txt", "srt", "json")
THREADS = ("main", "worker")
KILL = "KILL"

MODE = os.environ.get("SFWATCH_SWEEP", "")
FULL = MODE == "full"
#: points per test when sampling (kill sweep, error sweep)
SAMPLE = (int(MODE), int(MODE)) if MODE.isdigit() else (2, 1)
SEED = int(os.environ.get("SFWATCH_SWEEP_SEED", "9"))
REPORT = os.environ.get("SFWATCH_SWEEP_REPORT")
ONLY = {p.strip() for p in os.environ.get("SFWATCH_SWEEP_POINTS", "").split(",") if p.strip()}

#: seconds a --burst restart may take (a failing step backs off 0-2 s, then 0-4 s, ...)
RESTART = 25.0
#: seconds a daemon hit by an error has to converge by itself
CONVERGE = 15.0
#: files a case holds: the warm-up, the good one, the rejected one
FILES = 3

pytestmark = [
    pytest.mark.sweep,
    pytest.mark.slow,
    pytest.mark.timeout(7200 if FULL else 120),
]


# -- the points ------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One fault: ``action`` (KILL or an errno) at call ``n`` of ``syscall`` in ``thread``."""

    syscall: str
    thread: str
    n: int
    action: str = KILL

    def inject(self) -> str:
        """strace's ``-e inject=`` expression for this point."""
        what = "signal=KILL" if self.action == KILL else f"error={self.action}"
        return f"inject={self.syscall}:{what}:when={self.n}"

    def __str__(self) -> str:
        tail = "" if self.action == KILL else f" {self.action}"
        return f"{self.syscall}#{self.n}@{self.thread}{tail}"


@dataclass
class Calibration:
    """Calls per (thread, syscall) while a case's files are processed, nothing injected."""

    counts: Counter[tuple[str, str]]
    seconds: float

    def points(self, group: str, actions: tuple[str, ...]) -> list[Point]:
        """Every point of ``group``: each action at each call of each thread."""
        return [
            Point(syscall, thread, n, action)
            for action in actions
            for syscall in ALL_GROUPS[group]
            for thread in THREADS
            for n in range(1, self.counts[thread, syscall] + 1)
        ]

    def others(self, group: str) -> int:
        """Calls of ``group`` in threads the sweep does not attach to (none expected)."""
        return sum(self.counts["other", s] for s in ALL_GROUPS[group])


def sample(points: list[Point], k: int, key: str) -> list[Point]:
    """``k`` points spread evenly over ``points`` (seeded offset); all of them when FULL."""
    if ONLY:
        return [p for p in points if {str(p), str(p).split()[0]} & ONLY]
    if FULL or len(points) <= k:
        return points
    offset = random.Random(f"{SEED}-{key}").randrange(len(points))
    return sorted(
        {points[(offset + i * len(points) // k) % len(points)] for i in range(k)},
        key=points.index,
    )


# -- one case: a config, its files, its daemon ------------------------------------------


def sha(data: bytes) -> str:
    """Hex SHA-256."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Original:
    """A file the test drops, and where it must end: ``done`` or ``failed``."""

    rel: str
    data: bytes
    expect: str


@dataclass
class Case:
    """One run's folders, config and files."""

    root: Path
    config: Path
    inbox: Path
    done_dir: Path
    failed_dir: Path
    shm: Path | None
    originals: list[Original] = field(default_factory=list)
    #: the formats written beside each file in done/
    outputs: tuple[str, ...] = ("txt",)

    def drop(self, original: Original) -> None:
        """Write ``original`` into the inbox (complete at once: tiny files)."""
        self.originals.append(original)
        path = self.inbox / original.rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(original.data)

    def short(self, text: str) -> str:
        """``text`` with the case's folders and job-specific names made short and stable."""
        if self.shm is not None:
            text = text.replace(f"{self.shm}/", "<shm>/")
        text = text.replace(f"{self.root}/", "")
        text = re.sub(r"AT_FDCWD(<[^>]*>)?, ", "", text)
        text = re.sub(r"\b\d+<([^>]*)>", r"<\1>", text)
        text = re.sub(r"\.sfwatch/work/[^/\"]+/[0-9a-f]{12}", ".sfwatch/work/I/J", text)
        text = re.sub(r"\.sfwatch/work/[^/\"]+/\.lease", ".sfwatch/work/I/.lease", text)
        return re.sub(r"\.[0-9a-f]{8,12}\.sfwatch-tmp", ".X.sfwatch-tmp", text)


def new_case(root: Path, api: FakeAPI, scenario: str, shm: Path | None) -> Case:
    """Folders and a config for one run; ``tmpfs`` puts done/ and failed/ on ``shm``."""
    root.mkdir(parents=True, exist_ok=True)
    dirs: dict[str, str] = {}
    if scenario == "tmpfs":
        assert shm is not None
        shm.mkdir(parents=True, exist_ok=True)
        dirs = {"done_dir": str(shm / "done"), "failed_dir": str(shm / "failed")}
    outputs = OUTPUTS if scenario == "outputs" else ("txt",)
    config = write_config(
        root,
        api.url,
        api={"concurrency": 1},
        watch={"settle_seconds": 0.1, "rescan_seconds": 1, "outputs": list(outputs), **dirs},
        log_level="info",
    )
    inbox = root / "inbox"
    # Watched before the files arrive, so that events come in the order they are written.
    (inbox / "sub").mkdir()
    return Case(
        root,
        config,
        inbox,
        Path(dirs.get("done_dir", inbox / "done")),
        Path(dirs.get("failed_dir", inbox / "failed")),
        shm if scenario == "tmpfs" else None,
        outputs=outputs,
    )


def rejecting(api: FakeAPI) -> set[str]:
    """Make ``api`` answer 400 (the file's own fault) to the contents added to the set."""
    bad: set[str] = set()
    reject = Reply(400, {"code": 20015, "message": "Invalid audio", "data": None})
    api.responder = lambda upload: reject if upload.sha256 in bad else None
    return bad


def case_files(rng: random.Random, bad: set[str]) -> list[Original]:
    """The files a point drops once strace is attached: one good, one the API rejects."""
    good, rejected = wav(rng), wav(rng)
    bad.add(sha(rejected))
    return [Original("sub/good.wav", good, "done"), Original("bad.wav", rejected, "failed")]


def drop_in_turn(case: Case, daemon: DaemonProcess, originals: list[Original]) -> None:
    """Drop each file once the one before it is claimed: the same order of calls every run."""
    for i, original in enumerate(originals):
        if i:
            poll_until(_claimed(daemon, case.inbox / originals[i - 1].rel), 10)
        case.drop(original)


def _claimed(daemon: DaemonProcess, path: Path) -> Callable[[], bool]:
    return lambda: daemon.proc.poll() is not None or not path.exists()


def threads_of(pid: int) -> set[int]:
    """The thread ids of a process."""
    try:
        return {int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()}
    except FileNotFoundError:
        return set()


def tracer_of(pid: int, tid: int) -> int:
    """The pid tracing thread ``tid`` (0: none)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


def over(case: Case, daemon: DaemonProcess, trace: Path) -> bool:
    """Every job logged as over; or, the error injected (it may have hit a log line), the
    judge content with the files and the ledger."""
    if ended(daemon) >= FILES:
        return True
    injected = trace.exists() and "(INJECTED)" in trace.read_text(errors="replace")
    return injected and not judge(case, [], status=False).problems


def ended(daemon: DaemonProcess) -> int:
    """Jobs the daemon logged as over (finished, or vanished from the work area)."""
    return sum(
        1
        for e in daemon.lines()
        if e.get("event") in ("sfwatch.job_finished", "sfwatch.job_vanished")
    )


@dataclass
class Warm:
    """A daemon that finished its warm-up file, and its threads."""

    daemon: DaemonProcess
    main: int
    worker: int


@contextlib.contextmanager
def warm_daemon(case: Case, rng: random.Random) -> Iterator[Warm]:
    """Start ``sfwatch run`` (not burst) and let it finish a warm-up file."""
    with daemon_process(case.config) as daemon:
        pid = daemon.proc.pid
        if not poll_until(lambda: daemon.events("sfwatch.daemon_started"), 20):
            pytest.fail(f"the daemon did not start: {daemon.lines()[-5:]}")
        before = threads_of(pid)
        case.drop(Original("warmup.wav", wav(rng), "done"))
        if not poll_until(lambda: daemon.events("sfwatch.job_finished"), 20):
            pytest.fail(f"the warm-up file did not finish: {daemon.lines()[-5:]}")
        new = threads_of(pid) - before
        if len(new) != 1:
            pytest.fail(f"expected one new thread (the upload worker), found {sorted(new)}")
        yield Warm(daemon, pid, new.pop())


@contextlib.contextmanager
def strace(pid: int, tids: list[int], trace: Path, *options: str) -> Iterator[None]:
    """strace attached to threads ``tids`` of ``pid`` for the block; detached at the end.

    With ``-f`` in ``options`` it attaches to every thread of ``pid`` (and follows new ones).
    """
    command = ["strace", "-qq", "-y", "-s", "24", "-o", str(trace), *options]
    for tid in [pid] if "-f" in options else tids:
        command += ["-p", str(tid)]
    with (trace.parent / f"{trace.name}.stderr").open("wb") as err:
        tracer = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
    try:
        attached = poll_until(
            lambda: tracer.poll() is not None or all(tracer_of(pid, t) == tracer.pid for t in tids),
            10,
        )
        if not attached or tracer.poll() is not None:
            message = (trace.parent / f"{trace.name}.stderr").read_text(errors="replace")
            pytest.fail(f"strace did not attach to {tids}: {message}")
        yield
    finally:
        if tracer.poll() is None:
            tracer.terminate()  # detaches, leaving the daemon running
        try:
            tracer.wait(10)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait(10)


def stop(daemon: DaemonProcess, problems: list[str]) -> None:
    """Warm-stop a daemon still running (no upload is stuck here: 20 s is plenty)."""
    if daemon.proc.poll() is not None:
        return
    daemon.signal(signal.SIGTERM)
    try:
        daemon.wait(20)
    except subprocess.TimeoutExpired:
        problems.append("the daemon did not stop within 20 s of SIGTERM")
        daemon.kill()


def hit(case: Case, trace: Path, point: Point) -> str | None:
    """The call strace injected into, from its trace (None: the point was not reached)."""
    if not trace.exists():
        return None
    text = trace.read_text(errors="replace")
    calls = [x for x in text.splitlines() if x.startswith(f"{point.syscall}(")]
    if point.action != KILL:
        calls = [x for x in calls if "(INJECTED)" in x]
    elif "killed by SIGKILL" not in text:
        return None
    # Only the point's syscall in the point's thread is traced: the last call is the one.
    return case.short(calls[-1])[:220] if calls else None


# -- the judge -------------------------------------------------------------------------


@dataclass
class Verdict:
    """What the judge found wrong (``problems``) and the contents uploaded twice."""

    problems: list[str]
    doubles: list[str]


def _files(top: Path | None) -> list[Path]:
    if top is None or not top.exists():
        return []
    return sorted(Path(d) / n for d, _, names in os.walk(top) for n in names)


def _under(path: Path, folder: Path) -> bool:
    return folder == path or folder in path.parents


def _transcript_of(case: Case, original: Path, fmt: str = "txt") -> Path:
    """Where the transcript (or another output) of an original in done/ stands: beside
    where it arrived."""
    return case.inbox / original.relative_to(case.done_dir).parent / f"{original.stem}.{fmt}"


def judge(case: Case, uploads: list[Upload], *, status: bool = True) -> Verdict:
    """Every original once, in done/ with its transcript or failed/ with its error file.

    Also: nothing left in the inbox or the work area (lease files aside), no
    ``*.sfwatch-tmp`` anywhere, every ledger row closed and pointing where the file
    is, ``sfwatch status --json`` agreeing (unless ``status`` is false), and no
    content uploaded more than twice.
    """
    problems: list[str] = []
    work = case.inbox / ".sfwatch"
    files = sorted(set(_files(case.inbox) + _files(case.shm)))
    by_digest: dict[str, list[Path]] = {}
    for path in files:
        if not path.is_symlink():
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue  # removed by the running daemon while we looked (the error sweep)
            by_digest.setdefault(sha(data), []).append(path)
    accounted: set[Path] = set()
    placed: dict[Path, Original] = {}
    for original in case.originals:
        found = by_digest.get(sha(original.data), [])
        accounted.update(found)
        real = [p for p in found if not p.name.endswith(".sfwatch-tmp")]  # temps: see below
        for path in real:  # a copy's transcript or error file is not "unexpected" too
            if _under(path, case.done_dir):
                accounted.update(_transcript_of(case, path, fmt) for fmt in case.outputs)
            if _under(path, case.failed_dir):
                accounted.add(path.with_name(f"{path.name}.error.json"))
        if len(real) != 1:
            names = ", ".join(case.short(str(p)) for p in real) or "nowhere"
            problems.append(f"{original.rel}: {len(real)} copies ({names})")
            continue
        path = real[0]
        where = (
            "done"
            if _under(path, case.done_dir)
            else "failed"
            if _under(path, case.failed_dir)
            else "work area"
            if _under(path, work)
            else "inbox"
        )
        if where != original.expect:
            short = case.short(str(path))
            problems.append(f"{original.rel}: in the {where} ({short}), not in {original.expect}/")
            continue
        placed[path] = original
        if where == "done":
            transcript = _transcript_of(case, path)
            want = FakeAPI.text_for(sha(original.data)) + "\n"
            if not transcript.is_file():
                problems.append(f"{original.rel}: no transcript {case.short(str(transcript))}")
            elif transcript.read_text(encoding="utf-8", errors="replace") != want:
                problems.append(f"{original.rel}: transcript {transcript.name} is not its text")
            for fmt in case.outputs[1:]:  # all of them beside it, or it is not done
                other = _transcript_of(case, path, fmt)
                if not other.is_file() or not other.stat().st_size:
                    problems.append(f"{original.rel}: no {fmt} output {case.short(str(other))}")
        else:
            error_file = path.with_name(f"{path.name}.error.json")
            try:
                reason = json.loads(error_file.read_text(encoding="utf-8"))["reason"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                problems.append(f"{original.rel}: no usable {error_file.name} ({exc!r})")
            else:
                if reason != "api_rejected":
                    problems.append(f"{original.rel}: failed with reason {reason!r}")
    for path in files:
        if path in accounted:
            continue
        if path.name.endswith(".sfwatch-tmp"):
            continue  # reported below, with those outside the watched tree
        if _under(path, work):
            if path.name != ".lease":
                problems.append(f"left in the work area: {case.short(str(path))}")
        else:
            problems.append(f"unexpected file: {case.short(str(path))}")
    temps = [p for top in (case.root, case.shm) for p in _files(top)]
    problems += [
        f"temp file left: {case.short(str(p))}" for p in temps if p.name.endswith(".sfwatch-tmp")
    ]
    problems += _judge_ledger(case, placed, status=status)
    doubles: list[str] = []
    for original in case.originals:
        n = sum(1 for u in uploads if u.sha256 == sha(original.data) and u.body_complete)
        if n > 2:
            problems.append(f"{original.rel}: uploaded {n} times")
        elif n == 2:
            doubles.append(original.rel)
    return Verdict(problems, doubles)


def _judge_ledger(case: Case, placed: dict[Path, Original], *, status: bool) -> list[str]:
    """Ledger rows closed and where the files are; ``status --json`` saying the same."""
    problems: list[str] = []
    ledger = case.root / "state" / "ledger.sqlite3"
    try:
        with contextlib.closing(sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)) as db:
            rows = db.execute("SELECT job_id, rel, status, final_path FROM jobs").fetchall()
            counted = dict(
                db.execute(
                    "SELECT CASE WHEN status IN ('done', 'failed') THEN outcome ELSE status END,"
                    " count(*) FROM jobs GROUP BY 1"
                ).fetchall()
            )
    except sqlite3.Error as exc:
        return [f"ledger unreadable: {exc}"]
    for job_id, rel, state, _ in rows:
        if state not in ("done", "failed", "retried"):
            problems.append(f"ledger: job {job_id} ({rel}) is {state!r}")
    finals: dict[str, tuple[str, str]] = {str(r[3]): (str(r[0]), str(r[2])) for r in rows if r[3]}
    for path, original in placed.items():
        row = finals.get(str(path))
        if row is None:
            problems.append(f"ledger: no row puts {original.rel} at {case.short(str(path))}")
        elif row[1] != original.expect:
            problems.append(f"ledger: job {row[0]} ({original.rel}) is {row[1]!r}")
    if not status:
        return problems
    result = run_cli("status", "-c", str(case.config), "--json")
    try:
        report: dict[str, Any] = json.loads(result.stdout)
    except ValueError:
        return [*problems, f"status --json: exit {result.returncode}, {result.stderr[-300:]!r}"]
    counts = report.get("counts")
    if counts != counted:
        problems.append(f"status --json counts {counts} but the ledger holds {counted}")
    want = Counter(o.expect for o in case.originals)
    if isinstance(counts, dict):
        seen = {"done": counts.get("done", 0) + counts.get("dedup", 0)}
        seen["failed"] = counts.get("failed", 0)
        if seen != {"done": want["done"], "failed": want["failed"]} or set(counts) - {
            "done",
            "dedup",
            "failed",
        }:
            problems.append(f"status --json counts {counts}; the files say {dict(want)}")
    failed_paths = {f.get("failed_path") for f in report.get("recent_failures", [])}
    for path, original in placed.items():
        if original.expect == "failed" and str(path) not in failed_paths:
            problems.append(f"status --json: no recent failure at {case.short(str(path))}")
    return problems


# -- running points --------------------------------------------------------------------


@dataclass
class Result:
    """One point's run."""

    point: Point
    call: str | None  # the syscall hit (None: the point was not reached)
    problems: list[str]
    doubles: list[str]
    seconds: float
    log: list[str]  # what the daemons logged as going wrong, for the report


def run_point(case: Case, api: FakeAPI, point: Point, rng: random.Random) -> Result:
    """Inject ``point`` into a warm daemon while it processes the test files; judge."""
    started = time.monotonic()
    bad = rejecting(api)
    problems: list[str] = []
    trace = case.root / "strace.out"
    with warm_daemon(case, rng) as warm:
        daemon = warm.daemon
        tid = warm.main if point.thread == "main" else warm.worker
        with strace(warm.main, [tid], trace, "-e", f"trace={point.syscall}", "-e", point.inject()):
            drop_in_turn(case, daemon, case_files(rng, bad))
            wait = RESTART if point.action == KILL else CONVERGE
            done = poll_until(
                lambda: daemon.proc.poll() is not None or over(case, daemon, trace), wait
            )
        crashed = daemon.proc.poll()
        if point.action != KILL:
            if crashed is not None:
                problems.append(f"the daemon exited by itself (status {crashed})")
            elif not done:
                problems.append(f"not converged within {CONVERGE:g} s")
        elif crashed is None and not done:
            problems.append(f"the files were not processed within {RESTART:g} s")
        stop(daemon, problems)
    call = hit(case, trace, point)
    if point.action == KILL:
        with daemon_process(case.config, "--burst") as again:
            try:
                status = again.wait(RESTART)
            except subprocess.TimeoutExpired:
                problems.append(f"the --burst restart did not end within {RESTART:g} s")
            else:
                if status != 0:
                    problems.append(f"the --burst restart exited with {status}")
    verdict = judge(case, api.uploads)
    problems += verdict.problems
    seconds = time.monotonic() - started
    return Result(point, call, problems, verdict.doubles, seconds, log_notes(case))


def log_notes(case: Case) -> list[str]:
    """The daemons' warnings and errors (their event and error), each once."""
    notes: list[str] = []
    for log in sorted(case.root.glob("daemon-*.log")):
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                entry = {"event": "(not JSON)", "error": line}
            if not isinstance(entry, dict) or entry.get("event") == "sfwatch.job_finished":
                continue
            if entry.get("level", "error") not in ("warning", "error", "critical"):
                continue
            exception = str(entry.get("exception", "")).strip().splitlines() or [""]
            error = entry.get("error") or exception[-1]  # a traceback's last line: the error
            note = case.short(f"{entry.get('event')}: {error}")
            if note not in notes:
                notes.append(note)
    return notes[:6]


def sweep(
    kind: str,
    group: str,
    scenario: str,
    *,
    points: list[Point],
    total: int,
    calibration: Calibration,
    root: Path,
    shm: Path | None,
) -> None:
    """Run ``points`` (one fresh case and fake API each); fail listing every bad end state."""
    results: list[Result] = []
    started = time.monotonic()
    for i, point in enumerate(points):
        with FakeAPI(api_key=API_KEY) as api:
            case = new_case(root / f"p{i:03d}", api, scenario, shm / f"p{i:03d}" if shm else None)
            result = run_point(case, api, point, random.Random(f"{SEED}-{point}"))
        results.append(result)
        state = "ok" if not result.problems else f"{len(result.problems)} problem(s)"
        print(f"  {point}  [{result.seconds:.1f} s]  {result.call or 'not reached'}  {state}")
        for problem in result.problems:
            print(f"      - {problem}")
        for note in result.log if result.problems else []:
            print(f"      log: {note}")
        if REPORT:
            entry = {"kind": kind, "group": group, "scenario": scenario, **asdict(result)}
            with Path(REPORT).open("a", encoding="utf-8") as out:
                out.write(json.dumps(entry, default=str) + "\n")
    bad = [r for r in results if r.problems]
    fired = sum(1 for r in results if r.call)
    doubles = [r for r in results if r.doubles]
    others = calibration.others(group)
    print(
        f"{kind} sweep {group}/{scenario}: {len(points)} of {total} points"
        f"{'' if FULL else ' (chosen)' if ONLY else ' (sampled; SFWATCH_SWEEP=full for all)'}"
        f", {fired} reached, "
        f"{len(bad)} bad end states, {len(doubles)} with a double upload, "
        f"{time.monotonic() - started:.1f} s"
        + (f"; {others} calls in other threads not swept" if others else "")
    )
    if bad:
        lines = [
            f"{r.point} hitting {r.call or '(not reached)'}:"
            + "".join(f"\n    - {p}" for p in r.problems)
            + "".join(f"\n    log: {n}" for n in r.log)
            for r in bad
        ]
        pytest.fail(
            f"{kind} sweep {group}/{scenario}: {len(bad)} of {len(points)} points end badly\n"
            + "\n".join(lines),
            pytrace=False,
        )


# -- calibration and fixtures ----------------------------------------------------------


def calibrate(root: Path, scenario: str, shm: Path | None) -> Calibration:
    """Trace every thread while a case's files are processed; count calls per thread."""
    started = time.monotonic()
    syscalls = ",".join(s for group in ALL_GROUPS.values() for s in group)
    with FakeAPI(api_key=API_KEY) as api:
        case = new_case(root, api, scenario, shm)
        bad = rejecting(api)
        rng = random.Random(f"{SEED}-calibration")
        trace = root / "calibration.strace"
        with warm_daemon(case, rng) as warm:
            tids = sorted(threads_of(warm.main))
            with strace(warm.main, tids, trace, "-f", "-e", f"trace={syscalls}"):
                drop_in_turn(case, warm.daemon, case_files(rng, bad))
                if not poll_until(lambda: ended(warm.daemon) >= FILES, 20):
                    pytest.fail(f"calibration: the files were not processed: {case.root}")
            problems: list[str] = []
            stop(warm.daemon, problems)
        verdict = judge(case, api.uploads)
    if problems or verdict.problems:
        pytest.fail(f"calibration run ({scenario}) ended badly: {problems + verdict.problems}")
    counts: Counter[tuple[str, str]] = Counter()
    for line in trace.read_text(errors="replace").splitlines():
        match = re.match(r"(\d+)\s+(\w+)\(", line)
        if match:
            tid = int(match[1])
            thread = "main" if tid == warm.main else "worker" if tid == warm.worker else "other"
            counts[thread, match[2]] += 1
    return Calibration(counts, time.monotonic() - started)


def _shm_folder() -> Path | None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == Path(tempfile.gettempdir()).stat().st_dev:
        return None
    return Path(tempfile.mkdtemp(prefix="sfwatch-sweep-", dir=shm))


@pytest.fixture(scope="module", autouse=True)
def _strace_works() -> None:
    """Skip the module without strace, or where ptrace attach is not permitted."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (apt-get install strace)")
    child = subprocess.Popen(["sleep", "0.3"])
    try:
        probe = subprocess.run(
            ["strace", "-qq", "-o", "/dev/null", "-e", "trace=none", "-p", str(child.pid)],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    finally:
        child.kill()
        child.wait()
    if probe.returncode != 0:
        pytest.skip(f"strace cannot attach here (ptrace not permitted?): {probe.stderr.strip()}")


@pytest.fixture(scope="module")
def calibrations(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Calibration]]:
    """One calibration per scenario, made on first use."""
    shm_folders: list[Path] = []

    class Lazy(dict[str, Calibration]):
        def __missing__(self, scenario: str) -> Calibration:
            shm = None
            if scenario == "tmpfs":
                shm = _shm_folder()
                if shm is None:
                    pytest.skip("/dev/shm is not a separate file system here")
                shm_folders.append(shm)
            root = tmp_path_factory.mktemp(f"calibration-{scenario}")
            made = self[scenario] = calibrate(root, scenario, shm)
            counts = ", ".join(f"{t}:{s}={n}" for (t, s), n in sorted(made.counts.items()))
            print(f"\ncalibration {scenario} ({made.seconds:.1f} s): {counts}")
            return made

    try:
        yield Lazy()
    finally:
        for folder in shm_folders:
            shutil.rmtree(folder, ignore_errors=True)


CASES = [(group, scenario) for group in GROUPS for scenario in SCENARIOS]


def _scene(request: pytest.FixtureRequest, scenario: str) -> Path | None:
    if scenario != "tmpfs":
        return None
    shm: Path = request.getfixturevalue("shm_dir")
    return shm


@pytest.mark.parametrize(("group", "scenario"), CASES, ids=[f"{g}-{s}" for g, s in CASES])
def test_kill_sweep(
    group: str,
    scenario: str,
    tmp_path: Path,
    calibrations: dict[str, Calibration],
    request: pytest.FixtureRequest,
) -> None:
    """SIGKILL at each (sampled) call of the group, then a --burst restart: all converges."""
    shm = _scene(request, scenario)
    calibration = calibrations[scenario]
    points = calibration.points(group, (KILL,))
    chosen = sample(points, SAMPLE[0], f"kill-{group}-{scenario}")
    sweep(
        "kill",
        group,
        scenario,
        points=chosen,
        total=len(points),
        calibration=calibration,
        root=tmp_path,
        shm=shm,
    )


@pytest.mark.parametrize(("group", "scenario"), CASES, ids=[f"{g}-{s}" for g, s in CASES])
def test_error_sweep(
    group: str,
    scenario: str,
    tmp_path: Path,
    calibrations: dict[str, Calibration],
    request: pytest.FixtureRequest,
) -> None:
    """An I/O error at each (sampled) call of the group: the running daemon converges."""
    shm = _scene(request, scenario)
    calibration = calibrations[scenario]
    points = calibration.points(group, ERRORS[group])
    chosen = sample(points, SAMPLE[1], f"error-{group}-{scenario}")
    sweep(
        "error",
        group,
        scenario,
        points=chosen,
        total=len(points),
        calibration=calibration,
        root=tmp_path,
        shm=shm,
    )


#: the stale-handle groups run by default: renames and unlinks have the error sweep's
#: EIO and EXDEV points, and every ESTALE point of theirs converged (SFWATCH_SWEEP=full)
STALE_SWEPT = ["open", "stat", *(["rename", "unlink"] if FULL else [])]


@pytest.mark.parametrize("group", STALE_SWEPT)
def test_stale_handle_sweep(
    group: str, tmp_path: Path, calibrations: dict[str, Calibration]
) -> None:
    """ESTALE (NFS: the server removed or replaced what a handle names) at a (sampled)
    open, rename or unlink of the job, or EIO at an open: the running daemon converges."""
    calibration = calibrations["disk"]
    # (opens: EIO too; the error sweep above has no open group)
    points = calibration.points(group, ("ESTALE", "EIO") if group == "open" else ("ESTALE",))
    chosen = sample(points, SAMPLE[1], f"stale-{group}")
    sweep(
        "error",
        group,
        "disk",
        points=chosen,
        total=len(points),
        calibration=calibration,
        root=tmp_path,
        shm=None,
    )


def test_a_waiting_job_whose_file_cannot_be_looked_at_is_not_lost(tmp_path: Path) -> None:
    """The loop's look at a claimed file waiting for a retry fails with ESTALE (strace
    injects it into that path's lstat alone): the job waits and finishes, never counted
    vanished (which would strand the file in the work area)."""
    with FakeAPI(api_key=API_KEY) as api:
        case = new_case(tmp_path, api, "disk", None)
        with warm_daemon(case, random.Random(SEED)) as warm:
            busy = Reply(503, {"message": "busy"})
            api.script(busy, busy)  # a.wav's first two uploads: each retried after a wait
            case.drop(Original("a.wav", wav(random.Random(1)), "done"))
            claimed = warm.daemon.wait_event("sfwatch.file_claimed", count=2)[-1]
            work = case.inbox / ".sfwatch" / "work"
            path = next(work.glob(f"*/{claimed['job_id']}/a.wav"))
            trace = tmp_path / "stale.strace"
            inject = ["-P", str(path), "-e", "trace=newfstatat", "-e"]
            with strace(warm.main, [warm.main], trace, *inject, "inject=newfstatat:error=ESTALE"):
                warm.daemon.wait_event("sfwatch.job_unreachable", timeout=20)
            assert poll_until((case.inbox / "done" / "a.wav").exists, 30), warm.daemon.lines()[-5:]
            assert not warm.daemon.events("sfwatch.job_vanished")
            assert "(INJECTED)" in trace.read_text(errors="replace")
            problems: list[str] = []
            stop(warm.daemon, problems)
    assert problems == []
