"""finish with several outputs: one stem for all, chosen together, written all or nothing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from sfwatch.config import WatchConfig
from sfwatch.finish import Naming, finish_done, output_files, plan_done
from sfwatch.fsutil import temp_name
from sfwatch.job import Job, Plan
from sfwatch.subtitles import Segment, Timing, render
from tests.conftest import files_under
from tests.test_finish import AUDIO, claimed, put

TEXT = "Hello there. Grüße"
TIMING = Timing((Segment(0.0, 1.5, "Hello there."), Segment(1.5, 3.0, "Grüße")), "en", 3.0)
ALL = ("txt", "srt", "vtt", "json")


@pytest.fixture
def watch(tmp_path: Path) -> WatchConfig:
    """A watched folder writing every output format."""
    folder = tmp_path / "inbox"
    folder.mkdir()
    return WatchConfig(path=folder, outputs=ALL)


def timed(job: Job) -> Job:
    """The job as the worker hands it to finish: paid text with its segments."""
    return job.evolve(text=TEXT, timing=TIMING)


def test_every_output_shares_the_stem_of_the_original(watch: WatchConfig) -> None:
    """a.mp3 → a.txt, a.srt, a.vtt, a.json beside it, done/a.mp3; each rendered from the timing."""
    placed = finish_done(timed(claimed(watch, "a.mp3")), TEXT, watch)
    inbox = watch.path
    assert files_under(inbox) == ["a.json", "a.srt", "a.txt", "a.vtt", "done/a.mp3"]
    assert placed.transcript == inbox / "a.txt"
    assert placed.outputs == (inbox / "a.srt", inbox / "a.vtt", inbox / "a.json")
    for fmt in ALL:
        assert (inbox / f"a.{fmt}").read_bytes() == render(fmt, TEXT, TIMING)
    assert json.loads((inbox / "a.json").read_text(encoding="utf-8"))["language"] == "en"


@pytest.mark.parametrize("taken", ["a.srt", "a.json", "done/a.mp3"])
def test_any_name_taken_moves_all_outputs_to_the_next_stem(watch: WatchConfig, taken: str) -> None:
    """Only a.srt (or a.json, or done/a.mp3) exists: every output and the original get a (1)."""
    stranger = put(watch.path / taken, b"a stranger's file")
    finish_done(timed(claimed(watch, "a.mp3")), TEXT, watch)
    inbox = watch.path
    assert stranger.read_bytes() == b"a stranger's file"
    for fmt in ALL:
        assert (inbox / f"a (1).{fmt}").exists(), fmt
    assert (inbox / "done" / "a (1).mp3").read_bytes() == AUDIO
    assert sorted(files_under(inbox)) == sorted(
        [taken, *(f"a (1).{fmt}" for fmt in ALL), "done/a (1).mp3"]
    )


def test_the_transcript_name_template_keeps_the_shared_stem(watch: WatchConfig) -> None:
    """{stem}.{lang}: a.en.srt; with a.en.srt taken, a (1).en.srt beside done/a (1).mp3."""
    named = dataclasses.replace(watch, transcript_name="{stem}.{lang}", outputs=("txt", "srt"))
    put(watch.path / "a.en.srt", b"taken")
    finish_done(timed(claimed(named, "a.mp3")), TEXT, named, naming=Naming(lang="en"))
    assert files_under(watch.path) == [
        "a (1).en.srt",
        "a (1).en.txt",
        "a.en.srt",
        "done/a (1).mp3",
    ]


def test_a_template_without_stem_is_numbered_itself(watch: WatchConfig) -> None:
    """transcript_name '{date} notes': a second recording the same day gets '… notes (1)'."""
    named = dataclasses.replace(watch, transcript_name="{date} notes", outputs=("txt",))
    day = Naming(date="2026-12-06")
    finish_done(timed(claimed(named, "a.mp3")), TEXT, named, naming=day)
    finish_done(timed(claimed(named, "b.mp3")), TEXT, named, naming=day)
    assert files_under(watch.path) == [
        "2026-12-06 notes (1).txt",
        "2026-12-06 notes.txt",
        "done/a.mp3",
        "done/b.mp3",
    ]


def test_without_segments_only_the_txt_is_written(watch: WatchConfig) -> None:
    """A paid transcript without a timing (from before outputs changed) still gets its txt."""
    srt_only = dataclasses.replace(watch, outputs=("srt",))
    placed = finish_done(claimed(srt_only, "a.mp3").evolve(text=TEXT), TEXT, srt_only)
    assert placed.outputs == ()
    assert files_under(watch.path) == ["a.txt", "done/a.mp3"]


def test_outputs_are_all_or_nothing(watch: WatchConfig) -> None:
    """Writing one output fails: none is visible; the retry writes all of them once."""
    job = timed(claimed(watch, "a.mp3"))
    plan = plan_done(job, watch)
    blocker = temp_name(watch.path / "a.vtt", job.job_id)
    blocker.mkdir()  # the third temp cannot be created (EISDIR)
    with pytest.raises(IsADirectoryError):
        finish_done(job, TEXT, watch, plan=plan)
    assert [p for p in watch.path.iterdir() if not p.name.startswith(".")] == []
    blocker.rmdir()
    finish_done(job, TEXT, watch, plan=plan)
    assert files_under(watch.path) == ["a.json", "a.srt", "a.txt", "a.vtt", "done/a.mp3"]


def test_a_killed_run_between_links_is_completed(watch: WatchConfig) -> None:
    """First output linked, the others' temps left half-written: kept, completed, temps gone."""
    job = timed(claimed(watch, "a.mp3"))
    plan = plan_done(job, watch)
    files = output_files(plan, TEXT, TIMING)
    first, first_bytes = files[0]
    first.write_bytes(first_bytes)
    kept = first.stat().st_ino
    for path, data in files[1:]:
        temp_name(path, job.job_id).write_bytes(data[:5])
    recorded: list[Plan] = []
    placed = finish_done(job, TEXT, watch, plan=plan, record=recorded.append)
    assert recorded == [], "the plan held: no new names"
    assert placed.outputs == plan.outputs
    assert first.stat().st_ino == kept
    assert files_under(watch.path) == ["a.json", "a.srt", "a.txt", "a.vtt", "done/a.mp3"]
    for path, data in files:
        assert path.read_bytes() == data


