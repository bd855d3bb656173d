"""watch: which paths are work, what a scan finds, and real observers noting events."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from sfwatch.config import WatchConfig
from sfwatch.watch import (
    MAX_DEPTH,
    PathNotes,
    Watcher,
    is_ignored_name,
    mount_fstype,
    needs_polling,
    polling_listdir,
    scan,
    too_deep,
    walk_dir,
    wants,
)
from tests.conftest import wait_until

INBOX = Path("/srv/rec/inbox")


@pytest.fixture
def watch() -> WatchConfig:
    """A watched folder with every default."""
    return WatchConfig(path=INBOX)


# --- wants ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rel", ["a.mp3", "A.MP3", "Interview.Wav", "sub/deeper/b.m4a", "x.FLAC", "clip.webm"]
)
def test_wants_included_names_case_insensitive(watch: WatchConfig, rel: str) -> None:
    """Include patterns match regardless of case, at any depth."""
    assert wants(INBOX / rel, watch)


@pytest.mark.parametrize(
    "rel",
    [
        ".DS_Store",
        "x.part",
        "x.mp3.part",
        "x.mp3.tmp",
        "x.mp3.crdownload",
        "._a.wav",
        ".a.mp3.Xy12Ab",
        "~$x.mp3",
        "@eaDir/a.mp3",
        "sub/@eaDir/a.mp3",
        "Thumbs.db",
        ".hidden/a.mp3",
        "#recycle/a.mp3",
    ],
)
def test_wants_ignores_temp_and_system_names(rel: str) -> None:
    """Built-in ignored names are skipped even when the include list takes everything."""
    everything = WatchConfig(path=INBOX, include=("*",))
    assert not wants(INBOX / rel, everything)


def test_include_all_takes_ordinary_names() -> None:
    """The include-everything config used above does take an ordinary name."""
    everything = WatchConfig(path=INBOX, include=("*",))
    assert wants(INBOX / "notes.pdf", everything)
    assert wants(INBOX / "sub/x.bin", everything)


@pytest.mark.parametrize("name", ["._a.wav", "~$X.MP3", "THUMBS.DB", "a.PART", ".ds_store"])
def test_is_ignored_name_case_insensitive(watch: WatchConfig, name: str) -> None:
    """The ignore list matches regardless of case."""
    assert is_ignored_name(name, watch)


def test_wants_not_a_pdf(watch: WatchConfig) -> None:
    """A name outside the include patterns is not wanted."""
    assert not wants(INBOX / "notes.pdf", watch)
    assert not wants(INBOX / "a.mp3.txt", watch)


def test_wants_exclude_patterns_add_to_ignore_list() -> None:
    """The config's exclude patterns are skipped too, case-insensitively."""
    watch = WatchConfig(path=INBOX, exclude=("draft-*", "private"))
    assert not wants(INBOX / "Draft-1.mp3", watch)
    assert not wants(INBOX / "private/a.mp3", watch)
    assert wants(INBOX / "final.mp3", watch)


@pytest.mark.parametrize(
    "rel",
    ["done/a.mp3", "done/sub/a.mp3", "failed/a.mp3", ".sfwatch/work/i/j/a.mp3", "done", "failed"],
)
def test_wants_never_done_failed_or_work_area(rel: str) -> None:
    """Files in done/, failed/ and the work area are never work, whatever the include list."""
    assert not wants(INBOX / rel, WatchConfig(path=INBOX))
    assert not wants(INBOX / rel, WatchConfig(path=INBOX, include=("*",)))


def test_wants_respects_overridden_done_and_failed() -> None:
    """Overridden done/failed folders are excluded, and the default ones stay excluded.

    (An earlier run with the defaults left files there: they must not come back.)
    """
    watch = WatchConfig(path=INBOX, done_dir=INBOX / "processed", failed_dir=INBOX / "bad")
    assert not wants(INBOX / "processed/a.mp3", watch)
    assert not wants(INBOX / "bad/a.mp3", watch)
    assert not wants(INBOX / "done/a.mp3", watch)
    assert not wants(INBOX / "failed/a.mp3", watch)
    assert wants(INBOX / "sub/done/a.mp3", watch)


def test_wants_recursive_false_only_top_level() -> None:
    """With recursive off, only files directly in the watched folder are wanted."""
    watch = WatchConfig(path=INBOX, recursive=False)
    assert wants(INBOX / "a.mp3", watch)
    assert not wants(INBOX / "sub/a.mp3", watch)


