"""Promises 3 and 4 over time: outages, account faults, rate limits, dedup, give-up.

Daemons run in a thread of the test process with ``backoff_base=0.05``: every
backoff is 20x shorter than in production, with the same shape.
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from tests.audiogen import wav_bytes
from tests.conftest import (
    API_KEY,
    daemon_process,
    files_under,
    run_cli,
    running_daemon,
    wait_until,
    write_config,
)
from tests.fakeapi import R401, R403_BALANCE, R500, R503_OVERLOADED, FakeAPI

FAST = {"backoff_base": 0.05}


def _events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


def test_outage_then_overload_then_bad_key_fails_nothing(tmp_path: Path) -> None:
    """Refused connections, then 503s, then 401 and 403 as files arrive: all done after."""
    api = FakeAPI(api_key=API_KEY).start()
    url = api.url
    api.stop()
    config = write_config(tmp_path, url, api={"max_attempts": 2, "concurrency": 2})
    written: dict[str, str] = {}

    def drop(name: str) -> None:
        data = wav_bytes(1500)
        written[name] = hashlib.sha256(data).hexdigest()
        (tmp_path / "inbox" / name).write_bytes(data)

    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        drop("a.mp3")
        wait_until(lambda: len(_events(logs, "sfwatch.upload_failed")) >= 3, 20, "refusals")
        api.start()  # back, but overloaded
        api.set_default(R503_OVERLOADED)
        drop("b.mp3")
        wait_until(lambda: sum(u.status == 503 for u in api.uploads) >= 3, 20, "503s")
        api.set_default(R401)  # then the key stops working
        api.info_reply = R401
        drop("c.mp3")
        wait_until(lambda: _events(logs, "sfwatch.uploads_paused"), 20, "paused")
        wait_until(lambda: _events(logs, "sfwatch.account_probe_failed"), 20, "probe failed")
        api.set_default(R403_BALANCE)  # the key is fixed, the balance is not
        api.info_reply = R403_BALANCE
        drop("d.mp3")
        wait_until(lambda: len(_events(logs, "sfwatch.account_probe_failed")) >= 2, 20, "probe")
        assert not (daemon.inbox / "failed").exists(), "no service fault fails a file"
        assert daemon.thread.is_alive()
        api.set_default(None)  # everything recovers
        api.info_reply = None
        try:
            wait_until(lambda: len(files_under(daemon.inbox / "done")) == 4, 30, "recovery")
        finally:
            daemon.stop()
            api.stop()
    assert not (daemon.inbox / "failed").exists()
    for name, digest in written.items():
        txt = (daemon.inbox / name).with_suffix(".txt")
        assert txt.read_text(encoding="utf-8") == FakeAPI.text_for(digest) + "\n"
    assert len(_events(logs, "sfwatch.uploads_paused")) <= 2, "a pause is logged once, not per file"
    assert all(e["attempts"] <= 1 for e in _events(logs, "sfwatch.job_finished"))


def test_same_content_is_paid_once(tmp_path: Path, fake_api: FakeAPI) -> None:
    """A copy of a file already transcribed is finished from the ledger: no upload."""
    config = write_config(tmp_path, fake_api.url)
    data = wav_bytes(3000)
    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        (daemon.inbox / "first.wav").write_bytes(data)
        wait_until((daemon.inbox / "done" / "first.wav").exists, 10)
        (daemon.inbox / "copy.wav").write_bytes(data)
        wait_until((daemon.inbox / "done" / "copy.wav").exists, 10)
    assert len(fake_api.uploads) == 1
    assert (daemon.inbox / "copy.txt").read_text() == (daemon.inbox / "first.txt").read_text()
    outcomes = [e["outcome"] for e in _events(logs, "sfwatch.job_finished")]
    assert outcomes == ["done", "dedup"]


def test_reused_name_with_new_content_is_transcribed(tmp_path: Path, fake_api: FakeAPI) -> None:
    """A voice recorder's REC001.WAV again, new content: a new upload, ' (1)' names."""
    config = write_config(tmp_path, fake_api.url)
    first, second = wav_bytes(2000), wav_bytes(2000)
    with running_daemon(config, **FAST) as daemon:
        (daemon.inbox / "REC001.WAV").write_bytes(first)
        wait_until((daemon.inbox / "done" / "REC001.WAV").exists, 10)
        (daemon.inbox / "REC001.WAV").write_bytes(second)
        wait_until((daemon.inbox / "done" / "REC001 (1).WAV").exists, 10)
    assert [u.sha256 for u in fake_api.uploads] == [
        hashlib.sha256(first).hexdigest(),
        hashlib.sha256(second).hexdigest(),
    ]
    assert (daemon.inbox / "done" / "REC001.WAV").read_bytes() == first
    assert (daemon.inbox / "done" / "REC001 (1).WAV").read_bytes() == second
    assert (daemon.inbox / "REC001 (1).txt").read_text() == FakeAPI.text_for(
        hashlib.sha256(second).hexdigest()
    ) + "\n"


