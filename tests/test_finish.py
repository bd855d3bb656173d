"""finish: transcript beside the audio, original to done/ or failed/, nothing overwritten."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from sfwatch.claim import claim
from sfwatch.config import WatchConfig
from sfwatch.finish import Placed, finish_done, finish_failed
from sfwatch.job import Job, Plan
from sfwatch.settle import SettledFile, signature_of
from tests.conftest import files_under

AUDIO = b"ID3 fake audio \x00\xff" * 100
TEXT = "Grüße aus Zürich — 你好世界"


@pytest.fixture
def watch(tmp_path: Path) -> WatchConfig:
    """A watched folder tmp_path/inbox with default done/ and failed/."""
    folder = tmp_path / "inbox"
    folder.mkdir()
    return WatchConfig(path=folder)


def claimed(watch: WatchConfig, rel: str, data: bytes = AUDIO) -> Job:
    """Drop ``rel`` in the inbox and claim it, as the daemon would before finishing."""
    path = watch.path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    signature = signature_of(path)
    assert signature is not None
    job = claim(SettledFile(path, watch.path, signature), watch.work_dir, "test")
    assert job is not None
    return job


def put(path: Path, data: bytes) -> Path:
    """Create a file that is already there before finish runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --- finish_done ------------------------------------------------------------------------


def test_done_transcript_beside_and_original_to_done(watch: WatchConfig) -> None:
    """sub/a.mp3 → sub/a.txt (UTF-8, one newline) and done/sub/a.mp3 with the same bytes."""
    job = claimed(watch, "sub/a.mp3")
    placed = finish_done(job, TEXT, watch)
    inbox = watch.path
    assert placed == Placed(original=inbox / "done/sub/a.mp3", transcript=inbox / "sub/a.txt")
    assert (inbox / "sub/a.txt").read_bytes() == (TEXT + "\n").encode("utf-8")
    assert (inbox / "done/sub/a.mp3").read_bytes() == AUDIO
    assert not job.path.exists()
    assert files_under(inbox) == ["done/sub/a.mp3", "sub/a.txt"]


def test_done_at_top_level(watch: WatchConfig) -> None:
    """A file dropped directly in the inbox: a.txt beside it, done/a.mp3."""
    job = claimed(watch, "a.mp3")
    placed = finish_done(job, "hi", watch)
    assert placed.transcript == watch.path / "a.txt"
    assert placed.original == watch.path / "done/a.mp3"
    assert files_under(watch.path) == ["a.txt", "done/a.mp3"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("one line", b"one line\n"),
        ("one line\n", b"one line\n"),
        ("trailing blank lines\n\n\n", b"trailing blank lines\n"),
        ("two\nlines", b"two\nlines\n"),
        ("", b"\n"),
    ],
)
def test_done_transcript_ends_with_exactly_one_newline(
    watch: WatchConfig, text: str, expected: bytes
) -> None:
    """Whatever the API returned, the file ends with exactly one newline."""
    placed = finish_done(claimed(watch, "a.wav"), text, watch)
    assert placed.transcript is not None
    assert placed.transcript.read_bytes() == expected


@pytest.mark.parametrize(
    "taken",
    [["a.txt"], ["done/a.mp3"], ["a.txt", "done/a.mp3"]],
    ids=["transcript taken", "done taken", "both taken"],
)
def test_done_collision_numbers_both(watch: WatchConfig, taken: list[str]) -> None:
    """A taken transcript or done name gives both files the stem ``a (1)``; nothing replaced."""
    inbox = watch.path
    for rel in taken:
        put(inbox / rel, b"already here")
    placed = finish_done(claimed(watch, "a.mp3"), TEXT, watch)
    assert placed.transcript == inbox / "a (1).txt"
    assert placed.original == inbox / "done/a (1).mp3"
    assert placed.original.read_bytes() == AUDIO
    for rel in taken:
        assert (inbox / rel).read_bytes() == b"already here"
    assert files_under(inbox) == sorted({*taken, "a (1).txt", "done/a (1).mp3"})