def test_a_stranger_taking_a_planned_name_replans_all_of_them(watch: WatchConfig) -> None:
    """a.vtt taken after the plan: ours (a.txt, a.srt) removed, everything goes to a (1)."""
    job = timed(claimed(watch, "a.mp3"))
    plan = plan_done(job, watch)
    put(watch.path / "a.vtt", b"mine")
    recorded: list[Plan] = []
    placed = finish_done(job, TEXT, watch, plan=plan, record=recorded.append)
    assert [p.transcript for p in recorded] == [watch.path / "a (1).txt"]
    assert placed.transcript == watch.path / "a (1).txt"
    assert files_under(watch.path) == [
        "a (1).json",
        "a (1).srt",
        "a (1).txt",
        "a (1).vtt",
        "a.vtt",
        "done/a (1).mp3",
    ]


def test_plans_keep_their_outputs_and_old_plans_still_read() -> None:
    """Plan.to_json/from_json carry outputs; a plan written before outputs has none."""
    plan = Plan("done", Path("/d/a.mp3"), Path("/i/a.txt"), outputs=(Path("/i/a.srt"),))
    assert Plan.from_json(plan.to_json()) == plan
    old = '{"kind": "done", "original": "/d/a.mp3", "transcript": "/i/a.txt", "error": null}'
    assert Plan.from_json(old).outputs == ()
    assert plan.paths() == (Path("/i/a.txt"), Path("/i/a.srt"), Path("/d/a.mp3"))
