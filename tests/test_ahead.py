"""Files are claimed and prepared while uploads run; only requests count against the limit.

docs/design.md §4.2: up to ``prepared_ahead(concurrency)`` attempts wait, prepared,
for a turn to upload; a stop or an account pause sends them back unsent.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from sfwatch.runstatus import format_status
from sfwatch.slots import prepared_ahead
from tests.audiogen import wav_bytes
from tests.conftest import (
    Running,
    daemon_process,
    files_under,
    running_daemon,
    wait_until,
    write_config,
)
from tests.fakeapi import R401, FakeAPI, Reply, Upload

AHEAD = prepared_ahead(1)


def held_until(release: threading.Event) -> Callable[[Upload], Reply | None]:
    """A responder that holds every upload until ``release`` is set, then answers 200."""

    def respond(_upload: Upload) -> Reply | None:
        release.wait(30)
        return None

    return respond


def settled(daemon: Running, fake_api: FakeAPI) -> bool:
    """One upload is at the (holding) fake and AHEAD files wait, prepared, for their turn."""
    return len(daemon.daemon.slots.gate) == AHEAD and fake_api.in_flight == 1


def drop_files(inbox: Path, count: int) -> dict[str, str]:
    """Write ``count`` distinct WAVs; their sha256 by name."""
    hashes = {}
    for i in range(count):
        data = wav_bytes(3000 + i)
        (inbox / f"f{i}.wav").write_bytes(data)
        hashes[f"f{i}.wav"] = hashlib.sha256(data).hexdigest()
    return hashes


def test_next_files_are_prepared_while_an_upload_runs(tmp_path: Path, fake_api: FakeAPI) -> None:
    """Concurrency 1: while an upload is held, AHEAD more files are claimed; one request at once."""
    release = threading.Event()
    fake_api.responder = held_until(release)
    config = write_config(tmp_path, fake_api.url, api={"concurrency": 1})
    with capture_logs() as logs, running_daemon(config) as daemon:
        hashes = drop_files(daemon.inbox, AHEAD + 3)
        wait_until(partial(settled, daemon, fake_api), 20, "one upload out, the rest prepared")
        claimed = [e for e in logs if e["event"] == "sfwatch.file_claimed"]
        started = [e for e in logs if e["event"] == "sfwatch.upload_started"]
        assert len(claimed) == 1 + AHEAD, "the upload's file and those prepared ahead, no more"
        assert len(started) == 1, "only the upload with the turn has started"
        status = daemon.daemon.status()  # (nothing moves while the upload is held)
        assert (status["in_flight"], status["uploading"]) == (1 + AHEAD, 1)
        assert f"in flight {1 + AHEAD} (uploading 1)" in format_status(status)
        release.set()
        wait_until(lambda: len(files_under(daemon.inbox / "done")) == len(hashes), 30, "all done")
    assert fake_api.max_concurrent == 1
    assert sorted(u.sha256 for u in fake_api.uploads) == sorted(hashes.values()), "each once"


def test_a_warm_stop_sends_prepared_files_back_unsent(tmp_path: Path, fake_api: FakeAPI) -> None:
    """A stop while files wait for a turn: the upload under way ends; the others go at restart."""
    release = threading.Event()
    fake_api.responder = held_until(release)
    config = write_config(tmp_path, fake_api.url, api={"concurrency": 1})
    with running_daemon(config) as daemon:
        hashes = drop_files(daemon.inbox, AHEAD + 1)
        wait_until(partial(settled, daemon, fake_api), 20, "one upload out, the rest prepared")
        daemon.daemon.request_stop()
        # Refused before the held upload ends: nothing but that one is in flight.
        wait_until(lambda: len(daemon.daemon.slots) == 1, 10, "waiting attempts sent back")
        release.set()
        daemon.thread.join(15)
        assert not daemon.thread.is_alive()
    assert len(fake_api.uploads) == 1, "a stopping daemon starts no upload"
    assert len(files_under(daemon.inbox / "done")) == 1
    fake_api.responder = None
    with running_daemon(config) as again:
        wait_until(lambda: len(files_under(again.inbox / "done")) == len(hashes), 30, "resumed")
    assert sorted(u.sha256 for u in fake_api.uploads) == sorted(hashes.values()), "each once"


def test_an_account_pause_holds_no_claimed_file_in_flight(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """401: the prepared files are sent back to wait; after the pause each is uploaded once."""
    fake_api.script(R401)
    fake_api.info_reply = R401  # the pause lasts until the test lifts it
    config = write_config(tmp_path, fake_api.url, api={"concurrency": 1})
    with capture_logs() as logs, running_daemon(config) as daemon:
        hashes = drop_files(daemon.inbox, AHEAD + 1)
        wait_until(lambda: any(e["event"] == "sfwatch.uploads_paused" for e in logs), 20, "paused")
        wait_until(lambda: len(daemon.daemon.slots) == 0, 10, "nothing held in flight")
        assert [u.status for u in fake_api.uploads] == [401]
        fake_api.info_reply = None
        wait_until(lambda: len(files_under(daemon.inbox / "done")) == len(hashes), 60, "resumed")
    ok = [u.sha256 for u in fake_api.uploads if u.status == 200]
    assert sorted(ok) == sorted(hashes.values()), "each uploaded once after the pause"
    assert not (daemon.inbox / "failed").exists()


def test_uploads_in_flight_never_exceed_concurrency(tmp_path: Path, fake_api: FakeAPI) -> None:
    """Prepared files wait for their turn: never more than C uploads at once, each file once."""
    fake_api.responder = lambda _upload: Reply(delay=0.3)
    config = write_config(tmp_path, fake_api.url, api={"concurrency": 2})
    with running_daemon(config) as daemon:
        hashes = drop_files(daemon.inbox, 10)
        wait_until(lambda: len(files_under(daemon.inbox / "done")) == len(hashes), 30, "all done")
    assert fake_api.max_concurrent == 2
    assert sorted(u.sha256 for u in fake_api.uploads) == sorted(hashes.values()), "each once"


def traced_by(pid: int) -> set[int]:
    """The tracer pids of every thread of ``pid`` (0: not traced)."""
    tracers = set()
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        with contextlib.suppress(OSError):
            for line in status.read_text().splitlines():
                if line.startswith("TracerPid:"):
                    tracers.add(int(line.split()[1]))
    return tracers


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_cold_stop_with_the_state_disk_failing_still_exits(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """Files wait at the gate, the ledger's writes fail (ENOSPC), two SIGTERMs: it exits now."""
    release = threading.Event()
    fake_api.responder = held_until(release)
    config = write_config(tmp_path, fake_api.url, api={"concurrency": 1, "timeout_seconds": 30})
    inbox = tmp_path / "inbox"
    hashes = drop_files(inbox, AHEAD + 1)
    try:
        with daemon_process(config) as daemon:
            wait_until(lambda: fake_api.in_flight == 1, 20, "one upload held")
            wait_until(lambda: len(daemon.events("sfwatch.file_claimed")) == 1 + AHEAD, 20)
            pid = daemon.proc.pid
            # Every write of the ledger (SQLite's WAL) fails from now on, as on a full disk.
            inject = "inject=pwrite64,fdatasync,fsync:error=ENOSPC"
            command = ["strace", "-f", "-qq", "-o", os.devnull, "-e", inject, "-p", str(pid)]
            tracer = subprocess.Popen(command, stderr=subprocess.DEVNULL)
            try:
                wait_until(lambda: traced_by(pid) == {tracer.pid}, 10, "strace attached")
                started = time.monotonic()
                # Two signals at once (two SIGTERMs would merge into one): a cold stop
                # before the loop's next turn, with files still waiting at the gate.
                daemon.signal(signal.SIGTERM)
                daemon.signal(signal.SIGINT)
                daemon.wait(15)
                assert time.monotonic() - started < 5, "a cold stop must not wait for uploads"
            finally:
                tracer.wait(10)
            assert daemon.events("sfwatch.shutdown_failed"), "the ledger's writes did fail"
    finally:
        release.set()
    fake_api.responder = None
    with running_daemon(config) as again:
        wait_until(lambda: len(files_under(again.inbox / "done")) == len(hashes), 30, "resumed")
    assert not (inbox / "failed").exists()