def test_done_collision_in_different_places_skips_to_a_free_stem(watch: WatchConfig) -> None:
    """a.txt and done/a (1).mp3 taken: the first stem free in both places is ``a (2)``."""
    inbox = watch.path
    put(inbox / "sub/a.txt", b"old a")
    put(inbox / "done/sub/a (1).mp3", b"old a1")
    placed = finish_done(claimed(watch, "sub/a.mp3"), TEXT, watch)
    assert placed.transcript == inbox / "sub/a (2).txt"
    assert placed.original == inbox / "done/sub/a (2).mp3"
    assert (inbox / "sub/a.txt").read_bytes() == b"old a"
    assert (inbox / "done/sub/a (1).mp3").read_bytes() == b"old a1"
    assert not (inbox / "sub/a (1).txt").exists()


def test_done_name_taken_between_look_and_write(watch: WatchConfig) -> None:
    """A transcript name taken just before the write is not overwritten; the next one is used."""
    inbox = watch.path
    planned: list[Path] = []

    def someone_else_takes_it(plan: Plan) -> None:
        assert plan.transcript is not None
        planned.append(plan.transcript)
        if len(planned) == 1:
            plan.transcript.parent.mkdir(parents=True, exist_ok=True)
            plan.transcript.write_bytes(b"another writer's file")

    placed = finish_done(claimed(watch, "a.mp3"), TEXT, watch, record=someone_else_takes_it)
    assert planned == [inbox / "a.txt", inbox / "a (1).txt"]
    assert (inbox / "a.txt").read_bytes() == b"another writer's file"
    assert placed.transcript == inbox / "a (1).txt"
    assert placed.original == inbox / "done/a (1).mp3"
    assert files_under(inbox) == ["a (1).txt", "a.txt", "done/a (1).mp3"]


def test_done_same_name_twice(watch: WatchConfig) -> None:
    """The same name dropped twice keeps both: a.txt/a.mp3 and a (1).txt/a (1).mp3."""
    first = finish_done(claimed(watch, "a.mp3", b"first"), "one", watch)
    second = finish_done(claimed(watch, "a.mp3", b"second"), "two", watch)
    assert (first.original.read_bytes(), second.original.read_bytes()) == (b"first", b"second")
    assert first.transcript is not None
    assert second.transcript is not None
    assert (first.transcript.read_text(), second.transcript.read_text()) == ("one\n", "two\n")
    assert second.original.name == "a (1).mp3"
    assert second.transcript.name == "a (1).txt"


def test_done_transcript_dir_override(tmp_path: Path) -> None:
    """transcript_dir puts sub/a.txt under it, keeping subfolders; collisions count there."""
    transcripts = tmp_path / "texts"
    watch = WatchConfig(path=tmp_path / "inbox", transcript_dir=transcripts)
    put(transcripts / "sub/a.txt", b"older")
    placed = finish_done(claimed(watch, "sub/a.mp3"), TEXT, watch)
    assert placed.transcript == transcripts / "sub/a (1).txt"
    assert placed.transcript.read_text(encoding="utf-8") == TEXT + "\n"
    assert placed.original == watch.path / "done/sub/a (1).mp3"
    assert (transcripts / "sub/a.txt").read_bytes() == b"older"
    assert not list(watch.path.glob("**/*.txt"))


def test_done_to_other_filesystem(tmp_path: Path, shm_dir: Path) -> None:
    """A done_dir on another file system gets a verified copy with the mtime; none stays."""
    watch = WatchConfig(path=tmp_path / "inbox", done_dir=shm_dir / "done")
    put(shm_dir / "done/sub/a.mp3", b"someone else's")
    job = claimed(watch, "sub/a.mp3")
    mtime = job.path.stat().st_mtime_ns
    placed = finish_done(job, TEXT, watch)
    assert placed.original == shm_dir / "done/sub/a (1).mp3"
    assert placed.original.read_bytes() == AUDIO
    assert placed.original.stat().st_mtime_ns == mtime
    assert placed.transcript == watch.path / "sub/a (1).txt"
    assert (shm_dir / "done/sub/a.mp3").read_bytes() == b"someone else's"
    assert not job.path.exists()
    assert files_under(shm_dir) == ["done/sub/a (1).mp3", "done/sub/a.mp3"]