def test_a_file_failing_while_others_succeed_gives_up(tmp_path: Path, fake_api: FakeAPI) -> None:
    """500s for one file while other uploads work: after max_attempts it fails as gave_up."""
    fake_api.responder = lambda u: R500 if u.filename == "flaky.mp3" else None
    config = write_config(tmp_path, fake_api.url, api={"max_attempts": 3})
    with running_daemon(config, **FAST) as daemon:
        (daemon.inbox / "flaky.mp3").write_bytes(wav_bytes(1000))
        error_file = daemon.inbox / "failed" / "flaky.mp3.error.json"
        n = 0
        while not error_file.exists() and n < 200:  # other files keep succeeding meanwhile
            n += 1
            (daemon.inbox / f"good{n}.wav").write_bytes(wav_bytes(500 + n))
            wait_until((daemon.inbox / "done" / f"good{n}.wav").exists, 10)
        record = json.loads(error_file.read_text())
    assert record["reason"] == "gave_up"
    assert record["attempts"] == 3
    assert record["http_status"] == 500
    assert (
        record["trace_id"]
        == [u for u in fake_api.uploads if u.filename == "flaky.mp3"][-1].trace_id
    )
    # Tries with no success by another upload in between were not charged.
    assert sum(u.filename == "flaky.mp3" for u in fake_api.uploads) >= 3


def test_rate_limits_slow_the_daemon_without_failing(tmp_path: Path, fake_api: FakeAPI) -> None:
    """A server allowing 20 requests a second: 429s cut concurrency; every file is done."""
    fake_api.rate_limit(20, retry_after=0.2, window=1.0)
    fake_api.latency = 0.05
    config = write_config(tmp_path, fake_api.url, api={"concurrency": 8})
    for i in range(60):
        (tmp_path / "inbox" / f"r{i}.wav").write_bytes(wav_bytes(300 + i))
    with capture_logs() as logs, running_daemon(config, burst=True, **FAST) as daemon:
        daemon.thread.join(60)
        assert not daemon.thread.is_alive()
    assert len(files_under(daemon.inbox / "done")) == 60
    assert not (daemon.inbox / "failed").exists()
    limited = _events(logs, "sfwatch.rate_limited")
    assert limited, "the fake's limit was reached"
    assert min(int(str(e["limit"])) for e in limited) < 8, "concurrency was cut"
    assert sum(u.status == 429 for u in fake_api.uploads) < 60, "the daemon backed off"


def test_requests_per_minute_caps_starts(tmp_path: Path, fake_api: FakeAPI) -> None:
    """api.requests_per_minute: no more starts in any 60 s window than the cap."""
    config = write_config(tmp_path, fake_api.url, api={"requests_per_minute": 5})
    with running_daemon(config, **FAST) as daemon:
        for i in range(8):
            (daemon.inbox / f"q{i}.wav").write_bytes(wav_bytes(400 + i))
        wait_until(lambda: len(fake_api.uploads) >= 5, 10, "five uploads")

        def three_waiting() -> bool:
            # Queued, or claimed and prepared, waiting at the gate for a turn (slots.py).
            status, slots = daemon.daemon.status(), daemon.daemon.slots
            left = status["queued"] + status["settling"] + len(slots.gate)
            return bool(left == 3 and status["in_flight"] == len(slots.gate))

        wait_until(three_waiting, 10, "three left waiting, none uploading")
        assert len(fake_api.uploads) == 5


def test_status_and_retry_while_running(tmp_path: Path, fake_api: FakeAPI) -> None:
    """status --json reports the live daemon; retry puts a failed file back, and it is done."""
    from tests.fakeapi import R400_DATA_STRING  # noqa: PLC0415

    rejected = threading.Event()
    rejected.set()
    fake_api.responder = lambda _upload: R400_DATA_STRING if rejected.is_set() else None
    config = write_config(tmp_path, fake_api.url)
    inbox = tmp_path / "inbox"
    with daemon_process(config) as daemon:
        daemon.wait_event("sfwatch.daemon_started")
        (inbox / "x.mp3").write_bytes(wav_bytes(999))
        wait_until((inbox / "failed" / "x.mp3.error.json").exists, 10)
        report = wait_until(
            lambda: (
                (r := json.loads(run_cli("status", "--json", "-c", str(config)).stdout))
                and r["counts"].get("failed") == 1
                and r
            ),
            10,
        )
        assert report["daemons"][0]["running"] is True
        assert report["recent_failures"][0]["reason"] == "api_rejected"
        assert report["recent_failures"][0]["http_status"] == 400
        human = run_cli("status", "-c", str(config))
        assert human.returncode == 0
        assert "x.mp3" in human.stdout
        assert "running" in human.stdout
        rejected.clear()  # the service would take it now
        result = run_cli("retry", "-c", str(config), str(inbox / "failed" / "x.mp3"))
        assert result.returncode == 0, result.stderr
        wait_until((inbox / "done" / "x.mp3").exists, 10, "retried file done")
        assert not (inbox / "failed" / "x.mp3.error.json").exists()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
    report = json.loads(run_cli("status", "--json", "-c", str(config)).stdout)
    assert report["counts"] == {"retried": 1, "done": 1}
    assert report["daemons"][0]["running"] is False


def test_dead_observer_is_restarted(tmp_path: Path, fake_api: FakeAPI) -> None:
    """An observer thread that dies is noticed and restarted; files still arrive."""
    config = write_config(tmp_path, fake_api.url, watch={"rescan_seconds": 600})
    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        wait_until(lambda: daemon.daemon.watchers, 5)
        watcher = next(iter(daemon.daemon.watchers.values()))
        watcher.observer.stop()  # the thread ends, as if it had crashed
        wait_until(lambda: _events(logs, "sfwatch.watch_died"), 5, "noticed")
        (daemon.inbox / "after.mp3").write_bytes(wav_bytes(700))
        wait_until((daemon.inbox / "done" / "after.mp3").exists, 10, "processed after restart")
