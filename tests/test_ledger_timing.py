"""The ledger keeps paid segments durably: per part, per job, per content; old ledgers migrate."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path, PurePosixPath

from sfwatch.job import FileSignature, Job
from sfwatch.ledger import SCHEMA, Ledger
from sfwatch.subtitles import Segment, Timing

TIMING = Timing((Segment(0.0, 1.25, "hallo"), Segment(1.25, 2.0, "welt")), "de", 2.0)


def job(tmp_path: Path) -> Job:
    """A claimed job with a paid text and its segments."""
    return Job(
        "0123456789ab",
        tmp_path,
        PurePosixPath("a.wav"),
        tmp_path / "a.wav",
        FileSignature(10, 1, 2, 3),
        sha256="ab" * 32,
        text="hallo welt",
        timing=TIMING,
    )


def test_an_older_ledger_gains_the_timing_columns(tmp_path: Path) -> None:
    """A ledger made before segments existed opens; its transcripts read back without timing."""
    path = tmp_path / "ledger.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(SCHEMA)
        db.execute("INSERT INTO transcripts VALUES ('s', 'm', 'old text', NULL, 0)")
        db.commit()
    ledger = Ledger(path)
    try:
        assert ledger.known("s", "m") == ("old text", None)
        assert ledger.known_text("s", "m") == "old text"
    finally:
        ledger.close()


def test_paid_segments_survive_in_the_job_and_for_dedup(tmp_path: Path) -> None:
    """transcribed() stores the timing with the text: the row and known() give it back."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    try:
        paid = job(tmp_path)
        ledger.claimed(paid, "test")
        ledger.transcribed(paid, "m", "ti_1")
        row = ledger.job(paid.job_id)
        assert row is not None
        assert (row.text, row.timing) == ("hallo welt", TIMING)
        assert row.created > 0
        assert ledger.known(paid.sha256 or "", "m") == ("hallo welt", TIMING)
    finally:
        ledger.close()


def test_part_results_keep_their_segments(tmp_path: Path) -> None:
    """part_done() records each finished part's segments; an older row has texts only."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    try:
        paid = job(tmp_path)
        ledger.claimed(paid, "test")
        assert ledger.part_timings(paid.job_id) == []
        ledger.part_done(paid.job_id, ["one", "two"], [TIMING, None])
        assert ledger.parts(paid.job_id) == ["one", "two"]
        assert ledger.part_timings(paid.job_id) == [TIMING, None]
        ledger.part_done(paid.job_id, [])
        assert ledger.part_timings(paid.job_id) == []
    finally:
        ledger.close()