def done_plan(watch: WatchConfig, stem: str, sub: str = "") -> Plan:
    """The plan an interrupted earlier finish recorded for ``<sub><stem>``."""
    return Plan(
        "done",
        original=watch.done_dir / sub / f"{stem}.mp3",
        transcript=watch.path / sub / f"{stem}.txt",
    )


def test_done_resume_keeps_existing_transcript(watch: WatchConfig) -> None:
    """A planned transcript already written (the crash came after it) is kept, not copied."""
    inbox = watch.path
    job = claimed(watch, "sub/a.mp3")
    earlier = put(inbox / "sub/a.txt", (TEXT + "\n").encode())
    placed = finish_done(job, TEXT, watch, plan=done_plan(watch, "a", "sub"))
    assert placed.transcript == earlier
    assert placed.original == inbox / "done/sub/a.mp3"
    assert placed.original.read_bytes() == AUDIO
    assert files_under(inbox) == ["done/sub/a.mp3", "sub/a.txt"]


def test_done_planned_name_taken_by_a_stranger_plans_again(watch: WatchConfig) -> None:
    """A planned transcript name holding someone else's file is left alone; a new plan is made."""
    inbox = watch.path
    job = claimed(watch, "a.mp3")
    stranger = put(inbox / "a.txt", b"not ours\n")
    recorded: list[Plan] = []
    placed = finish_done(job, TEXT, watch, plan=done_plan(watch, "a"), record=recorded.append)
    assert stranger.read_bytes() == b"not ours\n"
    assert [p.transcript for p in recorded] == [inbox / "a (1).txt"]
    assert placed.original == inbox / "done/a (1).mp3"
    assert files_under(inbox) == ["a (1).txt", "a.txt", "done/a (1).mp3"]


def test_done_resume_follows_numbered_transcript(watch: WatchConfig) -> None:
    """A resumed finish moves the original under the stem the earlier transcript got."""
    inbox = watch.path
    put(inbox / "a.txt", b"another file's transcript\n")
    job = claimed(watch, "a.mp3")
    put(inbox / "a (1).txt", b"ours\n")
    placed = finish_done(job, "ours", watch, plan=done_plan(watch, "a (1)"))
    assert placed.original == inbox / "done/a (1).mp3"
    assert files_under(inbox) == ["a (1).txt", "a.txt", "done/a (1).mp3"]


def test_done_resume_after_the_original_moved(watch: WatchConfig) -> None:
    """Killed after the move, before the ledger said done: the moved file is accepted."""
    inbox = watch.path
    job = claimed(watch, "a.mp3")
    put(inbox / "a.txt", (TEXT + "\n").encode())
    (inbox / "done").mkdir()
    job.path.rename(inbox / "done/a.mp3")
    placed = finish_done(job, TEXT, watch, plan=done_plan(watch, "a"))
    assert placed.original == inbox / "done/a.mp3"
    assert files_under(inbox) == ["a.txt", "done/a.mp3"]


def test_done_copy_across_file_systems_killed_before_unlink(tmp_path: Path, shm_dir: Path) -> None:
    """A verified copy already in done/ on another disk (kill before unlink): no ` (1)`."""
    watch = WatchConfig(path=tmp_path / "inbox", done_dir=shm_dir / "done")
    job = claimed(watch, "a.mp3")
    job = job.evolve(sha256=hashlib.sha256(AUDIO).hexdigest())
    put(shm_dir / "done/a.mp3", AUDIO)  # a different inode, the same bytes
    put(tmp_path / "inbox/a.txt", (TEXT + "\n").encode())
    plan = Plan("done", original=shm_dir / "done/a.mp3", transcript=tmp_path / "inbox/a.txt")
    placed = finish_done(job, TEXT, watch, plan=plan)
    assert placed.original == shm_dir / "done/a.mp3"
    assert not job.path.exists()
    assert files_under(shm_dir) == ["done/a.mp3"]


