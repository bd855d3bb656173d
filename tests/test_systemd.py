"""systemd integration: notifications from a real daemon, reload, units, the journal.

The notify socket is a real AF_UNIX datagram socket owned by the test; the
daemon is a real ``sfwatch run`` subprocess. Both notify paths run: through
systemd-python (when installed) and through the built-in sd_notify (with
systemd-python hidden by ``tests/no_systemd`` on PYTHONPATH).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.audiogen import wav_bytes
from tests.conftest import REPO, daemon_env, daemon_process, wait_until, write_config
from tests.fakeapi import FakeAPI

HIDE_SYSTEMD = str(Path(__file__).parent / "no_systemd")


def _has_systemd_python() -> bool:
    try:
        import systemd.daemon  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


BACKENDS = [
    pytest.param("builtin", id="builtin-sd_notify"),
    pytest.param(
        "systemd-python",
        id="systemd-python",
        marks=pytest.mark.skipif(
            not _has_systemd_python(),
            reason="systemd-python not installed (pip install .[systemd])",
        ),
    ),
]


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []

    def pump(self) -> None:
        """Read everything that has arrived."""
        while True:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def wait_for(self, needle: str, after: int = 0, timeout: float = 15.0) -> int:
        """Index of the first message at or after ``after`` containing ``needle``."""

        def find() -> int | None:
            self.pump()
            for index, (_, text) in enumerate(self.messages[after:], after):
                if needle in text:
                    return index + 1  # 1-based so that 0 is falsy for wait_until
            return None

        return int(wait_until(find, timeout, f"notify {needle!r}")) - 1

    def pings(self, since: float) -> list[float]:
        """Times of WATCHDOG=1 messages received after ``since``."""
        self.pump()
        return [t for t, text in self.messages if t >= since and "WATCHDOG=1" in text]

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    """A bound notify socket in the test's temp folder."""
    sock = NotifySocket(tmp_path)
    yield sock
    sock.close()


def _env(notify: NotifySocket, backend: str, **more: str) -> dict[str, str]:
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000", **more}
    if backend == "builtin":
        env["PYTHONPATH"] = HIDE_SYSTEMD + os.pathsep + str(REPO)
    return env


@pytest.mark.parametrize("backend", BACKENDS)
def test_notify_lifecycle(
    tmp_path: Path, fake_api: FakeAPI, notify_socket: NotifySocket, backend: str
) -> None:
    """READY, STATUS, WATCHDOG at half WATCHDOG_USEC, RELOADING+READY on SIGHUP, STOPPING."""
    config = write_config(tmp_path, fake_api.url)
    with daemon_process(config, **_env(notify_socket, backend)) as daemon:
        ready = notify_socket.wait_for("READY=1")
        assert "STATUS=" in notify_socket.messages[ready][1]
        (tmp_path / "inbox" / "a.wav").write_bytes(wav_bytes(3000))
        notify_socket.wait_for("done 1", after=ready)
        since = time.monotonic()
        wait_until(lambda: len(notify_socket.pings(since)) >= 5, 10, "five pings")
        pings = notify_socket.pings(since)
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert all(0.35 <= gap <= 1.0 for gap in gaps), gaps  # every 0.5 s, never late
        daemon.signal(signal.SIGHUP)
        reloading = notify_socket.wait_for("RELOADING=1", after=ready + 1)
        assert re.search(r"MONOTONIC_USEC=\d+", notify_socket.messages[reloading][1])
        notify_socket.wait_for("READY=1", after=reloading)
        daemon.signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING=1", after=reloading)
        assert daemon.wait() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_watchdog_stops_when_the_observer_cannot_run(
    tmp_path: Path, fake_api: FakeAPI, notify_socket: NotifySocket, backend: str
) -> None:
    """Pings stop when the watched folder is replaced by a file: systemd would restart us."""
    config = write_config(tmp_path, fake_api.url)
    inbox = tmp_path / "inbox"
    with daemon_process(config, **_env(notify_socket, backend)) as daemon:
        notify_socket.wait_for("READY=1")
        since = time.monotonic()
        wait_until(lambda: len(notify_socket.pings(since)) >= 2, 10, "healthy pings")
        shutil.rmtree(inbox)
        inbox.write_text("not a folder any more")
        daemon.wait_event("sfwatch.watch_restart_failed")
        quiet_from = time.monotonic()
        wait_until(lambda: time.monotonic() - quiet_from > 2.5, 5)  # the scenario: 2.5 s pass
        assert notify_socket.pings(quiet_from + 0.6) == [], "no pings while unhealthy"
        assert daemon.proc.poll() is None, "the daemon itself keeps running"


