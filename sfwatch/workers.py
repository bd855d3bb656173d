"""Worker processes: one ``sfwatch run`` on several CPUs.

docs/design.md §2, "Workers: one run on several CPUs", is the whole design; in short:

Python runs one thread of a process at a time, so a daemon uses about one CPU
however many upload threads it has. With ``workers: N`` the process systemd
started (the *face*, worker 0) starts N - 1 more, ``sfwatch run --worker K/N``::

    face (worker 0): its share of the files · systemd · metrics · the outbox
      ├── worker 1: its share of the files
      └── worker 2: …

- **Shares.** Every worker watches every folder, but takes only the files whose
  path hashes to its index (``Share.owns``): no two workers race for a file, and a
  file renamed in the inbox simply belongs to whoever its new name says.
- **One ledger.** Every worker writes the one ledger in ``state_dir`` (SQLite's
  locks order their commits), under an instance name of its own (``<name>-w<K>``;
  the face keeps the plain name, so nothing changes for ``workers: 1``). A
  transcript one worker paid for is known to all, so the same content is not paid
  twice whichever worker takes it. At start-up a worker reconciles only its own
  rows and those of no worker of this run (``Share.others``).
- **One face.** Only the face tells systemd (READY, STATUS, the watchdog), serves
  ``metrics.listen`` and delivers the outbox: the other workers' finished files
  join the outbox in the shared ledger and the face looks for them every second.
- **Signals.** The workers run in sessions of their own and ignore SIGTERM and
  SIGINT; the face passes on each stop it receives as SIGUSR1 (first warm, then
  cold) and SIGHUP as SIGHUP. So a unit that signals every process of the service
  (``KillMode=control-group``) stops them warm once, not cold.
- **Deaths.** A worker dies with the face (``PR_SET_PDEATHSIG``, SIGKILL: a kill
  is a crash, which every promise survives, and no orphan keeps working beside a
  restarted face). A worker that dies is started again, after 1 s, then twice as
  long each time up to a minute; it waits for its old self's lock
  (``state_dir/worker-K.lock``), so two never run under one instance name.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sfwatch.config import Config
from sfwatch.cores import wide
from sfwatch.errors import EXIT_CONFIG, ConfigError

#: the signal the face sends a worker for each stop it receives
STOP_SIGNAL = signal.SIGUSR1
#: a dead worker is started again after this, doubling up to RESTART_MAX
RESTART_MIN = 1.0
RESTART_MAX = 60.0
#: a worker that ran this long before it died starts again after RESTART_MIN
RESTART_RESET = 60.0
#: a worker dead this many times in a row makes the face unhealthy (and ends a burst's)
BURST_CRASHES = 3
#: how long a new worker waits for its old self's lock
LOCK_WAIT = 120.0
#: what a worker must not inherit: systemd talks to the face alone
_FACE_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
#: the face's pid, in a worker's environment (a worker whose face is gone leaves)
FACE_ENV = "SFWATCH_FACE_PID"
#: the face's state_dir, in a worker's environment: a worker that reads another leaves
STATE_ENV = "SFWATCH_FACE_STATE_DIR"
#: the run's id, in a worker's environment (its account events: ``run_id``)
RUN_ENV = "SFWATCH_RUN_ID"
#: this process's run id when it is a face (made once, at the first ask)
_RUN_ID: list[str] = []
#: signals ``sfwatch run`` holds until its handlers are in place (else the first kills it)
_HELD = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Share:
    """Worker ``index`` of ``count``: which files it takes, and its instance name."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Share:
        """``K/N`` as given to ``run --worker``."""
        index, _, count = text.partition("/")
        try:
            share = cls(int(index), int(count))
        except ValueError:
            raise ConfigError("--worker", f"must be K/N, got {text!r}") from None
        if not 0 < share.index < share.count:
            raise ConfigError("--worker", f"must be K/N with 0 < K < N, got {text!r}")
        return share

    @property
    def face(self) -> bool:
        """Worker 0: the process systemd started, which talks to the rest of the house."""
        return self.index == 0

    def owns(self, path: str | Path) -> bool:
        """Whether this worker takes the file at ``path`` (a hash of the path, not the name:
        two ``a.wav`` in two folders need not go to one worker)."""
        return self.count == 1 or zlib.crc32(os.fsencode(path)) % self.count == self.index

    def instance(self, base: str) -> str:
        """This worker's instance name; the face keeps ``base``."""
        return base if self.face else f"{base}-w{self.index}"

    def live(self, base: str) -> set[str]:
        """The instance names of this run's other workers (the face starts them again)."""
        return {Share(i, self.count).instance(base) for i in range(self.count)} - {
            self.instance(base)
        }

    def retired(self, base: str, instance: str) -> bool:
        """Whether ``instance`` is a worker of an earlier run with more workers than this
        one (``<base>-w<K>``, K ≥ N): none of this run will use that name."""
        match = re.fullmatch(rf"{re.escape(base)}-w([0-9]+)", instance)
        return match is not None and int(match.group(1)) >= self.count

    def not_mine(self, base: str) -> Callable[[str], bool]:
        """Whether a ledger row's instance is another worker's, of this run or of an
        earlier one with more workers: its rows are left to it, or to whoever adopts
        its claims once its lease has expired (never to every worker at once)."""
        mine = self.instance(base)
        if not self.face:  # rows of other names (a host renamed) are the face's alone
            return lambda instance: instance != mine
        pattern = re.compile(rf"{re.escape(base)}(-w[0-9]+)?")
        return lambda instance: instance != mine and pattern.fullmatch(instance) is not None

    def config(self, config: Config) -> Config:
        """``config`` with this worker's part of ``api.concurrency`` and the request rate."""
        if self.count == 1:
            return config
        api = config.api
        concurrency = api.concurrency // self.count + (
            1 if self.index < api.concurrency % self.count else 0
        )
        rate = api.requests_per_minute
        return dataclasses.replace(
            config,
            api=dataclasses.replace(
                api,
                concurrency=max(1, concurrency),
                requests_per_minute=None if rate is None else rate / self.count,
            ),
        )