# --- finish_failed ----------------------------------------------------------------------

ERROR = {
    "reason": "bad_audio",
    "message": "the API rejected the file",
    "http_status": 400,
    "api_message": "Invalid audio: 无法解码",
    "trace_id": "trace-2",
}


def test_failed_moves_original_and_writes_error_json(watch: WatchConfig) -> None:
    """sub/a.mp3 → failed/sub/a.mp3 plus a.mp3.error.json with every promised field."""
    job = claimed(watch, "sub/a.mp3").evolve(attempts=3, trace_ids=("trace-1", "trace-2"))
    before = datetime.now().astimezone()
    placed = finish_failed(job, ERROR, watch)
    inbox = watch.path
    assert placed.original == inbox / "failed/sub/a.mp3"
    assert placed.error_file == inbox / "failed/sub/a.mp3.error.json"
    assert placed.transcript is None
    assert placed.original.read_bytes() == AUDIO
    assert not job.path.exists()
    record = json.loads(placed.error_file.read_bytes().decode("utf-8"))
    assert record["reason"] == "bad_audio"
    assert record["http_status"] == 400
    assert record["api_message"] == "Invalid audio: 无法解码"
    assert record["trace_id"] == "trace-2"
    assert record["attempts"] == 3
    assert record["file"] == "sub/a.mp3"
    when = datetime.fromisoformat(record["time"])
    assert when.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=2) <= when <= datetime.now().astimezone()
    assert files_under(inbox) == ["failed/sub/a.mp3", "failed/sub/a.mp3.error.json"]


@pytest.mark.parametrize(
    "taken",
    [["failed/a.mp3"], ["failed/a.mp3.error.json"], ["failed/a.mp3", "failed/a.mp3.error.json"]],
    ids=["audio taken", "error file taken", "both taken"],
)
def test_failed_collision_numbers_both(watch: WatchConfig, taken: list[str]) -> None:
    """A taken name in failed/ gives ``a (1).mp3`` and ``a (1).mp3.error.json``."""
    inbox = watch.path
    for rel in taken:
        put(inbox / rel, b"already here")
    placed = finish_failed(claimed(watch, "a.mp3"), ERROR, watch)
    assert placed.original == inbox / "failed/a (1).mp3"
    assert placed.error_file == inbox / "failed/a (1).mp3.error.json"
    assert placed.original.read_bytes() == AUDIO
    assert json.loads(placed.error_file.read_text(encoding="utf-8"))["reason"] == "bad_audio"
    for rel in taken:
        assert (inbox / rel).read_bytes() == b"already here"


def test_failed_dir_override_on_other_filesystem(tmp_path: Path, shm_dir: Path) -> None:
    """failed_dir on another file system gets the original (same bytes) and its error file."""
    watch = WatchConfig(path=tmp_path / "inbox", failed_dir=shm_dir / "failed")
    job = claimed(watch, "sub/a.mp3")
    placed = finish_failed(job, ERROR, watch)
    assert placed.original == shm_dir / "failed/sub/a.mp3"
    assert placed.original.read_bytes() == AUDIO
    assert not job.path.exists()
    assert files_under(shm_dir) == ["failed/sub/a.mp3", "failed/sub/a.mp3.error.json"]


def test_done_resume_after_crash_between_link_and_unlink(watch: WatchConfig) -> None:
    """Original already linked into done/ (crash before unlink): no second copy is made."""
    inbox = watch.path
    job = claimed(watch, "sub/a.mp3")
    earlier = put(inbox / "sub/a.txt", (TEXT + "\n").encode())
    (inbox / "done/sub").mkdir(parents=True)
    os.link(job.path, inbox / "done/sub/a.mp3")  # what the interrupted move had done
    placed = finish_done(job, TEXT, watch, plan=done_plan(watch, "a", "sub"))
    assert placed.transcript == earlier
    assert placed.original == inbox / "done/sub/a.mp3"
    assert placed.original.stat().st_nlink == 1
    assert not job.path.exists()
    assert files_under(inbox) == ["done/sub/a.mp3", "sub/a.txt"]


