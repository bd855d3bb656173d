"""settle: a file is ready only once it stopped changing for settle_seconds (promise 2)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import sfwatch.settle
from sfwatch.job import FileSignature
from sfwatch.settle import SettledFile, Settler, signature_of
from tests.conftest import wait_until

SETTLE = 3.0


class ManualClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass."""
        self.now += seconds


def fixed(seconds: float) -> Callable[[Path], float]:
    """A settle_seconds lookup that answers ``seconds`` for every watched folder."""
    return lambda _root: seconds


@pytest.fixture
def clock() -> ManualClock:
    """A manual clock."""
    return ManualClock()


@pytest.fixture
def settler(clock: ManualClock) -> Settler:
    """A Settler on the manual clock."""
    return Settler(clock=clock)


def ready_paths(settler: Settler, seconds: float = SETTLE) -> list[Path]:
    """The paths ``due()`` hands out now."""
    return [s.path for s in settler.due(fixed(seconds))]


def audio(tmp_path: Path, name: str = "a.mp3", data: bytes = b"x" * 100) -> Path:
    """A regular file in tmp_path."""
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_quiet_file_ready_only_after_settle_seconds(
    tmp_path: Path, settler: Settler, clock: ManualClock
) -> None:
    """An untouched file is handed out exactly once, no sooner than settle_seconds."""
    path = audio(tmp_path)
    assert settler.note(path, tmp_path, SETTLE)
    assert path in settler
    assert settler.next_due() == clock.now + SETTLE
    clock.advance(SETTLE - 0.01)
    assert ready_paths(settler) == []
    clock.advance(0.01)
    signature = signature_of(path)
    assert signature is not None
    assert settler.due(fixed(SETTLE)) == [SettledFile(path, tmp_path, signature)]
    assert len(settler) == 0
    assert settler.next_due() is None
    clock.advance(SETTLE)
    assert ready_paths(settler) == []


def test_change_seen_at_check_restarts_wait(
    tmp_path: Path, settler: Settler, clock: ManualClock
) -> None:
    """A size change found at the due check restarts the full wait from that check."""
    path = audio(tmp_path)
    settler.note(path, tmp_path, SETTLE)
    clock.advance(2.0)
    with path.open("ab") as f:
        f.write(b"more")
    clock.advance(1.0)
    assert ready_paths(settler) == []  # changed since noted: wait again
    clock.advance(SETTLE - 0.01)
    assert ready_paths(settler) == []
    clock.advance(0.01)
    ready = settler.due(fixed(SETTLE))
    assert [s.path for s in ready] == [path]
    assert ready[0].signature.size == 104


def test_change_noted_by_event_restarts_wait(
    tmp_path: Path, settler: Settler, clock: ManualClock
) -> None:
    """An event that finds the file changed restarts the wait from the event."""
    path = audio(tmp_path)
    settler.note(path, tmp_path, SETTLE)
    clock.advance(2.0)
    with path.open("ab") as f:
        f.write(b"more")
    assert settler.note(path, tmp_path, SETTLE)
    clock.advance(1.0)
    assert ready_paths(settler) == []  # the first due time is stale now
    assert settler.next_due() == clock.now + 2.0
    clock.advance(1.99)
    assert ready_paths(settler) == []
    clock.advance(0.01)
    assert ready_paths(settler) == [path]


def test_mtime_change_alone_restarts_wait(
    tmp_path: Path, settler: Settler, clock: ManualClock
) -> None:
    """Same size, new mtime (a rewrite in place) is a change."""
    path = audio(tmp_path)
    settler.note(path, tmp_path, SETTLE)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    clock.advance(SETTLE)
    assert ready_paths(settler) == []
    clock.advance(SETTLE)
    assert ready_paths(settler) == [path]


def test_inode_change_alone_restarts_wait(
    tmp_path: Path, settler: Settler, clock: ManualClock
) -> None:
    """A file replaced by another (same size and mtime, new inode) is a change."""
    path = audio(tmp_path)
    settler.note(path, tmp_path, SETTLE)
    before = signature_of(path)
    assert before is not None
    other = audio(tmp_path, ".a.mp3.tmp", b"y" * 100)
    os.utime(other, ns=(path.stat().st_atime_ns, before.mtime_ns))
    other.replace(path)
    after = signature_of(path)
    assert after is not None
    assert (after.size, after.mtime_ns) == (before.size, before.mtime_ns)
    assert after.inode != before.inode
    clock.advance(SETTLE)
    assert ready_paths(settler) == []
    clock.advance(SETTLE)
    ready = settler.due(fixed(SETTLE))
    assert [s.signature for s in ready] == [after]


def test_event_without_change_does_not_restart(
    tmp_path: Path, settler: Settler, clock: ManualClock
) -> None:
    """A close or attrib event on an unchanged file keeps the original due time."""
    path = audio(tmp_path)
    settler.note(path, tmp_path, SETTLE)
    for _ in range(5):
        clock.advance(0.5)
        assert settler.note(path, tmp_path, SETTLE)
    clock.advance(0.5)  # SETTLE after the first note, 0.5 s after the last event
    assert ready_paths(settler) == [path]


def test_file_deleted_while_settling_is_dropped(
    tmp_path: Path, settler: Settler, clock: ManualClock
) -> None:
    """A file removed before its check is forgotten, not handed out."""
    path = audio(tmp_path)
    settler.note(path, tmp_path, SETTLE)
    path.unlink()
    clock.advance(SETTLE)
    assert ready_paths(settler) == []
    assert len(settler) == 0
    assert settler.next_due() is None