def lock_state_dir(state_dir: Path) -> int:
    """Hold ``state_dir/daemon.lock`` for this process; ConfigError if another holds it.

    Two daemons on one state_dir would share an instance name and resume each
    other's claims while both are working on them.
    """
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(state_dir / "daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(
            "state_dir", f"{state_dir} is in use by another sfwatch daemon (pid {holder})"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def lock_worker(state_dir: Path, share: Share, wait: float = LOCK_WAIT) -> int:
    """Hold ``state_dir/worker-K.lock``, waiting up to ``wait`` for an old worker K to end."""
    path = state_dir / f"worker-{share.index}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise ConfigError(
                    "workers", f"worker {share.index} of an earlier run still holds its lock"
                ) from None
            time.sleep(0.1)
            continue
        return fd


def hold_signals() -> None:
    """Hold stops and reloads until the daemon's handlers are in place (``release_signals``).

    A SIGTERM while Python imports the daemon would kill the process with its claims
    unsettled and, in a face, its workers with it; held, it is a warm stop a moment
    later. Threads started meanwhile keep them held: the main thread takes them.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)


def become_worker() -> None:
    """In a worker: die with the face, leave at once if it is gone already, and hold
    signals until the daemon's handlers are in place (``release_signals``)."""
    hold_signals()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    face = os.environ.get(FACE_ENV)
    if face is not None and os.getppid() != int(face):
        raise SystemExit(0)  # the face died before the prctl: nobody to work for


def run_id() -> str:
    """The id of this ``sfwatch run``, the same in its face and every worker: the face
    makes one up and hands it down (``RUN_ENV``)."""
    if given := os.environ.get(RUN_ENV):
        return given
    if not _RUN_ID:
        _RUN_ID.append(secrets.token_hex(8))
    return _RUN_ID[0]


