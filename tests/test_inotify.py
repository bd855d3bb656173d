"""inotify: our recursive watch, checked against the kernel's own list of watches.

``/proc/self/fdinfo/<fd>`` of an inotify descriptor lists the inode of every folder
it watches, so these tests assert on what the kernel watches, not on our maps.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from sfwatch.config import WatchConfig
from sfwatch.inotify import InotifyTree
from sfwatch.watch import MAX_DEPTH, PathNotes, Watcher
from sfwatch.workers import Share
from tests.conftest import wait_until
from tests.test_watch import Collector, start_watcher


def watched_inodes(watcher: Watcher | InotifyTree) -> set[int]:
    """The inodes the kernel watches for this watcher's (or tree's) inotify instance."""
    tree = watcher if isinstance(watcher, InotifyTree) else watcher.observer
    assert isinstance(tree, InotifyTree)
    info = Path(f"/proc/self/fdinfo/{tree.fileno()}").read_text(encoding="ascii")
    fields = (line.split() for line in info.splitlines() if line.startswith("inotify wd:"))
    return {int(f.split(":")[1], 16) for line in fields for f in line if f.startswith("ino:")}


def ino(path: Path) -> int:
    """The inode of ``path`` (not following a link)."""
    return path.lstat().st_ino


def settled(seen: Collector, inbox: Path, name: str = "sentinel.mp3") -> None:
    """Write a file in the inbox and wait for it: every earlier event has been handled."""
    sentinel = inbox / name
    sentinel.write_bytes(b"x")
    wait_until(lambda: seen.has(sentinel), 5, f"{name} noted")


@pytest.fixture
def tree_watch(tmp_path: Path) -> Iterator[tuple[Watcher, Collector]]:
    """A started inotify Watcher on an inbox holding our folders, litter, a link and work."""
    watch = WatchConfig(path=tmp_path / "inbox", poll=False)
    inbox = watch.path
    for rel in (".sfwatch/work/inst/job", "done/sub", "failed", "@eaDir", ".sync", "a/b"):
        (inbox / rel).mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (inbox / "link").symlink_to(tmp_path / "elsewhere")
    with start_watcher(watch) as started:
        yield started


def test_watches_exactly_the_folders_a_scan_enters(tree_watch: tuple[Watcher, Collector]) -> None:
    """The inbox and its folders are watched; our folders, litter and links are not."""
    watcher, _ = tree_watch
    inbox = watcher.watch.path
    wanted = {ino(inbox), ino(inbox / "a"), ino(inbox / "a" / "b")}
    assert watched_inodes(watcher) == wanted


def test_folder_made_later_is_watched_and_ours_are_not(
    tree_watch: tuple[Watcher, Collector],
) -> None:
    """mkdir -p of a new folder watches it all the way down; a new done/ folder is not."""
    watcher, seen = tree_watch
    inbox = watcher.watch.path
    (inbox / "new" / "deeper").mkdir(parents=True)
    (inbox / "done" / "other").mkdir()
    # noted once its watches are in place: intake walks it for files made before
    wait_until(lambda: seen.has(inbox / "new"), 5, "the new folder noted")
    (inbox / "new" / "deeper" / "x.wav").write_bytes(b"x")
    wait_until(lambda: seen.has(inbox / "new" / "deeper" / "x.wav"), 5, "x.wav noted")
    assert ino(inbox / "new" / "deeper") in watched_inodes(watcher)
    assert ino(inbox / "done" / "other") not in watched_inodes(watcher)


def test_folder_moved_in_is_noted_and_watched(
    tmp_path: Path, tree_watch: tuple[Watcher, Collector]
) -> None:
    """A folder moved in is noted, and so is every file it brought that could be taken;
    its subfolders get watches."""
    watcher, seen = tree_watch
    inbox = watcher.watch.path
    (tmp_path / "outside" / "nested").mkdir(parents=True)
    (tmp_path / "outside" / "nested" / "old.wav").write_bytes(b"x")
    (tmp_path / "outside" / "nested" / "old.txt").write_text("a transcript")
    (tmp_path / "outside").rename(inbox / "moved")
    wait_until(lambda: seen.has(inbox / "moved"), 5, "the folder noted")
    wait_until(lambda: seen.has(inbox / "moved" / "nested" / "old.wav"), 5, "old.wav noted")
    assert str(inbox / "moved" / "nested" / "old.txt") not in seen.seen
    (inbox / "moved" / "nested" / "new.wav").write_bytes(b"x")
    wait_until(lambda: seen.has(inbox / "moved" / "nested" / "new.wav"), 5, "new.wav noted")


def test_files_that_are_never_taken_are_not_noted_but_folders_are(
    tree_watch: tuple[Watcher, Collector],
) -> None:
    """Our transcript and temp names make no note (the loop would lstat them for
    nothing); a folder of such a name still does, and an audio file."""
    watcher, seen = tree_watch
    inbox = watcher.watch.path
    (inbox / "talk.txt").write_text("a transcript")
    (inbox / ".talk.txt.0123abcd.sfwatch-tmp").write_text("being written")
    (inbox / "odd.txt").mkdir()
    settled(seen, inbox)  # every earlier event has been handled
    assert seen.has(inbox / "odd.txt"), "a folder is noted whatever its name"
    assert not seen.has(inbox / "talk.txt")
    assert not seen.has(inbox / ".talk.txt.0123abcd.sfwatch-tmp")


def test_another_worker_s_files_are_not_noted_but_every_folder_is(tmp_path: Path) -> None:
    """With ``owns`` (workers: N), a file of another worker's share makes no note, here or
    in a folder moved in; a folder does whoever's its path is, and one's own files do."""
    watch = WatchConfig(path=tmp_path / "inbox", poll=False)
    watch.path.mkdir()
    share = Share(0, 2)
    notes = PathNotes()
    watcher = Watcher(watch, notes, share.owns)
    seen = Collector(notes)
    inbox = watch.path
    mine = [n for n in (f"r{i}.wav" for i in range(40)) if share.owns(inbox / n)][:3]
    theirs = [n for n in (f"r{i}.wav" for i in range(40)) if not share.owns(inbox / n)][:3]
    (tmp_path / "outside").mkdir()
    folder = inbox / next(f"d{i}.wav" for i in range(40) if not share.owns(inbox / f"d{i}.wav"))
    names = [f"x{i}.wav" for i in range(40)]
    inner_mine = next(n for n in names if share.owns(folder / n))
    inner_theirs = next(n for n in names if not share.owns(folder / n))
    watcher.start()
    try:
        for name in mine + theirs:
            (inbox / name).write_bytes(b"x")
        for name in (inner_mine, inner_theirs):
            (tmp_path / "outside" / name).write_bytes(b"x")
        (tmp_path / "outside").rename(folder)  # a folder whose path is not ours
        wait_until(lambda: seen.has(folder), 5, "the folder noted")
        wait_until(lambda: seen.has(folder / inner_mine), 5, "our file in it noted")
        settled(
            seen, inbox, next(n for n in (f"s{i}.mp3" for i in range(40)) if share.owns(inbox / n))
        )
        assert all(seen.has(inbox / name) for name in mine)
        assert not any(seen.has(inbox / name) for name in theirs)
        assert not seen.has(folder / inner_theirs)
    finally:
        watcher.stop()


def test_folder_moved_out_is_forgotten(
    tmp_path: Path, tree_watch: tuple[Watcher, Collector]
) -> None:
    """A folder moved out of the inbox loses its watches; writes there are not noted."""
    watcher, seen = tree_watch
    inbox = watcher.watch.path
    gone = inbox / "a"
    inodes = {ino(gone), ino(gone / "b")}
    gone.rename(tmp_path / "away")
    (tmp_path / "away" / "b" / "late.wav").write_bytes(b"x")
    settled(seen, inbox)
    assert not [p for p in seen.seen if "late.wav" in p]
    assert not inodes & watched_inodes(watcher)


def test_folder_renamed_inside_reports_new_paths(tree_watch: tuple[Watcher, Collector]) -> None:
    """A folder renamed within the inbox: its files are noted under the new name only."""
    watcher, seen = tree_watch
    inbox = watcher.watch.path
    (inbox / "a").rename(inbox / "c")
    (inbox / "c" / "b" / "y.wav").write_bytes(b"x")
    wait_until(lambda: seen.has(inbox / "c" / "b" / "y.wav"), 5, "y.wav under its new path")
    settled(seen, inbox)
    assert str(inbox / "a" / "b" / "y.wav") not in seen.seen
    assert ino(inbox / "c" / "b") in watched_inodes(watcher)


def test_folder_moved_into_done_is_forgotten(tree_watch: tuple[Watcher, Collector]) -> None:
    """A folder a user moves into done/ is no longer watched: done/ is never looked into."""
    watcher, seen = tree_watch
    inbox = watcher.watch.path
    (inbox / "a").rename(inbox / "done" / "a")
    (inbox / "done" / "a" / "b" / "z.wav").write_bytes(b"x")
    settled(seen, inbox)
    assert not [p for p in seen.seen if p.endswith("z.wav")]
    assert watched_inodes(watcher) == {ino(inbox)}


def test_watches_stop_at_max_depth(tmp_path: Path) -> None:
    """A tree deeper than MAX_DEPTH has watches on MAX_DEPTH levels below the inbox, no more."""
    watch = WatchConfig(path=tmp_path / "inbox", poll=False)
    watch.path.joinpath(*["d"] * (MAX_DEPTH + 3)).mkdir(parents=True)
    with start_watcher(watch) as (watcher, _):
        assert len(watched_inodes(watcher)) == MAX_DEPTH + 1


def test_not_recursive_watches_the_folder_alone(tmp_path: Path) -> None:
    """recursive: false watches the inbox only."""
    watch = WatchConfig(path=tmp_path / "inbox", poll=False, recursive=False)
    (watch.path / "sub").mkdir(parents=True)
    with start_watcher(watch) as (watcher, _):
        assert watched_inodes(watcher) == {ino(watch.path)}


def test_deleting_the_watched_folder_ends_the_reader(tmp_path: Path) -> None:
    """The inbox removed: the reader ends without an error (intake restarts the watch)."""
    watch = WatchConfig(path=tmp_path / "inbox", poll=False)
    (watch.path / "sub").mkdir(parents=True)
    with start_watcher(watch) as (watcher, _):
        shutil.rmtree(watch.path)
        wait_until(lambda: not watcher.alive(), 5, "the reader ended")
        assert watcher.failure() is None


def test_queue_overflow_asks_for_a_rescan(tmp_path: Path) -> None:
    """A real overflow (the reader held while 3 events a file pile up) requests a rescan."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text(encoding="ascii"))
    if limit > 100_000:
        pytest.skip(f"max_queued_events is {limit}: too many files to write")
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    release, held, rescans = threading.Event(), threading.Event(), []
    notes = PathNotes()

    def note(path: str) -> None:
        held.set()
        release.wait(30)
        notes.note(path)

    tree = InotifyTree(
        str(inbox),
        enters=lambda _path, _level: True,
        note=note,
        overflowed=lambda: rescans.append(1),
    )
    tree.start()
    try:
        (inbox / "first.wav").write_bytes(b"x")
        wait_until(held.is_set, 5, "the reader holds in note()")
        for i in range(limit // 3 + 100):  # create + modify + close_write each
            (inbox / f"f{i}.wav").write_bytes(b"x")
        (inbox / "sub").rename(tmp_path / "away")  # its MOVED_FROM is lost in the overflow
        (inbox / "new").mkdir()  # and so is this CREATE
        with capture_logs() as logs:
            release.set()
            wait_until(lambda: rescans, 10, "a rescan requested")
        assert [e["event"] for e in logs].count("sfwatch.events_overflowed") == 1
        assert tree.is_alive()
        # the watches were rebuilt from what is there now, not patched
        wait_until(lambda: watched_inodes(tree) == {ino(inbox), ino(inbox / "new")}, 10, "rebuilt")
    finally:
        release.set()
        tree.stop()


LIMIT_SCRIPT = """
import json, sys, time
from structlog.testing import capture_logs
from sfwatch.inotify import InotifyTree
noted = []
with capture_logs() as logs:
    tree = InotifyTree(sys.argv[1], enters=lambda p, l: True, note=noted.append,
                       overflowed=lambda: None)
    tree.start()
    open(sys.argv[1] + "/root.wav", "wb").close()
    deadline = time.monotonic() + 5
    while sys.argv[1] + "/root.wav" not in noted and time.monotonic() < deadline:
        time.sleep(0.01)
    alive = tree.is_alive()
    tree.stop()
print(json.dumps({"noted": noted, "alive": alive, "events": [e["event"] for e in logs]}))
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_watch_limit_is_logged_once_and_the_rest_still_works(tmp_path: Path) -> None:
    """ENOSPC (fs.inotify.max_user_watches) injected from the 3rd watch: one warning, events."""
    inbox = tmp_path / "inbox"
    for i in range(5):
        (inbox / f"sub{i}").mkdir(parents=True)
    strace = ["strace", "-f", "-qq", "-o", os.devnull, "-e", "trace=inotify_add_watch"]
    inject = ["-e", "inject=inotify_add_watch:error=ENOSPC:when=3+"]
    run = subprocess.run(
        [*strace, *inject, sys.executable, "-c", LIMIT_SCRIPT, str(inbox)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["events"] == ["sfwatch.watch_limit_reached"]
    assert str(inbox / "root.wav") in result["noted"]
    assert result["alive"]


def _inotify_fds() -> set[int]:
    """This process's open inotify descriptors."""
    found = set()
    for entry in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            if str(entry.readlink()) == "anon_inode:inotify":
                found.add(int(entry.name))
    return found


def test_a_failed_start_leaves_no_descriptor_open(tmp_path: Path) -> None:
    """A folder that cannot be watched (a file stands there): OSError, and no fd is left."""
    squatter = tmp_path / "inbox"
    squatter.write_bytes(b"not a folder")
    before = _inotify_fds()
    for _ in range(20):  # intake retries like this for as long as the squatter stays
        tree = InotifyTree(
            str(squatter), enters=lambda _p, _l: True, note=print, overflowed=lambda: None
        )
        with pytest.raises(NotADirectoryError):
            tree.start()
    # (inotify descriptors only: an earlier test's leftovers in this process may close
    # theirs meanwhile, when the garbage collector gets to them)
    assert _inotify_fds() <= before


def test_renamed_folder_keeps_a_watch_when_the_reader_is_behind(tmp_path: Path) -> None:
    """mkdir x; mv x y; mkdir x, all read late: both y and the new x end up watched."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    release, held = threading.Event(), threading.Event()
    notes = PathNotes()
    seen = Collector(notes)

    def note(path: str) -> None:
        held.set()
        release.wait(30)
        notes.note(path)

    tree = InotifyTree(str(inbox), enters=lambda _p, _l: True, note=note, overflowed=lambda: None)
    tree.start()
    try:
        (inbox / "first.wav").write_bytes(b"x")
        wait_until(held.is_set, 5, "the reader holds in note()")
        (inbox / "x").mkdir()
        (inbox / "x").rename(inbox / "y")
        (inbox / "x").mkdir()
        release.set()
        wait_until(lambda: seen.has(inbox / "x") and seen.has(inbox / "y"), 5, "both noted")
        wait_until(
            lambda: watched_inodes(tree) == {ino(inbox), ino(inbox / "x"), ino(inbox / "y")},
            5,
            "x and y watched",
        )
        (inbox / "y" / "late.wav").write_bytes(b"x")
        (inbox / "x" / "later.wav").write_bytes(b"x")
        wait_until(lambda: seen.has(inbox / "y" / "late.wav"), 5, "y/late.wav noted")
        wait_until(lambda: seen.has(inbox / "x" / "later.wav"), 5, "x/later.wav noted")
    finally:
        release.set()
        tree.stop()


def test_a_path_too_long_to_watch_skips_that_folder_only(tmp_path: Path) -> None:
    """A folder whose path passes PATH_MAX: watch_failed once, the rest watched, reader alive."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    fd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(18):  # 18 times 251 bytes: past 4,096, far from MAX_DEPTH
            os.mkdir("d" * 250, dir_fd=fd)
            inner = os.open("d" * 250, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)
    noted: list[str] = []
    with capture_logs() as logs:
        tree = InotifyTree(
            str(inbox), enters=lambda _p, _l: True, note=noted.append, overflowed=lambda: None
        )
        tree.start()
        try:
            (inbox / "root.wav").write_bytes(b"x")
            wait_until(lambda: str(inbox / "root.wav") in noted, 5, "root.wav noted")
            assert tree.is_alive()
        finally:
            tree.stop()
    assert [e["event"] for e in logs] == ["sfwatch.watch_failed"]
    assert "File name too long" in logs[0]["error"]


def test_a_watch_that_cannot_start_leaves_no_descriptor_open(tmp_path: Path) -> None:
    """Watcher.start on a path a file holds: FileExistsError each retry, no fd left behind."""
    squatter = tmp_path / "inbox"
    squatter.write_bytes(b"not a folder")
    before = len(list(Path("/proc/self/fd").iterdir()))
    for _ in range(20):
        watcher = Watcher(WatchConfig(path=squatter, poll=False), PathNotes())
        with pytest.raises(FileExistsError):
            watcher.start()
    assert len(list(Path("/proc/self/fd").iterdir())) == before