def test_wants_outside_or_the_folder_itself(watch: WatchConfig) -> None:
    """A path outside the watched folder, or the folder itself, is not wanted."""
    assert not wants(Path("/srv/rec/other/a.mp3"), watch)
    assert not wants(Path("/srv/rec/inbox.mp3"), watch)
    assert not wants(INBOX, watch)


# --- scan -------------------------------------------------------------------------------


def make_tree(root: Path, rels: list[str]) -> None:
    """Create each file in ``rels`` below ``root``."""
    for rel in rels:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def scanned(watch: WatchConfig) -> list[str]:
    """What a scan reports, relative to the watched folder, sorted."""
    found: list[str] = []
    count = scan(watch, found.append)
    assert count == len(found)
    return sorted(Path(p).relative_to(watch.path).as_posix() for p in found)


def test_scan_finds_wanted_files_and_prunes(tmp_path: Path) -> None:
    """A scan reports wanted files at any depth, never done/, failed/, .sfwatch/ or junk."""
    inbox = tmp_path / "inbox"
    make_tree(
        inbox,
        [
            "a.mp3",
            "sub/b.WAV",
            "sub/deeper/c.flac",
            "sub/notes.pdf",
            "done/d.mp3",
            "done/sub/d2.mp3",
            "failed/e.mp3",
            ".sfwatch/work/inst/job/f.mp3",
            "@eaDir/g.mp3",
            "sub/.h.mp3",
        ],
    )
    assert scanned(WatchConfig(path=inbox)) == ["a.mp3", "sub/b.WAV", "sub/deeper/c.flac"]
    assert scanned(WatchConfig(path=inbox, recursive=False)) == ["a.mp3"]


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"recursive": False},
        {"include": ("*",), "exclude": ("*.bak", "skip*")},
        {"include": ("rec_*.WAV",), "done_dir": "archive/done"},
    ],
)
def test_scan_reports_exactly_what_wants_takes(tmp_path: Path, settings: dict[str, Any]) -> None:
    """The rescan's own name check agrees with ``wants`` on every file of a mixed tree."""
    inbox = tmp_path / "inbox"
    if "done_dir" in settings:
        settings = {**settings, "done_dir": inbox / settings["done_dir"]}
    rels = [
        "a.mp3", "B.MP3", "rec_1.wav", "sub/rec_2.Wav", "sub/x.pdf", "sub/.hidden.mp3",
        "x.mp3.part", "~$y.mp3", "Thumbs.db", "failed", "n.bak", "skipme.mp3", "skipdir/c.mp3",
        "archive/done/d.mp3", "archive/e.mp3", "done/f.mp3", "@eaDir/h.mp3",
        ".sfwatch/work/i/j.mp3", "deep/er/still/k.flac", "sub/notes.txt",
    ]  # fmt: skip
    make_tree(inbox, rels)
    watch = WatchConfig(path=inbox, **settings)
    everything = sorted(p.relative_to(inbox).as_posix() for p in inbox.rglob("*") if p.is_file())
    taken = [rel for rel in everything if wants(inbox / rel, watch)]
    assert taken, "the tree has files to take"
    assert scanned(watch) == taken


def test_scan_does_not_even_read_pruned_folders(tmp_path: Path) -> None:
    """done/, failed/ and .sfwatch/ are never listed: their access times stay old."""
    inbox = tmp_path / "inbox"
    make_tree(inbox, ["sub/a.mp3", "done/b.mp3", "failed/c.mp3", ".sfwatch/work/i/j/d.mp3"])
    watch = WatchConfig(path=inbox)
    folders = [inbox / "sub", watch.done_dir, watch.failed_dir, watch.work_dir]
    old = time.time_ns() - 3 * 86400 * 10**9  # over a day old: relatime updates it on a read
    for folder in folders:
        os.utime(folder, ns=(old, folder.stat().st_mtime_ns))
    assert scanned(watch) == ["sub/a.mp3"]
    if inbox.joinpath("sub").stat().st_atime_ns == old:
        pytest.skip("this file system does not update access times on read")
    assert [folder.stat().st_atime_ns for folder in folders[1:]] == [old, old, old]


def test_scan_prunes_overridden_done_dir(tmp_path: Path) -> None:
    """An overridden done_dir inside the inbox is pruned, and so is the default done/."""
    inbox = tmp_path / "inbox"
    make_tree(inbox, ["processed/a.mp3", "done/b.mp3", "c.mp3"])
    watch = WatchConfig(path=inbox, done_dir=inbox / "processed")
    assert scanned(watch) == ["c.mp3"]


