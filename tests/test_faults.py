"""The service misbehaves; files still end in done/, and never in failed/ for it.

Promise P3 of docs/design.md: a fault of the service never fails a file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from sfwatch.daemon import Daemon
from tests.audiogen import wav_bytes
from tests.conftest import files_under, running_daemon, wait_until, write_config
from tests.fakeapi import (
    DROP,
    R200_NO_TEXT,
    R401,
    R403_BALANCE,
    R429_RETRY_AFTER,
    R500,
    R503_OVERLOADED,
    R504,
    RESET,
    FakeAPI,
    Reply,
    stall,
)


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        (R429_RETRY_AFTER, 429),
        (R503_OVERLOADED, 503),
        (R504, 504),
        (R500, 500),
        (RESET, 0),
        (DROP, 0),
        (stall(5), 0),
    ],
    ids=["429", "503-overloaded", "504", "500", "reset", "drop", "stall"],
)
def test_transient_fault_is_ridden_out(
    tmp_path: Path, fake_api: FakeAPI, fault: Reply, status: int
) -> None:
    """One transient fault, then success: the file ends in done/, uncharged."""
    fake_api.script(fault)
    config = write_config(tmp_path, fake_api.url, api={"timeout_seconds": 1, "concurrency": 1})
    data = wav_bytes(70_000)
    with capture_logs() as logs, running_daemon(config) as daemon:
        (daemon.inbox / "a.mp3").write_bytes(data)
        wait_until((daemon.inbox / "done" / "a.mp3").exists, 20, "a.mp3 done")
    assert [u.status for u in fake_api.uploads] == [status, 200]
    assert fake_api.uploads[-1].sha256 == hashlib.sha256(data).hexdigest()
    assert not (daemon.inbox / "failed").exists()
    failed = [e for e in logs if e["event"] in ("sfwatch.upload_failed", "sfwatch.rate_limited")]
    assert len(failed) == 1
    assert failed[0]["trace_id"] == (fake_api.uploads[0].trace_id if status else None)
    finished = [e for e in logs if e["event"] == "sfwatch.job_finished"]
    assert finished[0]["outcome"] == "done"
    assert finished[0]["trace_id"] == fake_api.uploads[-1].trace_id
    assert finished[0]["attempts"] == 1, "no other upload succeeded meanwhile: not charged"


def test_outage_opens_the_circuit_and_recovers(tmp_path: Path, fake_api: FakeAPI) -> None:
    """Failures in a row stop all uploads for a while; one probe upload then resumes."""
    fake_api.script(R503_OVERLOADED, R500, R504)
    config = write_config(tmp_path, fake_api.url, api={"concurrency": 1})
    with capture_logs() as logs, running_daemon(config) as daemon:
        (daemon.inbox / "a.mp3").write_bytes(wav_bytes(1000))
        wait_until((daemon.inbox / "done" / "a.mp3").exists, 30, "a.mp3 done")
    assert [u.status for u in fake_api.uploads] == [503, 500, 504, 200]
    reasons = [e["reason"] for e in logs if e["event"] == "sfwatch.upload_failed"]
    assert reasons == ["overloaded", "server_error", "timeout"]


def test_server_down_fails_nothing(tmp_path: Path) -> None:
    """Connection refused for a while: files wait in the work area, then finish."""
    api = FakeAPI(api_key="sk-test-5f1e9a7c3b2d4e6f8a0b").start()
    url = api.url
    api.stop()  # the port is now closed: every upload is refused
    config = write_config(tmp_path, url, api={"max_attempts": 2})
    with capture_logs() as logs, running_daemon(config) as daemon:
        for i in range(3):
            (daemon.inbox / f"r{i}.wav").write_bytes(wav_bytes(2000 + i))
        wait_until(
            lambda: sum(e["event"] == "sfwatch.upload_failed" for e in logs) >= 4,
            30,
            "several refused uploads",
        )
        assert not (daemon.inbox / "failed").exists(), "an outage must not fail files"
        api.start()  # the same port again: the service is back
        try:
            wait_until(lambda: len(files_under(daemon.inbox / "done")) == 3, 60, "recovery")
        finally:
            daemon.stop()
            api.stop()
    assert not (daemon.inbox / "failed").exists()
    assert all(e.get("charged") is False for e in logs if e["event"] == "sfwatch.upload_failed")


def test_account_fault_pauses_then_resumes(tmp_path: Path, fake_api: FakeAPI) -> None:
    """401 and 403 (balance) pause every upload, logged once; a good probe resumes."""
    fake_api.script(R401, R403_BALANCE)
    config = write_config(tmp_path, fake_api.url)
    with capture_logs() as logs, running_daemon(config) as daemon:
        (daemon.inbox / "a.mp3").write_bytes(wav_bytes(1000))
        wait_until((daemon.inbox / "done" / "a.mp3").exists, 40, "a.mp3 done after pause")
    assert not (daemon.inbox / "failed").exists()
    paused = [e for e in logs if e["event"] == "sfwatch.uploads_paused"]
    assert paused and paused[0]["http_status"] == 401
    assert any(e["event"] == "sfwatch.uploads_resumed" for e in logs)


def test_unusable_200_twice_fails_the_file(tmp_path: Path, fake_api: FakeAPI) -> None:
    """A 200 without text once is retried; twice for one file is the file's fault."""
    fake_api.script(R200_NO_TEXT, R200_NO_TEXT)
    config = write_config(tmp_path, fake_api.url)
    with running_daemon(config) as daemon:
        (daemon.inbox / "odd.mp3").write_bytes(wav_bytes(1000))
        wait_until((daemon.inbox / "failed" / "odd.mp3.error.json").exists, 20, "failed")
    assert len(fake_api.uploads) == 2


def test_a_bug_in_the_loop_is_logged_and_the_loop_goes_on(
    tmp_path: Path, fake_api: FakeAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A turn that raises, then working out the sleep: a loop_error each; the file is done."""
    bugs = {"tick": 1, "_sleep_time": 1}  # how many more times each raises

    def buggy(name: str) -> object:
        original = getattr(Daemon, name)

        def method(self: Daemon) -> object:
            if bugs[name]:
                bugs[name] -= 1
                raise RuntimeError(f"a bug in {name}")
            return original(self)

        return method

    for name in bugs:
        monkeypatch.setattr(Daemon, name, buggy(name))
    config = write_config(tmp_path, fake_api.url)
    with capture_logs() as logs, running_daemon(config) as daemon:
        (daemon.inbox / "a.mp3").write_bytes(wav_bytes(10_000))
        wait_until((daemon.inbox / "done" / "a.mp3").exists, 20, "a.mp3 done")
        wait_until(lambda: not any(bugs.values()), 10, "both bugs hit")
    assert daemon.result == [0], "the daemon stopped as asked, not on the bugs"
    errors = [e for e in logs if e["event"] == "sfwatch.loop_error"]
    assert len(errors) == 2
