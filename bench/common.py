"""What every benchmark needs: audio files, the fake API and ``sfwatch run`` as
subprocesses, a /proc sampler for memory and CPU, log parsing, statistics, results.

Clocks: the daemon's log timestamps are wall-clock UTC (ISO 8601, microseconds);
``bench.fakeserver`` converts the fake's monotonic times to wall clock before it
writes them; the benchmarks use ``time.time()`` for everything they compare.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from bench import profiling

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
#: the daemons' compiled bytecode (see ``daemon_env``)
PYCACHE = RESULTS / "pycache"
#: distinctive, never a real key
API_KEY = "sk-bench-0d1f2e3c4b5a69788796"
MODEL = "FunAudioLLM/SenseVoiceSmall"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# -- audio ---------------------------------------------------------------------------


def wav_bytes(seconds: float, rate: int = 8000) -> bytes:
    """A mono 16-bit WAV of random noise: every call gives unique content."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(os.urandom(int(seconds * rate) * 2))
    return buf.getvalue()


def write_wav(path: Path, seconds: float = 0.25, rate: int = 8000) -> Path:
    """Write a small unique WAV at ``path`` (one open, one write, one close)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(wav_bytes(seconds, rate))
    return path


def write_big_wav(path: Path, size_bytes: int, rate: int = 8000) -> Path:
    """A noise WAV of about ``size_bytes``, written 1 MiB at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames_left = (size_bytes - 44) // 2
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        while frames_left > 0:
            n = min(frames_left, 1 << 19)
            out.writeframes(os.urandom(n * 2))
            frames_left -= n
    return path


def make_wavs(folder: Path, count: int, seconds: float = 0.25, prefix: str = "f") -> list[Path]:
    """``count`` small unique WAVs in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return [write_wav(folder / f"{prefix}{i:05d}.wav", seconds) for i in range(count)]


# -- the fake API --------------------------------------------------------------------


@dataclass(frozen=True)
class ServerUpload:
    """One transcription request as the fake saw it (times are wall clock)."""

    filename: str
    size: int
    sha256: str
    status: int
    started: float
    ended: float
    complete: bool


@dataclass
class ServerSummary:
    """What ``bench.fakeserver`` reports when it exits."""

    uploads: list[ServerUpload]
    requests_total: int
    max_concurrent: int
    errors: list[str]
    cpu_seconds: float

    @classmethod
    def load(cls, path: Path) -> ServerSummary:
        """Read the JSON file the fake server wrote."""
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            uploads=[ServerUpload(**u) for u in data["uploads"]],
            requests_total=int(data["requests_total"]),
            max_concurrent=int(data["max_concurrent"]),
            errors=list(data["errors"]),
            cpu_seconds=float(data["cpu_seconds"]),
        )


class FakeServer:
    """``python -m bench.fakeserver`` as a subprocess; ``stop()`` returns its summary."""

    def __init__(self, workdir: Path, latency: float = 0.0, *, backlog: int | None = None) -> None:
        self.workdir = workdir
        self.latency = latency
        self.backlog = backlog
        self.url = ""
        self.summary: ServerSummary | None = None
        self._out = workdir / f"fake-{time.monotonic_ns()}.json"
        self._proc: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self) -> FakeServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "bench.fakeserver", "--latency", str(self.latency)]
        command += ["--key", API_KEY, "--out", str(self._out)]
        if self.backlog is not None:
            command += ["--backlog", str(self.backlog)]
        self._proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        self.url = self._proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self._proc.kill()
            raise RuntimeError(f"the fake API did not start: {self.url!r}")
        return self

    def stop(self) -> ServerSummary:
        if self.summary is None:
            assert self._proc is not None
            self._proc.send_signal(signal.SIGTERM)
            self._proc.wait(30)
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self.summary = ServerSummary.load(self._out)
        return self.summary

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is not None and self._proc.poll() is None:
            if exc_type is None:
                self.stop()
            else:
                self._proc.kill()
                self._proc.wait(10)


# -- /proc ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (all its threads), None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kb(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of ``pid`` in KiB, None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    except OSError:
        return None
    values = {}
    for line in status.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    if len(values) < 2:
        return None
    return values["VmRSS"], values["VmHWM"]


def pss_kb(pid: int) -> int | None:
    """The proportional set size of ``pid`` in KiB: its own pages, and each shared page
    divided by the processes that map it. None once it is gone."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text(encoding="ascii")
    except OSError:
        return None
    for line in rollup.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return None