def test_scan_does_not_follow_symlinked_dirs(tmp_path: Path) -> None:
    """A symlinked folder (even a loop back to the inbox) is not walked into."""
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    make_tree(inbox, ["a.mp3"])
    make_tree(outside, ["elsewhere.mp3"])
    (inbox / "link").symlink_to(outside, target_is_directory=True)
    (inbox / "loop").symlink_to(inbox, target_is_directory=True)
    assert scanned(WatchConfig(path=inbox)) == ["a.mp3"]


def test_scan_of_missing_folder_finds_nothing(tmp_path: Path) -> None:
    """A watched folder that does not exist (yet) scans as empty."""
    assert scanned(WatchConfig(path=tmp_path / "absent")) == []


# --- depth ----------------------------------------------------------------------------


def test_wants_files_down_to_max_depth(watch: WatchConfig) -> None:
    """A file MAX_DEPTH folders down is wanted; one level deeper it is not."""
    assert wants(INBOX.joinpath(*["d"] * MAX_DEPTH, "a.mp3"), watch)
    assert not wants(INBOX.joinpath(*["d"] * (MAX_DEPTH + 1), "a.mp3"), watch)


def test_too_deep_names_the_first_folder_not_looked_into() -> None:
    """Below level MAX_DEPTH + 1 the answer is that folder; a folder there is itself the cut."""
    levels = [f"l{i}" for i in range(1, 200)]
    cut = INBOX.joinpath(*levels[: MAX_DEPTH + 1])
    assert too_deep(INBOX.joinpath(*levels[:MAX_DEPTH], "a.mp3"), INBOX) is None
    assert too_deep(INBOX.joinpath(*levels[: MAX_DEPTH + 1], "a.mp3"), INBOX) == cut
    assert too_deep(INBOX.joinpath(*levels, "a.mp3"), INBOX) == cut
    assert too_deep(cut, INBOX) is None, "as a file it would be shallow enough"
    assert too_deep(cut, INBOX, folder=True) == cut
    assert too_deep(cut.parent, INBOX, folder=True) is None


def test_scan_stops_at_max_depth_and_reports_the_folder(tmp_path: Path) -> None:
    """A scan takes files MAX_DEPTH folders down, reports the next folder, goes no deeper."""
    inbox = tmp_path / "inbox"
    levels = "/".join(["d"] * MAX_DEPTH)
    make_tree(inbox, [f"{levels}/ok.mp3", f"{levels}/x/deep.mp3", f"{levels}/x/y/deeper.mp3"])
    watch = WatchConfig(path=inbox)
    found: list[str] = []
    assert scan(watch, found.append) == 1
    rel = sorted(Path(p).relative_to(inbox).as_posix() for p in found)
    assert rel == [f"{levels}/ok.mp3", f"{levels}/x"]
    moved_in = inbox / "d" / "d"  # a folder moved in is walked the same way
    assert sorted(walk_dir(moved_in, watch)) == sorted(found)


def test_polling_lists_nothing_below_max_depth(tmp_path: Path) -> None:
    """The polling observer's listdir stops where the scan stops."""
    inbox = tmp_path / "inbox"
    levels = "/".join(["d"] * MAX_DEPTH)
    make_tree(inbox, [f"{levels}/ok.mp3", f"{levels}/x/deep.mp3"])
    listdir = polling_listdir(WatchConfig(path=inbox))
    last = inbox / levels
    assert sorted(e.name for e in listdir(str(last))) == ["ok.mp3", "x"]
    (last / "notes.txt").write_bytes(b"x")  # not listed: only folders and wanted names
    assert sorted(e.name for e in listdir(str(last))) == ["ok.mp3", "x"]
    assert list(listdir(str(last / "x"))) == []
    assert [e.name for e in listdir(str(inbox))] == ["d"]


def test_polling_lists_nothing_in_our_folders_or_ignored_ones(tmp_path: Path) -> None:
    """done/, failed/, .sfwatch/ and an ignored folder are never listed by a poll."""
    inbox = tmp_path / "inbox"
    rels = ["done/a.mp3", "failed/b.mp3", ".sfwatch/work/c.mp3", "@eaDir/d.mp3", "sub/e.mp3"]
    make_tree(inbox, rels)
    listdir = polling_listdir(WatchConfig(path=inbox))
    for folder in ("done", "failed", ".sfwatch", "@eaDir"):  # (so nothing below them either)
        assert list(listdir(str(inbox / folder))) == [], folder
    assert [e.name for e in listdir(str(inbox / "sub"))] == ["e.mp3"]
    assert list(polling_listdir(WatchConfig(path=inbox, recursive=False))(str(inbox / "sub"))) == []


