"""Shared fixtures: a fake API on loopback, config files in temp folders, daemons.

Tests wait on conditions (``wait_until``) with timeouts, never on fixed sleeps.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from sfwatch.config import Secret, load_config
from sfwatch.daemon import Daemon
from tests.fakeapi import FakeAPI

#: distinctive, so a leak test can search every output for it
API_KEY = "sk-test-5f1e9a7c3b2d4e6f8a0b"
REPO = Path(__file__).resolve().parent.parent


def poll_until(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); None after ``timeout`` s.

    For tests that go on to say what is wrong themselves; most want ``wait_until``.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, message: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    value = poll_until(predicate, timeout)
    if not value:
        pytest.fail(f"timed out after {timeout} s waiting for {message or predicate}")
    return value


@pytest.fixture
def fake_api() -> Iterator[FakeAPI]:
    """A started fake of the API on 127.0.0.1."""
    with FakeAPI(api_key=API_KEY) as api:
        yield api


@pytest.fixture
def shm_dir(tmp_path: Path) -> Iterator[Path]:
    """A fresh folder on /dev/shm, a file system other than tmp_path's."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("/dev/shm is not a separate file system here")
    folder = Path(tempfile.mkdtemp(prefix="sfwatch-test-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_config(
    folder: Path,
    api_url: str,
    *,
    api: dict[str, Any] | None = None,
    watch: dict[str, Any] | None = None,
    extra_watches: list[dict[str, Any]] | None = None,
    log_level: str = "debug",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a config file into ``folder`` watching ``folder/inbox``; return its path.

    ``extra``: more top-level sections (``prepare``, …).
    """
    data: dict[str, Any] = {
        "api": {"base_url": api_url, "concurrency": 4, "timeout_seconds": 10, **(api or {})},
        "state_dir": str(folder / "state"),
        "log": {"format": "json", "level": log_level},
        "watch": [
            {"path": "inbox", "settle_seconds": 0.3, "rescan_seconds": 5, **(watch or {})},
            *(extra_watches or []),
        ],
        **(extra or {}),
    }
    path = folder / "sfwatch.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    (folder / "inbox").mkdir(exist_ok=True)
    return path


@dataclass
class Running:
    """A daemon running in a thread of the test process."""

    daemon: Daemon
    thread: threading.Thread
    inbox: Path
    result: list[int] = field(default_factory=list)

    def stop(self, timeout: float = 15.0) -> None:
        """Warm-stop the daemon and wait for its thread."""
        self.daemon.request_stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "daemon did not stop"


@contextmanager
def running_daemon(config_path: Path, **kwargs: Any) -> Iterator[Running]:
    """Run ``Daemon`` in a thread for the duration of the block."""
    config = load_config(config_path)
    daemon = Daemon(config, Secret(API_KEY), **kwargs)
    running = Running(daemon, threading.Thread(target=lambda: None), config.watch[0].path)
    running.thread = threading.Thread(
        target=lambda: running.result.append(daemon.run()), name="test-daemon", daemon=True
    )
    running.thread.start()
    try:
        yield running
    finally:
        if running.thread.is_alive():
            running.stop()


@dataclass
class DaemonProcess:
    """``sfwatch run`` as a real subprocess, its JSON log captured in a file."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    def lines(self) -> list[dict[str, Any]]:
        """Every JSON log line so far (non-JSON lines are kept as {"raw": ...})."""
        out: list[dict[str, Any]] = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"raw": line})
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        """The log lines whose ``event`` is ``name``."""
        return [e for e in self.lines() if e.get("event") == name]

    def wait_event(self, name: str, count: int = 1, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Wait until ``name`` was logged ``count`` times."""
        found: list[dict[str, Any]] = wait_until(
            lambda: (found := self.events(name)) and len(found) >= count and found,
            timeout,
            f"{count}x {name}",
        )
        return found

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send a signal to the daemon."""
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 20.0) -> int:
        """Wait for exit and return the exit code."""
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, then reap."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def daemon_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess daemon: the test key, no stray config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SFWATCH_", "SILICONFLOW_"))}
    env.pop("CREDENTIALS_DIRECTORY", None)
    env["SILICONFLOW_API_KEY"] = API_KEY
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@contextmanager
def daemon_process(
    config_path: Path, *args: str, user: str | None = None, **env: str
) -> Iterator[DaemonProcess]:
    """Start ``sfwatch run -c config_path``; kill it at the end of the block if still up.

    ``user``: run it as that user (and its primary group) via ``setpriv``; needs root.
    """
    log_path = config_path.parent / f"daemon-{time.monotonic_ns()}.log"
    command = [sys.executable, "-m", "sfwatch", "run", "-c", str(config_path), *args]
    if user is not None:
        entry = pwd.getpwnam(user)
        command = [
            "setpriv",
            f"--reuid={entry.pw_uid}",
            f"--regid={entry.pw_gid}",
            "--clear-groups",
            *command,
        ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=daemon_env(**env),
            cwd=config_path.parent,
        )
    running = DaemonProcess(proc, log_path)
    try:
        yield running
    finally:
        running.kill()


def run_cli(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``sfwatch ARGS`` to completion and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "sfwatch", *args],
        capture_output=True,
        text=True,
        env=daemon_env(**env),
        cwd=cwd,
        timeout=60,
        check=False,
    )


def files_under(folder: Path) -> list[str]:
    """Every file below ``folder`` as a sorted list of relative POSIX paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