def test_file_replaced_by_symlink_while_settling_is_dropped(
    tmp_path: Path, settler: Settler, clock: ManualClock
) -> None:
    """A pending name that becomes a symlink is no longer a regular file: dropped."""
    path = audio(tmp_path)
    target = audio(tmp_path, "elsewhere.bin")
    settler.note(path, tmp_path, SETTLE)
    path.unlink()
    path.symlink_to(target)
    clock.advance(SETTLE)
    assert ready_paths(settler) == []
    assert path not in settler


@pytest.mark.parametrize("kind", ["directory", "symlink to a file", "fifo", "missing"])
def test_only_regular_files_are_noted(
    tmp_path: Path, settler: Settler, clock: ManualClock, kind: str
) -> None:
    """note() refuses anything but a regular file and does not track it."""
    path = tmp_path / "a.mp3"
    if kind == "directory":
        path.mkdir()
    elif kind == "symlink to a file":
        path.symlink_to(audio(tmp_path, "real.mp3"))
    elif kind == "fifo":
        os.mkfifo(path)
    assert settler.note(path, tmp_path, SETTLE) is False
    assert path not in settler
    clock.advance(SETTLE)
    assert ready_paths(settler) == []


def test_pending_file_becoming_a_directory_is_forgotten_on_note(
    tmp_path: Path, settler: Settler
) -> None:
    """A new event for a pending name that is now a folder drops the name."""
    path = audio(tmp_path)
    settler.note(path, tmp_path, SETTLE)
    path.unlink()
    path.mkdir()
    assert settler.note(path, tmp_path, SETTLE) is False
    assert path not in settler


def test_forget_drops_a_pending_file(tmp_path: Path, settler: Settler, clock: ManualClock) -> None:
    """forget() stops tracking a file; its due time passes without a result."""
    path = audio(tmp_path)
    settler.note(path, tmp_path, SETTLE)
    settler.forget(path)
    assert settler.next_due() is None
    clock.advance(SETTLE)
    assert ready_paths(settler) == []


def test_settle_seconds_per_root(tmp_path: Path, settler: Settler, clock: ManualClock) -> None:
    """A restarted wait uses the settle_seconds of the file's own watched folder."""
    fast_root, slow_root = tmp_path / "fast", tmp_path / "slow"
    fast_root.mkdir()
    slow_root.mkdir()
    fast, slow = audio(fast_root), audio(slow_root)
    settler.note(fast, fast_root, 1.0)
    settler.note(slow, slow_root, 5.0)
    seconds = {fast_root: 1.0, slow_root: 5.0}
    clock.advance(1.0)
    assert [s.path for s in settler.due(seconds.__getitem__)] == [fast]
    clock.advance(4.0)
    ready = settler.due(seconds.__getitem__)
    assert [(s.path, s.root) for s in ready] == [(slow, slow_root)]


def test_thousand_files_cost_one_check_each(
    tmp_path: Path, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,000 pending files: no stat before their due time, exactly one each at it."""
    calls = 0
    real = sfwatch.settle.signature_of

    def counting(path: Path, st: os.stat_result | None = None) -> FileSignature | None:
        nonlocal calls
        calls += 1
        return real(path, st)

    monkeypatch.setattr(sfwatch.settle, "signature_of", counting)
    settler = Settler(clock=clock)
    start = clock.now
    paths = []
    for i in range(1000):
        path = audio(tmp_path, f"f{i:04}.mp3")
        paths.append(path)
        clock.now = start + i / 1000  # noted over one second
        settler.note(path, tmp_path, SETTLE)
    assert calls == 1000  # one stat per note
    calls = 0
    for step in (0.5, 1.0, 2.0, 2.99):
        clock.now = start + step
        assert ready_paths(settler) == []
    assert calls == 0  # nothing was due: nothing looked at
    clock.now = start + SETTLE + 0.4995  # the first 500 are due
    first = ready_paths(settler)
    assert first == paths[:500]
    assert calls == 500
    clock.now = start + SETTLE + 1.0
    second = ready_paths(settler)
    assert second == paths[500:]
    assert calls == 1000
    assert ready_paths(settler) == []
    assert calls == 1000
    assert len(settler) == 0


def test_real_clock_slow_writer_not_ready_until_it_stops(tmp_path: Path) -> None:
    """With the real clock, a writer pausing 0.2 s between chunks is not ready until done."""
    settle = 0.5
    chunk = b"z" * 4096
    chunks = 7
    path = tmp_path / "slow.wav"
    path.write_bytes(chunk)
    last_write = time.monotonic()
    finished = threading.Event()

    def writer() -> None:
        nonlocal last_write
        with path.open("ab") as f:
            for _ in range(chunks - 1):
                time.sleep(0.2)  # the pause between chunks is the scenario
                f.write(chunk)
                f.flush()
                last_write = time.monotonic()
        finished.set()

    settler = Settler()
    settler.note(path, tmp_path, settle)
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        ready: list[SettledFile] = wait_until(
            lambda: settler.due(fixed(settle)), timeout=10, message="the file to settle"
        )
        ready_at = time.monotonic()
    finally:
        thread.join(10)
    assert finished.is_set(), "handed out while the writer was still writing"
    assert [s.path for s in ready] == [path]
    assert ready[0].signature.size == len(chunk) * chunks
    assert ready_at - last_write >= settle - 0.05
