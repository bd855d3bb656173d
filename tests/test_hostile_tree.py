"""Hostile trees: a plain file where a folder must be, and folders nested a thousand deep.

Each case runs a real daemon in a thread of this process (so its CPU time can be
measured with ``os.times``) against the fake API, on real folders. A squatted
``done``/``failed``/subfolder makes the finish wait with backoff, logged once, the
original safe in the work area, until the squatter goes; a tree deeper than
``MAX_DEPTH`` is not looked into, and neither it nor a dead inotify reader stops
events from flowing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from sfwatch.inotify import InotifyTree
from sfwatch.watch import MAX_DEPTH, Watcher
from tests.audiogen import wav_bytes
from tests.conftest import Running, running_daemon, wait_until, write_config
from tests.fakeapi import R400_DATA_STRING, FakeAPI
from tests.test_admin import Setup

FAST = {"backoff_base": 0.05}
#: deeper than Python's default recursion limit (1,000), as the tester's tree was
DEEP = 1100
Logs = list[MutableMapping[str, Any]]


def _events(logs: Logs, name: str) -> Logs:
    return [e for e in logs if e["event"] == name]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _claimed(inbox: Path, name: str) -> list[Path]:
    return [p for p in (inbox / ".sfwatch" / "work").rglob(name) if p.is_file()]


def _cpu_seconds() -> float:
    """CPU time used so far by this process: every thread of the in-process daemon."""
    times = os.times()
    return times.user + times.system


def _retries_without_spinning(logs: Logs) -> Logs:
    """Wait for >= 2 s and >= 3 tries of a failing finish; the process stays nearly idle."""
    wait_until(lambda: _events(logs, "sfwatch.finish_failed"), 15, "a failed finish")
    cpu, start = _cpu_seconds(), time.monotonic()
    wait_until(
        lambda: time.monotonic() - start >= 2 and len(_events(logs, "sfwatch.finish_failed")) >= 3,
        20,
        "the finish tried again with backoff",
    )
    share = (_cpu_seconds() - cpu) / (time.monotonic() - start)
    assert share < 0.3, f"the daemon used {share:.0%} of a CPU while waiting"
    failures = _events(logs, "sfwatch.finish_failed")
    assert [e["failures"] for e in failures] == list(range(1, len(failures) + 1)), "backoff"
    assert [e["log_level"] for e in failures].count("error") == 1, "one error line per problem"
    assert "is not a folder" in failures[0]["error"]
    return failures


# --- a plain file where a folder must be ------------------------------------------------


SQUATS = {
    # case: (squatter, dropped file, the API rejects it, where it ends)
    "done": ("done", "a.wav", False, "done/a.wav"),
    "failed": ("failed", "a.wav", True, "failed/a.wav"),
    "done-subfolder": ("done/sub", "sub/a.wav", False, "done/sub/a.wav"),
}


@pytest.mark.parametrize("case", SQUATS)
def test_squatted_folder_waits_with_backoff_then_finishes(
    case: str, tmp_path: Path, fake_api: FakeAPI
) -> None:
    """A file where done/, failed/ or done/sub must be: backoff, no spin; removed → finished."""
    squat, rel, rejected, final = SQUATS[case]
    if rejected:
        fake_api.responder = lambda _upload: R400_DATA_STRING
    config = write_config(tmp_path, fake_api.url)
    inbox = tmp_path / "inbox"
    squatter = inbox / squat
    squatter.parent.mkdir(parents=True, exist_ok=True)
    squatter.write_text("not a folder")
    data = wav_bytes(1500)
    source = inbox / rel
    source.parent.mkdir(parents=True, exist_ok=True)
    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        source.write_bytes(data)
        failures = _retries_without_spinning(logs)
        assert all(e["file"] == str(source) for e in failures)
        (claimed,) = _claimed(inbox, "a.wav")
        assert claimed.read_bytes() == data, "the original waits, whole, in the work area"
        assert squatter.read_text() == "not a folder", "the squatter is left alone"
        squatter.unlink()
        wait_until((inbox / final).exists, 15, f"{final} once the squatter is gone")
        assert daemon.daemon.healthy()
    assert (inbox / final).read_bytes() == data
    assert not _claimed(inbox, "a.wav")
    assert len(fake_api.uploads) == 1, "uploaded once: only the finish was retried"
    (finished,) = _events(logs, "sfwatch.job_finished")
    assert finished["outcome"] == ("failed" if rejected else "done")
    transcript = source.with_suffix(".txt")
    if rejected:
        error = json.loads((inbox / f"{final}.error.json").read_text(encoding="utf-8"))
        assert error["reason"] == "api_rejected"
        assert not transcript.exists()
    else:
        expected = FakeAPI.text_for(_sha(data)) + "\n"
        assert transcript.read_text(encoding="utf-8") == expected
        assert not list(inbox.rglob("* (1).*")), "no second transcript or copy"
    assert not list(inbox.rglob("*.sfwatch-tmp"))


def test_retry_into_a_squatted_subfolder_fails_at_once(tmp_path: Path, fake_api: FakeAPI) -> None:
    """``sfwatch retry`` whose inbox subfolder is a file: skipped at once (it used to spin)."""
    setup = Setup(tmp_path, fake_api.url)
    setup.fail_by_hand("sub/a.wav", wav_bytes(900))
    (setup.inbox / "sub").rmdir()
    (setup.inbox / "sub").write_text("not a folder")
    started = time.monotonic()
    status, out, err = setup.retry("--all")
    assert out == ["nothing retried"]
    assert time.monotonic() - started < 30
    assert status == 0, "skipped with its reason, like any file it may not move"
    assert "sub is not a folder" in err
    assert (setup.failed / "sub" / "a.wav").exists(), "the original stays in failed/"
    (setup.inbox / "sub").unlink()
    status, _, _ = setup.retry("--all")
    assert status == 0
    assert (setup.inbox / "sub" / "a.wav").exists()


# --- deep trees ---------------------------------------------------------------------------


def _deep_tree(top: Path, levels: int, name: str, data: bytes) -> Path:
    """``top/d/d/…/d/name``, ``levels`` folders below ``top``; return the file's path.

    Made one level at a time relative to an open folder, as a hostile writer would.
    """
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
        with os.fdopen(out, "wb") as f:
            f.write(data)
    finally:
        os.close(fd)
    return top.joinpath(*["d"] * levels, name)


@pytest.fixture
def deep_tree(tmp_path: Path) -> Iterator[tuple[Path, Path, bytes]]:
    """A DEEP-level tree outside the inbox with deep.wav at the bottom: (top, file, bytes).

    Removed with ``rm -rf`` afterwards: pytest's own clean-up (shutil.rmtree)
    recurses once per level and would fail on it.
    """
    top = tmp_path / "tree"
    data = wav_bytes(700)
    deep_file = _deep_tree(top, DEEP, "deep.wav", data)
    yield top, deep_file, data
    for folder in (top, tmp_path / "inbox" / top.name):
        subprocess.run(["rm", "-rf", str(folder)], check=True)


def _rescan(daemon: Running, logs: Logs) -> None:
    """Ask for a rescan and wait until it has finished."""
    before = len(_events(logs, "sfwatch.scan_finished"))
    daemon.daemon.notes.rescan_requested.set()
    wait_until(lambda: len(_events(logs, "sfwatch.scan_finished")) > before, 15, "a rescan")


def _arrives_by_events(daemon: Running, name: str = "after.wav") -> None:
    """A file dropped now is done within a few seconds, with no rescan due for an hour."""
    data = wav_bytes(2345)
    (daemon.inbox / name).write_bytes(data)
    wait_until((daemon.inbox / "done" / name).exists, 5, f"{name} found by its events")
    assert (daemon.inbox / "done" / name).read_bytes() == data


@pytest.mark.parametrize("poll", [False, True], ids=["inotify", "polling"])
@pytest.mark.parametrize("when", ["moved-in", "at-start"])
def test_deep_tree_is_skipped_once_and_events_keep_flowing(
    poll: bool, when: str, tmp_path: Path, fake_api: FakeAPI, deep_tree: tuple[Path, Path, bytes]
) -> None:
    """A 1,100-level tree (moved in, or there at start): too_deep once, no loop_error, events."""
    top, deep_file, data = deep_tree
    config = write_config(tmp_path, fake_api.url, watch={"rescan_seconds": 3600, "poll": poll})
    moved = tmp_path / "inbox" / top.name
    if when == "at-start":
        top.rename(moved)
    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        wait_until(daemon.daemon.intake.scan_done.is_set, 10, "the start-up scan")
        if when == "moved-in":
            top.rename(moved)
        cut = moved.joinpath(*["d"] * MAX_DEPTH)  # the first folder not looked into
        wait_until(lambda: _events(logs, "sfwatch.file_skipped"), 10, "the tree looked at")
        _rescan(daemon, logs)
        _rescan(daemon, logs)
        assert daemon.daemon.healthy()
        watcher = daemon.daemon.intake.watchers[daemon.inbox]
        assert watcher.alive()
        _arrives_by_events(daemon)
    (skipped,) = _events(logs, "sfwatch.file_skipped")
    assert skipped["reason"] == "too_deep"
    assert skipped["file"] == str(cut)
    assert not _events(logs, "sfwatch.loop_error")
    assert not _events(logs, "sfwatch.watch_died")
    moved_file = moved / deep_file.relative_to(top)
    assert moved_file.read_bytes() == data, "left where it is"
    assert [u.filename for u in fake_api.uploads] == ["after.wav"]


def test_file_at_the_depth_limit_is_taken(tmp_path: Path, fake_api: FakeAPI) -> None:
    """A file MAX_DEPTH folders down is transcribed; one a level deeper is skipped."""
    config = write_config(tmp_path, fake_api.url)
    levels = ["d"] * MAX_DEPTH
    data = wav_bytes(1200)
    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        folder = daemon.inbox.joinpath(*levels)
        (folder / "x").mkdir(parents=True)
        (folder / "x" / "deeper.wav").write_bytes(data)
        (folder / "ok.wav").write_bytes(data)
        wait_until((daemon.inbox / "done").joinpath(*levels, "ok.wav").exists, 15, "ok.wav")
        wait_until(lambda: _events(logs, "sfwatch.file_skipped"), 10, "deeper.wav skipped")
    assert (folder / "ok.txt").exists()
    (skipped,) = _events(logs, "sfwatch.file_skipped")
    assert (skipped["file"], skipped["reason"]) == (str(folder / "x"), "too_deep")
    assert (folder / "x" / "deeper.wav").read_bytes() == data
    assert [u.filename for u in fake_api.uploads] == ["ok.wav"]


# --- a dead inotify reader ------------------------------------------------------------


@pytest.fixture
def reader_dies_on_boom(monkeypatch: pytest.MonkeyPatch) -> None:
    """The inotify reader thread ends on an exception: RecursionError watching a folder "boom"."""
    original: Callable[[InotifyTree, str, int], None] = InotifyTree._add_tree

    def add_tree(tree: InotifyTree, path: str, level: int) -> None:
        if path.endswith("/boom"):
            raise RecursionError("maximum recursion depth exceeded (simulated)")
        original(tree, path, level)

    monkeypatch.setattr(InotifyTree, "_add_tree", add_tree)


@pytest.mark.usefixtures("reader_dies_on_boom")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dead_inotify_reader_is_restarted(tmp_path: Path, fake_api: FakeAPI) -> None:
    """The reader thread dies: watch_died, a restart, a rescan, and events flow again."""
    config = write_config(tmp_path, fake_api.url, watch={"rescan_seconds": 3600})
    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        intake = daemon.daemon.intake
        wait_until(intake.scan_done.is_set, 10, "the start-up scan")
        first = intake.watchers[daemon.inbox]
        (daemon.inbox / "boom").mkdir()
        (died,) = wait_until(lambda: _events(logs, "sfwatch.watch_died"), 10, "watch_died")
        assert died["path"] == str(daemon.inbox)
        assert "RecursionError" in died["error"]
        assert first.alive() is False, "the old reader has ended"
        wait_until(lambda: len(_events(logs, "sfwatch.scan_finished")) >= 2, 10, "a rescan")
        assert intake.watchers[daemon.inbox] is not first
        assert daemon.daemon.healthy()
        _arrives_by_events(daemon)
    assert not _events(logs, "sfwatch.loop_error")


@pytest.mark.usefixtures("reader_dies_on_boom")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dead_reader_that_cannot_be_restarted_is_unhealthy(
    tmp_path: Path, fake_api: FakeAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the observer cannot be started again, healthy() turns false (systemd restarts us)."""
    config = write_config(tmp_path, fake_api.url, watch={"rescan_seconds": 3600})
    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        wait_until(daemon.daemon.intake.scan_done.is_set, 10, "the start-up scan")
        assert daemon.daemon.healthy()

        def cannot_start(_watcher: Watcher) -> None:
            raise OSError(24, "Too many open files")

        monkeypatch.setattr(Watcher, "start", cannot_start)
        (daemon.inbox / "boom").mkdir()
        wait_until(lambda: _events(logs, "sfwatch.watch_restart_failed"), 10, "restart failed")
        assert not daemon.daemon.healthy()
        assert daemon.thread.is_alive(), "the daemon itself carries on"
    assert len(_events(logs, "sfwatch.watch_died")) == 1