# --- mount table ------------------------------------------------------------------------

MOUNTINFO = r"""22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 0:40 / /srv/share rw,relatime shared:20 - nfs4 server:/export rw,vers=4.2
43 40 0:43 / /srv/share/local rw - ext4 /dev/vdb rw
41 22 0:41 / /srv/smb rw shared:21 master:3 - cifs //nas/share rw
42 22 0:42 / /home/u/remote rw,nosuid,nodev - fuse.sshfs u@host:/ rw
44 22 0:44 / /mnt/my\040drive rw - nfs srv:/x rw
45 22 0:45 / /srv/sharedisk rw - xfs /dev/vdc rw
46 22 0:46 / /srv/stack rw - ext4 /dev/vdd rw
47 46 0:47 / /srv/stack rw - cifs //nas/stack rw
"""


@pytest.mark.parametrize(
    ("path", "fstype"),
    [
        ("/srv/share/inbox", "nfs4"),
        ("/srv/share", "nfs4"),
        ("/srv/share/local/inbox", "ext4"),  # the longest mount point wins
        ("/srv/sharedisk/inbox", "xfs"),
        ("/srv/shared/inbox", "ext4"),  # /srv/share is a prefix of the name, not a parent
        ("/srv/smb/in", "cifs"),
        ("/home/u/remote/in", "fuse.sshfs"),
        ("/mnt/my drive/in", "nfs"),  # \040 is an escaped space
        ("/srv/stack/in", "cifs"),  # mounted over: the later mount is the one seen
        ("/var/lib/x", "ext4"),
    ],
)
def test_mount_fstype(path: str, fstype: str) -> None:
    """The type of the innermost mount that holds the path."""
    assert mount_fstype(Path(path), MOUNTINFO) == fstype


def test_mount_fstype_ignores_line_order() -> None:
    """The longest mount point wins wherever its line is."""
    lines = MOUNTINFO.splitlines()
    reordered = "\n".join([lines[2], lines[1], lines[0]]) + "\n"
    assert mount_fstype(Path("/srv/share/local/in"), reordered) == "ext4"
    assert mount_fstype(Path("/srv/share/in"), reordered) == "nfs4"


def test_mount_fstype_follows_a_symlinked_folder(tmp_path: Path) -> None:
    """A watched path that is a symlink into a network mount is judged by where it leads."""
    link = tmp_path / "nas"
    link.symlink_to("/srv/share/inbox")  # the mount table below is synthetic
    assert mount_fstype(link, MOUNTINFO) == "nfs4"
    assert needs_polling(WatchConfig(path=link / "sub"), MOUNTINFO)