def release_signals() -> None:
    """Let the signals ``hold_signals`` held through (those pending arrive now)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)


def check_face_config(config: Config, share: Share) -> None:
    """A worker's config must be the face's where it matters: the file may have been
    edited since the face read it (a restarted worker reads it again)."""
    face_state = os.environ.get(STATE_ENV)
    if face_state is not None and Path(face_state) != config.state_dir:
        raise ConfigError("state_dir", "changed since the service started: restart it")
    if config.workers != share.count:
        raise ConfigError("workers", "changed since the service started: restart it")


@dataclass
class _Child:
    share: Share
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    #: the wall-clock time it was started (the ledger's ``updated`` is wall-clock too)
    spawned: float = 0.0
    restart_at: float | None = None
    delay: float = RESTART_MIN
    #: the exit code it ended with, once it will not be started again
    ended: int | None = None
    #: deaths in a row (each within RESTART_RESET of its start)
    crashes: int = 0


class Workers:
    """The face's workers 1 … N-1: started, signalled, restarted, waited for."""

    def __init__(self, config: Config, count: int, *, burst: bool, log: Any) -> None:
        self.config = config
        self.burst = burst
        self.log = log
        self.stopping = False
        self.started = False
        self._children = [_Child(Share(i, count)) for i in range(1, count)]

    def __len__(self) -> int:
        return len(self._children)

    def start(self) -> None:
        """Start every worker (the face calls this first thing in ``run``; once)."""
        if self.started or self.stopping:
            return
        self.started = True
        if self._children and self.config.source is None:
            raise ConfigError("workers", "workers need the config file: it is what they read")
        for child in self._children:
            self._spawn(child)

    def _spawn(self, child: _Child) -> None:
        command = [sys.executable, "-m", "sfwatch", "run", "-c", str(self.config.source)]
        command += ["--worker", f"{child.share.index}/{child.share.count}"]
        command += ["--burst"] if self.burst else []
        env = {k: v for k, v in os.environ.items() if k not in _FACE_ONLY_ENV}
        env[FACE_ENV] = str(os.getpid())
        env[STATE_ENV] = str(self.config.state_dir)
        env[RUN_ENV] = run_id()
        # (a session of its own: a terminal's Ctrl-C reaches the face, which passes it on;
        # wide: a worker started while the face is pinned must not inherit its one CPU)
        # (held: a stop or reload reaching it before its handlers would kill it; a new
        # process keeps the signal mask, and workers.release_signals lets them through)
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
        child.spawned = time.time()
        try:
            with wide():
                child.proc = subprocess.Popen(command, env=env, start_new_session=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        child.started = time.monotonic()
        child.restart_at = None
        self.log.info("sfwatch.worker_started", worker=child.share.index, pid=child.proc.pid)

    def poll(self) -> None:
        """Notice workers that ended; start again those that should not have (a turn)."""
        now = time.monotonic()
        for child in self._children:
            if child.ended is not None:
                continue
            if child.proc is None:
                if self.stopping:
                    child.ended = 0  # (it was waiting to be started again: nothing runs)
                elif child.restart_at is not None and now >= child.restart_at:
                    self._spawn(child)
                continue
            code = child.proc.poll()
            if code is None:
                continue
            child.proc = None
            if self.stopping or (self.burst and code == 0):
                child.ended = code
                self.log.info("sfwatch.worker_stopped", worker=child.share.index, code=code)
                continue
            if code == EXIT_CONFIG:  # its log says why; starting it again would say it again
                child.ended = code
                self.log.error("sfwatch.worker_failed", worker=child.share.index, code=code)
                continue
            if now - child.started >= RESTART_RESET:
                child.delay, child.crashes = RESTART_MIN, 0
            child.crashes += 1
            if self.burst and child.crashes >= BURST_CRASHES:
                # A burst must end: its share stays in the inbox for the next run.
                child.ended = code
                self.log.error("sfwatch.worker_failed", worker=child.share.index, code=code)
                continue
            child.restart_at = now + child.delay
            self.log.error(
                "sfwatch.worker_died",
                worker=child.share.index,
                code=code,
                signal=signal.Signals(-code).name if code < 0 else None,
                restart_in=child.delay,
            )
            child.delay = min(RESTART_MAX, child.delay * 2)

    def running(self) -> bool:
        """Some worker runs, or will be started again."""
        return any(c.ended is None for c in self._children)

    def stop(self) -> None:
        """Pass one stop on (from the face's signal handler: first warm, then cold)."""
        self.stopping = True
        self._signal(STOP_SIGNAL)
        for child in self._children:
            if child.proc is None and child.ended is None:
                child.ended = 0  # (waiting to be started again: it will not be)

    def reload(self) -> None:
        """Pass SIGHUP on."""
        self._signal(signal.SIGHUP)

    def _signal(self, signum: signal.Signals) -> None:
        for child in self._children:
            if child.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait up to ``timeout`` for every worker to end, then kill the rest; the worst code."""
        self.stopping = True
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            self.poll()
            if self.running():
                time.sleep(0.05)
        for child in self._children:
            if child.proc is not None:
                self.log.warning("sfwatch.worker_killed", worker=child.share.index)
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                child.ended = child.proc.wait()
                child.proc = None
            if child.ended is None:  # (waiting for a restart: nothing runs)
                child.ended = 0
        return self.worst()

    def problem(self) -> str | None:
        """Why the face is unhealthy for its workers: one that cannot run (systemd's
        watchdog then restarts the whole service, which reads the config afresh)."""
        for child in self._children:
            if self.stopping:
                break
            if child.ended is not None and child.ended != 0:
                return f"worker {child.share.index} ended with exit code {child.ended}"
            if child.crashes >= BURST_CRASHES:
                return f"worker {child.share.index} died {child.crashes} times in a row"
        return None

    def worst(self) -> int:
        """The exit code of the run's workers: 0 when each ended well, else 1."""
        return 0 if all(c.ended in (0, None) for c in self._children) else 1

    def spawned(self) -> dict[int, float]:
        """The workers running now: pid → when it was started (wall clock)."""
        return {c.proc.pid: c.spawned for c in self._children if c.proc is not None}


__all__ = [
    "FACE_ENV",
    "STOP_SIGNAL",
    "Share",
    "Workers",
    "become_worker",
    "check_face_config",
    "lock_worker",
    "release_signals",
    "run_id",
]