def test_reload_adds_a_folder_and_survives_a_broken_config(
    tmp_path: Path, fake_api: FakeAPI, notify_socket: NotifySocket
) -> None:
    """SIGHUP with a new folder: it is watched; with a broken config: the old one stays."""
    config = write_config(tmp_path, fake_api.url)
    with daemon_process(config, **_env(notify_socket, "builtin")) as daemon:
        notify_socket.wait_for("READY=1")
        data = yaml.safe_load(config.read_text())
        data["watch"].append({"path": "second", "settle_seconds": 0.3})
        config.write_text(yaml.safe_dump(data))
        daemon.signal(signal.SIGHUP)
        daemon.wait_event("sfwatch.reload_finished")
        (tmp_path / "second" / "b.wav").write_bytes(wav_bytes(2000))
        wait_until((tmp_path / "second" / "done" / "b.wav").exists, 10, "new folder works")
        config.write_text("watch:\n  - path: second\n    settle_seconds: -1\n")
        daemon.signal(signal.SIGHUP)
        failed = daemon.wait_event("sfwatch.reload_failed")
        assert "watch[0].settle_seconds" in failed[0]["error"]
        (tmp_path / "inbox" / "c.wav").write_bytes(wav_bytes(2000))
        wait_until((tmp_path / "inbox" / "done" / "c.wav").exists, 10, "old config still runs")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0


UNITS = ["sfwatch.service", "sfwatch@.service"]


@pytest.mark.parametrize("unit", UNITS)
def test_unit_passes_systemd_analyze(tmp_path: Path, unit: str) -> None:
    """`systemd-analyze verify` is silent and the exposure score is at most 1.5."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    text = (REPO / "systemd" / unit).read_text()
    copy = tmp_path / unit.replace("@", "@test")
    # verify checks that ExecStart exists: point it at a binary this machine has.
    copy.write_text(text.replace("/usr/local/bin/sfwatch", shutil.which("true") or "/bin/true"))
    verify = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, check=False
    )
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.strip() == ""
    assert verify.stderr.strip() == ""
    security = subprocess.run(
        [analyze, "security", "--offline=yes", str(copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert match, security.stdout + security.stderr
    assert float(match.group(1)) <= 1.5


def test_template_differs_only_where_noted() -> None:
    """sfwatch@.service is sfwatch.service but for the instance's config and state."""
    main = (REPO / "systemd" / "sfwatch.service").read_text().splitlines()
    template = (REPO / "systemd" / "sfwatch@.service").read_text().splitlines()
    settings = [line for line in main if "=" in line and not line.startswith("#")]
    tsettings = [line for line in template if "=" in line and not line.startswith("#")]
    different = sorted(set(settings) ^ set(tsettings))
    assert different == sorted(
        [
            "Description=sfwatch: transcribe audio dropped into a folder",
            "Description=sfwatch (%i): transcribe audio dropped into a folder",
            "ExecStart=/usr/local/bin/sfwatch run -c /etc/sfwatch/config.yaml",
            "ExecStart=/usr/local/bin/sfwatch run -c /etc/sfwatch/%i.yaml",
            "StateDirectory=sfwatch",
            "StateDirectory=sfwatch/%i",
        ]
    )


JOURNAL_SOCKET = Path("/run/systemd/journal/socket")


def _parse_journal_datagram(data: bytes) -> dict[str, str]:
    """The journal's native protocol: KEY=value lines, or KEY, a length and binary data."""
    fields: dict[str, str] = {}
    while data:
        line, sep, rest = data.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            data = rest
        elif sep:
            (size,) = struct.unpack("<Q", rest[:8])
            fields[line.decode()] = rest[8 : 8 + size].decode()
            data = rest[8 + size + 1 :]
        else:
            break
    return fields


@pytest.mark.skipif(not _has_systemd_python(), reason="systemd-python not installed")
def test_journal_gets_upper_case_fields(tmp_path: Path, fake_api: FakeAPI) -> None:
    """With systemd-python and stdout on the journal, events carry TRACE_ID, JOB_ID, FILE."""
    if os.geteuid() != 0 or JOURNAL_SOCKET.exists():
        pytest.skip("needs root and no journald running (the test plays journald)")
    JOURNAL_SOCKET.parent.mkdir(parents=True, exist_ok=True)
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(JOURNAL_SOCKET))
    journal.settimeout(0.1)
    entries: list[dict[str, str]] = []

    def receive() -> None:
        while True:
            try:
                entries.append(_parse_journal_datagram(journal.recv(1 << 20)))
            except TimeoutError:
                return

    config = write_config(tmp_path, fake_api.url)
    (tmp_path / "inbox" / "j.wav").write_bytes(wav_bytes(2500))
    stdout = tmp_path / "stdout.log"
    try:
        with stdout.open("wb") as out:
            st = os.fstat(out.fileno())
            env = daemon_env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
            proc = subprocess.Popen(
                [sys.executable, "-m", "sfwatch", "run", "--burst", "-c", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
            assert proc.wait(30) == 0
        receive()
    finally:
        journal.close()
        JOURNAL_SOCKET.unlink(missing_ok=True)
    finished = [e for e in entries if e.get("EVENT") == "sfwatch.job_finished"]
    assert len(finished) == 1, entries
    entry = finished[0]
    assert entry["TRACE_ID"] == fake_api.uploads[0].trace_id
    assert entry["OUTCOME"] == "done"
    assert entry["JOB_ID"]
    assert entry["FILE"].endswith("j.wav")
    assert entry["PRIORITY"] == "6"
    assert entry["SYSLOG_IDENTIFIER"] == "sfwatch"
    assert entry["MESSAGE"].startswith("{")
    assert stdout.read_text() == "", "stdout is the journal: nothing is written twice"