@pytest.mark.parametrize("linked_as", ["a.mp3", "a (1).mp3"])
def test_failed_resume_after_crash_between_link_and_unlink(
    watch: WatchConfig, linked_as: str
) -> None:
    """Error file written, original linked into failed/ (kill before unlink): completed as is."""
    fdir = watch.failed_dir / "sub"
    job = claimed(watch, "sub/a.mp3")
    if linked_as != "a.mp3":
        put(fdir / "a.mp3", b"an earlier failure of another file")
    recorded: list[Plan] = []
    with pytest.raises(_Stop):
        finish_failed(job, ERROR, watch, record=recorded.append, guard=_stop_before_move())
    os.link(job.path, fdir / linked_as)  # what the interrupted move had done
    placed = finish_failed(job, ERROR, watch, plan=recorded[0])
    assert placed.original == fdir / linked_as
    assert placed.error_file == fdir / f"{linked_as}.error.json"
    assert placed.original.stat().st_nlink == 1
    assert placed.original.read_bytes() == AUDIO
    assert not job.path.exists()
    expected = {linked_as, f"{linked_as}.error.json"}
    if linked_as != "a.mp3":
        expected.add("a.mp3")
        assert (fdir / "a.mp3").read_bytes() == b"an earlier failure of another file"
    assert files_under(fdir) == sorted(expected)


def test_failed_error_file_comes_before_the_original(watch: WatchConfig) -> None:
    """Stopped before the move, failed/ already holds the error file (never the reverse)."""
    job = claimed(watch, "a.mp3")
    with pytest.raises(_Stop):
        finish_failed(job, ERROR, watch, guard=_stop_before_move())
    assert files_under(watch.failed_dir) == ["a.mp3.error.json"]
    assert job.path.exists()


class _Stop(Exception):
    """Raised by a guard to stop finish between two steps."""


def _stop_before_move() -> Callable[[], None]:
    """A guard that lets the first step through and stops before the second."""
    calls: list[None] = []

    def guard() -> None:
        calls.append(None)
        if len(calls) == 2:
            raise _Stop

    return guard


# --- a file where a folder must be ------------------------------------------------------


@pytest.mark.parametrize("squat", ["done", "done/sub", "dangling-done"])
def test_done_under_a_squatted_folder_is_an_error_not_a_new_plan(
    watch: WatchConfig, squat: str
) -> None:
    """done/ (or done/sub) is a file or a dangling link: one plan, an OSError, nothing lost."""
    if squat == "dangling-done":
        (watch.path / "done").symlink_to(watch.path / "nowhere")
    else:
        put(watch.path / squat, b"not a folder")
    job = claimed(watch, "sub/a.mp3")
    plans: list[Plan] = []
    with pytest.raises(OSError) as raised:
        finish_done(job, TEXT, watch, record=plans.append)
    assert raised.value.errno in (errno.ENOTDIR, errno.ELOOP)
    assert len(plans) == 1, "a squatted folder is not a taken name: no new plans"
    assert job.path.read_bytes() == AUDIO, "the original waits in the work area"
    assert (watch.path / "sub/a.txt").read_bytes() == (TEXT + "\n").encode()
    # The squatter goes: the same plan is carried out, the transcript kept.
    squatter = watch.path / ("done" if squat == "dangling-done" else squat)
    squatter.unlink()
    placed = finish_done(job, TEXT, watch, plan=plans[0], record=plans.append)
    assert len(plans) == 1
    assert placed.original.read_bytes() == AUDIO
    assert files_under(watch.path / "sub") == ["a.txt"]