def child_pids(pid: int) -> list[int]:
    """The child processes of ``pid`` now (a daemon's worker processes)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return found


class ProcSampler(threading.Thread):
    """Polls a process's memory and CPU time until it exits or ``stop()`` is called.

    Its child processes (``workers``) count too: CPU is the sum of each one's last
    reading, ``peak_rss_kb`` the peak of the sum of their RSS (each process's own
    pages, and the libraries they map counted once per process: an upper bound), and
    ``peak_pss_kb`` the peak of the sum of their PSS (a shared page counted once in
    all): the memory the group takes from the machine. PSS is read every
    ``PSS_EVERY``-th sample only, as the kernel walks the page tables to find it.
    """

    PSS_EVERY = 5

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(name=f"sampler-{pid}", daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_rss_kb = 0  # max of every VmRSS and VmHWM read (summed over processes)
        self.peak_pss_kb = 0  # max of the summed PSS (every PSS_EVERY-th sample)
        self.processes = 1  # the most processes seen at once
        self.pss_read = True  # False: the kernel gives no PSS (peak_pss_kb means nothing)
        self._samples = 0
        self.cpu = 0.0  # the last CPU seconds read (summed over processes)
        self._children_cpu: dict[int, float] = {}
        self._stop_event = threading.Event()

    def sample(self) -> bool:
        mem = memory_kb(self.pid)
        cpu = cpu_seconds(self.pid)
        if mem is None or cpu is None:
            return False
        rss = mem[0]
        children = child_pids(self.pid)
        for child in children:
            child_mem, child_cpu = memory_kb(child), cpu_seconds(child)
            if child_mem is not None and child_cpu is not None:
                rss += child_mem[0]
                self._children_cpu[child] = child_cpu
        self.peak_rss_kb = max(self.peak_rss_kb, rss, mem[1])
        self.processes = max(self.processes, 1 + len(children))
        if self._samples % self.PSS_EVERY == 0:
            found = [pss_kb(p) for p in [self.pid, *children]]
            if found[0] is None:  # no smaps_rollup (an old kernel, gVisor): no PSS at all
                self.pss_read = False
            self.peak_pss_kb = max(self.peak_pss_kb, sum(p or 0 for p in found))
        self._samples += 1
        self.cpu = cpu + sum(self._children_cpu.values())
        return True

    def run(self) -> None:
        while self.sample() and not self._stop_event.wait(self.interval):
            pass

    def stop(self) -> None:
        self.sample()
        self._stop_event.set()
        self.join(5)

    @property
    def peak_rss_mb(self) -> float:
        return round(self.peak_rss_kb / 1024, 1)

    @property
    def peak_pss_mb(self) -> float:
        return round(self.peak_pss_kb / 1024, 1)


# -- the daemon ----------------------------------------------------------------------


def write_config(
    folder: Path,
    url: str,
    *,
    concurrency: int = 4,
    settle: float = 0.5,
    poll: bool | None = None,
    rescan: float = 60.0,
    level: str = "info",
    timeout: float = 60.0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """A config watching ``folder/inbox`` with state in ``folder/state``; its path.

    ``extra``: more top-level sections (``hooks``, ``webhooks``, …).
    """
    watch: dict[str, Any] = {
        "path": str(folder / "inbox"),
        "settle_seconds": settle,
        "rescan_seconds": rescan,
        "poll": "auto" if poll is None else poll,
    }
    data = {
        "api": {
            "base_url": url,
            "model": MODEL,
            "concurrency": concurrency,
            "timeout_seconds": timeout,
        },
        "state_dir": str(folder / "state"),
        "log": {"format": "json", "level": level},
        "watch": [watch],
        **(extra or {}),
    }
    (folder / "inbox").mkdir(parents=True, exist_ok=True)
    path = folder / "sfwatch.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def daemon_env() -> dict[str, str]:
    """The environment for ``sfwatch run``: the bench key, no stray config, bytecode kept.

    An installed daemon starts from compiled bytecode (pip compiles it; a systemd
    unit does not set ``PYTHONDONTWRITEBYTECODE``). A shell or sandbox that sets it
    would make every start compile sfwatch's sources again, about 0.1 s of the
    start-up that benchmark d measures, so the bench keeps the bytecode, in
    ``bench/results/pycache`` (``PYTHONPYCACHEPREFIX``) rather than in the tree.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SFWATCH_", "SILICONFLOW_"))}
    env.pop("CREDENTIALS_DIRECTORY", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    env["SILICONFLOW_API_KEY"] = API_KEY
    env["PYTHONUNBUFFERED"] = "1"
    return env


@functools.cache
def compile_bytecode() -> None:
    """Compile sfwatch (and what it imports) into ``PYCACHE``, once, before a daemon runs."""
    subprocess.run(
        [sys.executable, "-c", "import sfwatch.cli, sfwatch.daemon, sfwatch.audio"],
        env=daemon_env(),
        cwd=REPO,
        check=True,
    )


def parse_ts(value: str) -> float:
    """A log timestamp (ISO 8601 UTC) as seconds since the epoch."""
    return datetime.fromisoformat(value).timestamp()


class DaemonRun:
    """``sfwatch run -c CONFIG [ARGS]`` as a subprocess, its JSON log in a file."""

    def __init__(
        self,
        config: Path,
        *args: str,
        sample_interval: float = 0.05,
        profile: str | None = None,
    ) -> None:
        self.config = config
        self.profile = profile if profiling.ENABLED or profiling.PERF else None
        self._spies: list[tuple[subprocess.Popen[bytes], str]] = []
        self.args = args
        self.sample_interval = sample_interval
        self.log_path = config.parent / f"daemon-{time.monotonic_ns()}.log"
        self.launched = 0.0  # time.time() just before the process was started
        self.proc: subprocess.Popen[bytes] | None = None
        self.sampler: ProcSampler | None = None
        self._offset = 0
        self._lines: list[dict[str, Any]] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> DaemonRun:
        compile_bytecode()
        command = [sys.executable, "-m", "sfwatch", "run", "-c", str(self.config), *self.args]
        if patches := os.environ.get("BENCH_PATCHES"):  # see bench/patched.py
            command[1:3] = ["-m", "bench.patched", patches]
        with self.log_path.open("wb") as log:
            self.launched = time.time()
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=daemon_env(), cwd=REPO
            )
        self.sampler = ProcSampler(self.proc.pid, self.sample_interval)
        self.sampler.start()
        if self.profile is not None:
            time.sleep(0.3)  # py-spy needs the interpreter up
            for gil in (False, True) if profiling.ENABLED else ():
                tag = f"{self.profile}{'-gil' if gil else ''}"
                self._spies.append((profiling.attach(self.proc.pid, tag, gil=gil), tag))
            if profiling.PERF:
                tag = f"perf-{self.profile}"
                self._spies.append((profiling.attach_perf(self.proc.pid, self.profile), tag))
        return self

    def _end_profiles(self) -> None:
        seconds = time.time() - self.launched
        for spy, tag in self._spies:
            if tag.startswith("perf-"):
                print(profiling.finish_perf(spy, tag.removeprefix("perf-")), flush=True)
            else:
                print(profiling.finish(spy, tag, seconds), flush=True)
        self._spies = []

    def lines(self) -> list[dict[str, Any]]:
        """Every log line so far (read incrementally; non-JSON lines as {"raw": ...})."""
        with self.log_path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        for raw in data[:end].decode("utf-8", "replace").splitlines():
            try:
                self._lines.append(json.loads(raw))
            except ValueError:
                self._lines.append({"raw": raw})
        return self._lines

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.lines() if e.get("event") == name]

    def wait_event(self, name: str, count: int = 1, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(name)
            if len(found) >= count:
                return found
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited before {count}x {name}: {self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(found)}x {name} after {timeout} s, wanted {count}")
            time.sleep(0.05)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        assert self.sampler is not None
        code = self.proc.wait(timeout)
        self.sampler.stop()
        self._end_profiles()
        return code

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.sampler is not None:
            self.sampler.stop()
        self._end_profiles()

    def tail(self, n: int = 5) -> list[str]:
        return [json.dumps(e) for e in self.lines()[-n:]]

    def errors(self) -> list[dict[str, Any]]:
        """Log lines at warning level or above (the benchmark's health check)."""
        return [e for e in self.lines() if e.get("level") in ("warning", "error", "critical")]

    def __enter__(self) -> DaemonRun:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


def times_of(events: Iterable[dict[str, Any]]) -> list[float]:
    """The sorted timestamps of some log lines."""
    return sorted(parse_ts(str(e["timestamp"])) for e in events)


# -- statistics and results ----------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between closest ranks."""
    if not values:
        return math.nan
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.02) -> None:
    """Poll ``predicate`` until true; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def git_revision() -> str:
    """The checkout's commit, with ``+dirty`` when sfwatch/ has uncommitted changes."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "sfwatch"],  # noqa: S607
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "revision": git_revision(),
        "patches": os.environ.get("BENCH_PATCHES", ""),
        "loadavg": Path("/proc/loadavg").read_text(encoding="ascii").split()[:3],
    }