def test_mount_fstype_real_table() -> None:
    """Read from /proc, /dev/shm is a tmpfs (where the system has one)."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm here")
    assert mount_fstype(Path("/dev/shm")) == "tmpfs"


@pytest.mark.parametrize(
    ("path", "poll", "expected"),
    [
        ("/srv/share/in", None, True),
        ("/srv/smb/in", None, True),
        ("/home/u/remote/in", None, True),
        ("/mnt/my drive/in", None, True),
        ("/srv/share/local/in", None, False),
        ("/var/in", None, False),
        ("/srv/share/in", False, False),  # explicit config wins
        ("/var/in", True, True),
    ],
)
def test_needs_polling(path: str, poll: bool | None, expected: bool) -> None:
    """Auto mode polls on network and FUSE mounts only; an explicit setting wins."""
    watch = WatchConfig(path=Path(path), poll=poll)
    assert needs_polling(watch, MOUNTINFO) is expected


# --- real observers ---------------------------------------------------------------------


class Collector:
    """Accumulates what a PathNotes set was given, across drains."""

    def __init__(self, notes: PathNotes) -> None:
        self.notes = notes
        self.seen: set[str] = set()

    def has(self, path: Path) -> bool:
        """Drain new notes; True once ``path`` was noted."""
        self.seen |= self.notes.drain()
        return str(path) in self.seen


@contextmanager
def start_watcher(watch: WatchConfig) -> Iterator[tuple[Watcher, Collector]]:
    """Start a Watcher on ``watch``; stop it afterwards."""
    notes = PathNotes()
    watcher = Watcher(watch, notes)
    watcher.start()
    try:
        yield watcher, Collector(notes)
    finally:
        watcher.stop()
    assert not watcher.alive()


@pytest.fixture
def inotify_watch(tmp_path: Path) -> Iterator[tuple[Watcher, Collector]]:
    """A started inotify Watcher on tmp_path/inbox (with a work area already in place)."""
    watch = WatchConfig(path=tmp_path / "inbox", poll=False)
    (watch.work_dir / "work" / "inst").mkdir(parents=True)
    with start_watcher(watch) as started:
        yield started


def test_inotify_notes_created_file(inotify_watch: tuple[Watcher, Collector]) -> None:
    """A file written in the inbox, or in a new subfolder, is noted."""
    watcher, seen = inotify_watch
    assert not watcher.polling
    inbox = watcher.watch.path
    (inbox / "a.mp3").write_bytes(b"x")
    wait_until(lambda: seen.has(inbox / "a.mp3"), 5, "a.mp3 noted")
    assert watcher.notes.wakeup.is_set()
    (inbox / "sub").mkdir()
    (inbox / "sub" / "b.wav").write_bytes(b"x")
    wait_until(lambda: seen.has(inbox / "sub" / "b.wav"), 5, "sub/b.wav noted")


def test_inotify_notes_renamed_in_file(
    tmp_path: Path, inotify_watch: tuple[Watcher, Collector]
) -> None:
    """A file moved in from outside, or renamed from a temp name, is noted by its new name."""
    watcher, seen = inotify_watch
    inbox = watcher.watch.path
    outside = tmp_path / "outside.wav"
    outside.write_bytes(b"x")
    outside.rename(inbox / "moved-in.wav")
    wait_until(lambda: seen.has(inbox / "moved-in.wav"), 5, "moved-in.wav noted")
    temp = inbox / ".rsync.mp3.Ab12Cd"
    temp.write_bytes(b"x")
    temp.rename(inbox / "rsynced.mp3")
    wait_until(lambda: seen.has(inbox / "rsynced.mp3"), 5, "rsynced.mp3 noted")


def test_inotify_ignores_work_area_done_and_failed(
    inotify_watch: tuple[Watcher, Collector],
) -> None:
    """Churn in .sfwatch/, done/ and failed/ is never noted; a claim notes only its source."""
    watcher, seen = inotify_watch
    watch = watcher.watch
    inbox = watch.path
    claimed = inbox / "claimed.mp3"
    claimed.write_bytes(b"x")
    wait_until(lambda: seen.has(claimed), 5, "claimed.mp3 noted")
    job = watch.work_dir / "work" / "inst" / "job1"
    (job / "sub").mkdir(parents=True)
    claimed.rename(job / "sub" / "claimed.mp3")  # what claim does
    (job / "sub" / ".x.sfwatch-tmp").write_bytes(b"tmp")
    (job / "sub" / "claimed.mp3").rename(job / "sub" / "renamed.mp3")
    for folder in (watch.done_dir / "sub", watch.failed_dir):
        folder.mkdir(parents=True)
        (folder / "a.mp3").write_bytes(b"x")
        (folder / "a.mp3").rename(folder / "b.mp3")
    # inotify delivers in order: once this is noted, the events above have been handled
    sentinel = inbox / "sentinel.mp3"
    sentinel.write_bytes(b"x")
    wait_until(lambda: seen.has(sentinel), 5, "sentinel noted")
    excluded = (watch.work_dir, watch.done_dir, watch.failed_dir)
    inside = [
        p for p in seen.seen if any(Path(p).is_relative_to(d) and Path(p) != d for d in excluded)
    ]
    assert inside == []
    assert str(claimed) in seen.seen  # the source side of the claim's rename
    assert (job / "sub" / "renamed.mp3").exists()


def test_polling_watcher_notes_created_file(tmp_path: Path) -> None:
    """With poll: true a PollingObserver runs and notes a new file within a few polls."""
    watch = WatchConfig(path=tmp_path / "inbox", poll=True)
    with start_watcher(watch) as (watcher, seen):
        assert watcher.polling
        target = watch.path / "sub" / "polled.m4a"
        target.parent.mkdir()
        target.write_bytes(b"x")
        wait_until(lambda: seen.has(target), 10, "polled.m4a noted")


def test_notes_drain_in_bounded_batches() -> None:
    """drain(limit) takes at most limit paths and leaves the wakeup set for the rest."""
    notes = PathNotes()
    for i in range(1200):
        notes.note(f"/in/{i}.wav")
    notes.wakeup.clear()
    first = notes.drain(500)
    assert len(first) == 500
    assert notes.wakeup.is_set(), "the work loop comes back for the rest"
    assert len(notes) == 700
    rest = notes.drain(500) | notes.drain(500)
    assert len(rest) == 700
    assert first | rest == {f"/in/{i}.wav" for i in range(1200)}
    assert len(notes) == 0
