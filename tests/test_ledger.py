"""The ledger's group commit: concurrent writers share transactions, each keeps its own result."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from sfwatch.job import FileSignature, Job
from sfwatch.ledger import Ledger
from tests.conftest import poll_until


def _job(n: int) -> Job:
    return Job(
        job_id=f"job{n:04d}",
        root=Path("/inbox"),
        rel=Path(f"f{n}.wav"),  # type: ignore[arg-type]
        path=Path(f"/inbox/.sfwatch/x/job{n:04d}/f{n}.wav"),
        signature=FileSignature(size=n, mtime_ns=0, inode=n, device=1),
    )


def _batched(ledger: Ledger, writers: list[threading.Thread]) -> None:
    """Start ``writers`` while the database is busy, so that they queue and commit together."""
    with ledger._lock:  # the connection is busy: every writer must queue behind the first
        for thread in writers:
            thread.start()
        poll_until(lambda: len(ledger._commits._waiting) >= len(writers) - 1, timeout=10)
    for thread in writers:
        thread.join(10)


def test_concurrent_writers_are_all_committed(tmp_path: Path) -> None:
    """64 threads claiming at once: every row is there, with the stage each one asked for."""
    ledger = Ledger(tmp_path / "ledger.db")
    rows: dict[str, str | None] = {}

    def claim(n: int) -> None:
        rows[_job(n).job_id] = ledger.claimed(_job(n), "me", stage="prepare").stage

    _batched(ledger, [threading.Thread(target=claim, args=(n,)) for n in range(64)])
    assert rows == {_job(n).job_id: "prepare" for n in range(64)}
    reopened = Ledger(tmp_path / "ledger.db")
    assert len(reopened.open_jobs()) == 64
    assert all(row.running for row in reopened.open_jobs())


def test_a_failing_write_is_undone_alone(tmp_path: Path) -> None:
    """One op of a batch raises: it raises in its own thread, the others are committed."""
    ledger = Ledger(tmp_path / "ledger.db")
    errors: dict[int, BaseException] = {}

    def write(n: int) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO daemon VALUES (?, 1, 0, '{}')", (f"d{n}",))
            if n == 3:
                db.execute("INSERT INTO no_such_table VALUES (1)")

        try:
            ledger._write(op)
        except sqlite3.Error as exc:
            errors[n] = exc

    _batched(ledger, [threading.Thread(target=write, args=(n,)) for n in range(8)])
    assert list(errors) == [3]
    assert sorted(s["instance"] for s in ledger.daemon_states()) == [
        f"d{n}" for n in range(8) if n != 3
    ]


def test_a_failed_commit_fails_every_write_of_its_batch(tmp_path: Path) -> None:
    """The commit itself fails (here: a foreign lock): no writer of the batch is told it worked."""
    path = tmp_path / "ledger.db"
    ledger = Ledger(path)
    ledger._db.execute("PRAGMA busy_timeout=50")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    with pytest.raises(sqlite3.OperationalError):
        ledger.set_stage("job0001", "upload")
    other.execute("ROLLBACK")
    ledger.claimed(_job(1), "me")
    ledger.set_stage("job0001", "upload")
    row = ledger.job("job0001")
    assert row is not None
    assert row.stage == "upload"


def test_a_queued_write_commits_before_later_ones_and_before_close(tmp_path: Path) -> None:
    """A claim queued without waiting: a later write sees its row; close commits what is queued."""
    ledger = Ledger(tmp_path / "ledger.db")
    row = ledger.claimed_later(_job(1), "me", stage="prepare")
    ledger.set_stage(_job(1).job_id, "upload")  # waits, and comes after the queued insert
    row.wait()
    found = ledger.job(_job(1).job_id)
    assert found is not None
    assert found.stage == "upload"
    ledger.claimed_later(_job(2), "me", stage="prepare")
    ledger.set_stage_later(_job(2).job_id, "upload")
    ledger.close()
    reopened = Ledger(tmp_path / "ledger.db")
    second = reopened.job(_job(2).job_id)
    assert second is not None
    assert second.stage == "upload"


def test_a_queued_write_that_fails_raises_when_waited_for(tmp_path: Path) -> None:
    """The ledger refuses a queued write (a foreign lock): ``wait`` raises, nothing is lost."""
    path = tmp_path / "ledger.db"
    ledger = Ledger(path)
    ledger._db.execute("PRAGMA busy_timeout=50")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    row = ledger.claimed_later(_job(1), "me", stage="prepare")
    with pytest.raises(sqlite3.OperationalError):
        row.wait()
    other.execute("ROLLBACK")
    assert ledger.job(_job(1).job_id) is None
    ledger.claimed(_job(1), "me")  # what ``Worker.durable_claim`` does then
    assert ledger.job(_job(1).job_id) is not None