@dataclass
class Figure:
    """One reported number, with its target when it has one."""

    name: str
    value: float
    unit: str
    target: str = ""
    ok: bool | None = None
    runs: list[float] = field(default_factory=list)

    def line(self) -> str:
        mark = {True: "ok", False: "MISSED", None: ""}[self.ok]
        runs = f"  runs: {', '.join(f'{r:g}' for r in self.runs)}" if self.runs else ""
        target = f"  (target {self.target})" if self.target else ""
        return f"  {self.name:<44} {self.value:>10g} {self.unit:<8}{target} {mark}{runs}"


#: ".quick" under ``--quick``: smoke-test figures never overwrite real ones
SUFFIX = ""


def save(name: str, figures: list[Figure], detail: dict[str, Any]) -> Path:
    """Print the figures and write them (and the details) to bench/results/NAME.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    name += SUFFIX
    if patches := os.environ.get("BENCH_PATCHES"):  # never mistaken for the tree's figures
        name = f"{name}.patched-{re.sub(r'[^A-Za-z0-9.=-]+', '+', patches)}"
        print(f"(with BENCH_PATCHES={patches})")
    print(f"[{name}]")
    for fig in figures:
        print(fig.line())
    path = RESULTS / f"{name}.json"
    data = {
        "benchmark": name,
        "when": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "figures": [asdict(f) for f in figures],
        "detail": detail,
    }
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"  -> {path.relative_to(REPO)}")
    return path


def scratch(name: str) -> Path:
    """A fresh scratch folder for one benchmark run (under /tmp, removed by the caller)."""
    root = Path(os.environ.get("BENCH_TMP", "/tmp")) / f"sfwatch-bench-{os.getpid()}" / name
    root.mkdir(parents=True, exist_ok=True)
    return root


#: where the bench notes when it (or a daemon it ran) last freed many inodes
FREED_STAMP = RESULTS / ".inodes-freed"
#: ext4 without a journal (this VM's disk: ``ext4_fsync_nojournal`` in perf) skips, when
#: it allocates an inode, every one freed in the last minute (``recently_deleted``; six
#: minutes while the inode table is unwritten, hence the sync). Right after the last
#: run's 30,000 files were removed, a run's every new file paid for that walk: 15-30 %
#: more CPU a file in benchmark d (docs/benchmarks.md, "Third look").
INODE_MEMORY = 62.0


def note_inodes_freed() -> None:
    """Note that many inodes were freed just now (a scratch tree removed, a run ended)."""
    FREED_STAMP.parent.mkdir(parents=True, exist_ok=True)
    FREED_STAMP.write_text(f"{time.time()}\n", encoding="ascii")


def wait_for_forgotten_inodes() -> None:
    """Sync, then wait until the file system no longer remembers the inodes last freed."""
    try:
        freed = float(FREED_STAMP.read_text(encoding="ascii"))
    except (OSError, ValueError):
        return
    os.sync()
    if (wait := freed + INODE_MEMORY - time.time()) > 0:
        print(f"  (waiting {wait:.0f} s: inodes freed {time.time() - freed:.0f} s ago)", flush=True)
        time.sleep(wait)


def rounded(value: float, digits: int = 3) -> float:
    return round(value, digits)
