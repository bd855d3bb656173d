"""Deliveries yield to uploads while the daemon is CPU-bound (docs/design.md §13):
a real dispatcher and lanes, a loopback webhook receiver, a real daemon with the fake
API; the daemon's own CPU is made busy by a thread that spins.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from sfwatch.config import parse_config
from sfwatch.ledger import Ledger
from sfwatch.outbox import Outbox
from sfwatch.pressure import Pressure
from tests.audiogen import wav_bytes
from tests.conftest import running_daemon, wait_until, write_config
from tests.fakeapi import FakeAPI
from tests.test_outbox import Receiver, receiver

EVENTS = ["done", "failed", "paused", "resumed"]
FINISHED = "sfwatch.job_finished"
DELIVERED = "sfwatch.webhook_delivered"


@contextmanager
def spinning() -> Iterator[None]:
    """A thread of this process that keeps one core busy for the block."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def outbox_to(
    tmp_path: Path, sink: Receiver, yielding: threading.Event, **kwargs: Any
) -> Iterator[tuple[Outbox, Ledger]]:
    """An Outbox with one webhook for every event, yielding while ``yielding`` is set."""
    config = parse_config(
        {"watch": [{"path": "inbox"}], "webhooks": [{"url": sink.url, "events": EVENTS}]},
        tmp_path,
    )
    ledger = Ledger.in_state_dir(tmp_path / "state")
    outbox = Outbox(config, ledger, yield_to=yielding.is_set, **kwargs)
    try:
        yield outbox, ledger
    finally:
        outbox.stop(1.0)
        ledger.close()


def _add_files(outbox: Outbox, ledger: Ledger, count: int) -> None:
    watch = outbox.config.watch[0]
    for index in range(count):
        fields = {"job_id": f"j{index}", "file": f"/in/{index}.wav", "outcome": "done"}
        ledger.outbox_add(outbox.routes.for_job(watch, "done", fields))


def _types(sink: Receiver) -> list[str]:
    return [str(r.json["type"]) for r in sink.accepted()]


def test_pressure_needs_both_a_backlog_and_a_busy_daemon() -> None:
    """busy() is true only while the loop says files wait and the last window was busy;
    a window left open through an idle spell is not judged."""
    now, spent = [100.0], [5.0]
    pressure = Pressure(busy_cores=0.9, window=1.0, clock=lambda: now[0], cpu=lambda: spent[0])

    def advance(seconds: float, cores: float) -> bool:
        now[0] += seconds
        spent[0] += seconds * cores
        return pressure.busy()

    assert not advance(1.0, 1.2), "no backlog: nothing to yield to"
    assert pressure.cores == pytest.approx(1.2)
    pressure.backlog = True
    assert advance(0.5, 0.0), "judged by the last whole window until the next one closes"
    assert not advance(0.6, 0.0), "a window of 0.7 cores (0.6 s of 1.1) is not busy"
    assert advance(1.0, 1.0)
    assert not advance(60.0, 0.02), "an idle minute is not judged"
    assert advance(1.0, 0.95), "the first second of a burst is"


def test_process_time_counts_the_cpu_of_every_thread() -> None:
    """A real thread spinning makes the real Pressure see CPU; it goes once it stops."""
    pressure = Pressure(busy_cores=0.1, window=0.2)
    pressure.backlog = True
    with spinning():
        wait_until(pressure.busy, 10, "busy while a thread spins")
    wait_until(lambda: not pressure.busy(), 10, "idle once the spinning stopped")


def test_file_deliveries_wait_while_uploads_go_first_but_account_events_do_not(
    tmp_path: Path,
) -> None:
    """Held: 100 files' webhooks (more than one look's batch); sent at once, behind
    them: `paused`, and `resumed` made while all is held. Released: every file, once."""
    yielding = threading.Event()
    yielding.set()
    with receiver() as sink, outbox_to(tmp_path, sink, yielding) as (outbox, ledger):
        _add_files(outbox, ledger, 100)
        outbox.account_event("paused", {"reason": "unauthorized", "http_status": 401})
        with capture_logs() as logs:
            outbox.start()
            wait_until(lambda: _types(sink) == ["paused"], 5, "the account event")
            assert any(e["event"] == "sfwatch.deliveries_yield" for e in logs)
            outbox.account_event("resumed", {})
            wait_until(lambda: _types(sink) == ["paused", "resumed"], 5, "the next one")
            held = [row.status for row in ledger.outbox_rows() if row.job_id is not None]
            assert held == ["pending"] * 100
            yielding.clear()
            wait_until(lambda: len(sink.accepted()) == 102, 10, "the held files")
            wait_until(lambda: ledger.outbox_counts() == {"delivered": 102}, 5, "marked")
        assert any(e["event"] == "sfwatch.deliveries_resume" for e in logs)
    files = sorted(r.json["data"]["job_id"] for r in sink.accepted()[2:])
    assert files == sorted(f"j{i}" for i in range(100))  # each once, in any order


def test_held_deliveries_go_when_their_limit_is_reached_and_do_not_pile_up(
    tmp_path: Path,
) -> None:
    """Uploads that stay busy hold a file's webhook ``yield_limit`` seconds, no more; then
    400 of them go at the usual pace, not one look's batch (64) a second."""
    yielding = threading.Event()
    yielding.set()
    with (
        receiver() as sink,
        outbox_to(tmp_path, sink, yielding, yield_limit=1.0) as (outbox, ledger),
    ):
        _add_files(outbox, ledger, 400)
        created = min(row.created for row in ledger.outbox_rows())
        outbox.start()
        wait_until(lambda: len(sink.accepted()) >= 1, 10, "the first webhook")
        first = time.time()
        wait_until(lambda: len(sink.accepted()) == 400, 20, "every webhook")
        last = time.time()
    assert first - created >= 1.0, first - created
    # Four webhook lanes hold 32 rows: one look a second would take 12 s; ~4 s here.
    assert last - first < 8.0, last - first


def test_a_daemon_pushing_a_backlog_delivers_after_it(tmp_path: Path, fake_api: FakeAPI) -> None:
    """C=1, 0.3 s per upload, 8 files: the first file's webhook waits for the backlog."""
    fake_api.latency = 0.3
    with receiver() as sink:
        hook = {"url": sink.url, "events": ["done"]}
        config = write_config(
            tmp_path, fake_api.url, api={"concurrency": 1}, extra={"webhooks": [hook]}
        )
        with capture_logs() as logs, running_daemon(config, backoff_base=0.05) as running:
            running.daemon.pressure.busy_cores = 0.0  # any CPU counts: a backlog is enough
            inbox = tmp_path / "inbox"
            for index in range(8):
                (inbox / f"{index}.wav").write_bytes(wav_bytes(4000, seed=index))
            wait_until(lambda: len(sink.accepted()) == 8, 30, "every file's webhook")
    order = [e["event"] for e in logs if e["event"] in {FINISHED, DELIVERED}]
    # Without the yield the first webhook comes right after the first finish. With it,
    # it waits while files wait for the slot: until about the fifth finish (three
    # files are claimed at once, one uploading and two prepared ahead).
    assert order.index(DELIVERED) > 3, order
