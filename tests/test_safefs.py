"""sfwatch.safefs and the *_at steps of fsutil: below a root, never through a link."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sfwatch import safefs
from sfwatch.fsutil import move_no_replace_at


@contextmanager
def opened(root: Path, *parts: str, create: bool = False) -> Iterator[int]:
    """``safefs.open_below`` as a context manager that closes the descriptor."""
    fd = safefs.open_below(root, parts, create=create)
    try:
        yield fd
    finally:
        os.close(fd)


def test_open_below_walks_real_folders_and_creates_missing_ones(tmp_path: Path) -> None:
    """Real folders open; with create, missing ones are made (and then open)."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    with opened(tmp_path, "a", "b") as fd:
        assert os.path.samestat(os.fstat(fd), (tmp_path / "a" / "b").stat())
    with pytest.raises(FileNotFoundError):
        safefs.open_below(tmp_path, ("a", "new"))
    with opened(tmp_path, "a", "new", "deeper", create=True) as fd:
        assert os.path.samestat(os.fstat(fd), (tmp_path / "a" / "new" / "deeper").stat())


@pytest.mark.parametrize("create", [False, True])
def test_open_below_refuses_a_link_or_a_file_on_the_way(tmp_path: Path, create: bool) -> None:
    """A symlinked folder (even to a real folder) or a file on the way is UnsafeFolder."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "inner").mkdir(parents=True)
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(elsewhere)
    (root / "file").write_text("x")
    with pytest.raises(safefs.UnsafeFolder, match="link is a symlink"):
        safefs.open_below(root, ("link", "inner"), create=create)
    with pytest.raises(safefs.UnsafeFolder, match="file is not a folder"):
        safefs.open_below(root, ("file",), create=create)
    for bad in ("..", ".", "", "a/b"):
        with pytest.raises(safefs.UnsafeFolder):
            safefs.open_below(root, (bad,), create=create)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["inner"], "nothing made through it"


def test_move_no_replace_at_never_replaces_and_moves_only_regular_files(tmp_path: Path) -> None:
    """A taken name is FileExistsError (both files kept); a link is never moved."""
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    (tmp_path / "src" / "a").write_bytes(b"new")
    (tmp_path / "dst" / "a").write_bytes(b"old")
    (tmp_path / "src" / "link").symlink_to(tmp_path / "src" / "a")
    with opened(tmp_path, "src") as src, opened(tmp_path, "dst") as dst:
        with pytest.raises(FileExistsError):
            move_no_replace_at(src, "a", dst, "a")
        with pytest.raises(OSError, match="not a regular file"):
            move_no_replace_at(src, "link", dst, "b")
        move_no_replace_at(src, "a", dst, "a (1)")
    assert (tmp_path / "dst" / "a").read_bytes() == b"old"
    assert (tmp_path / "dst" / "a (1)").read_bytes() == b"new"
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == ["link"]
    assert not (tmp_path / "dst" / "b").exists()


def test_move_no_replace_at_across_file_systems_copies_and_verifies(
    tmp_path: Path, shm_dir: Path
) -> None:
    """Across file systems: a verified copy with the mode and mtime; no temp file left."""
    source = tmp_path / "a.mp3"
    source.write_bytes(os.urandom(200_000))
    source.chmod(0o640)
    os.utime(source, ns=(1_000_000_000, 2_000_000_000))
    data = source.read_bytes()
    with opened(tmp_path) as src, opened(shm_dir) as dst:
        move_no_replace_at(src, "a.mp3", dst, "b.mp3")
    moved = shm_dir / "b.mp3"
    assert moved.read_bytes() == data
    assert moved.stat().st_mode & 0o777 == 0o640
    assert moved.stat().st_mtime_ns == 2_000_000_000
    assert not source.exists()
    assert [p.name for p in shm_dir.iterdir()] == ["b.mp3"]


def test_read_at_reads_regular_files_only(tmp_path: Path) -> None:
    """read_at reads a file; a link or a FIFO is refused without blocking."""
    (tmp_path / "f").write_bytes(b"data")
    (tmp_path / "link").symlink_to(tmp_path / "f")
    os.mkfifo(tmp_path / "fifo")
    with opened(tmp_path) as fd:
        assert safefs.read_at(fd, "f") == b"data"
        assert safefs.read_at(fd, "f", limit=2) == b"da"
        with pytest.raises(OSError):  # ELOOP
            safefs.read_at(fd, "link")
        with pytest.raises(OSError, match="not a regular file"):
            safefs.read_at(fd, "fifo")


def test_work_area_handles_are_kept_while_the_area_stays(tmp_path: Path) -> None:
    """A second use gets the same folder without walking; a replaced .sfwatch is walked again."""
    area = safefs.WorkArea(tmp_path)
    with area.folder(["work", "me"]) as first, area.folder(["work", "me"]) as second:
        assert os.fstat(first).st_ino == os.fstat(second).st_ino
    old = tmp_path / ".sfwatch"
    old.rename(tmp_path / "moved")  # (what a writer of the share can do)
    with area.folder(["work", "me"]) as third:
        assert os.fstat(third).st_ino != (tmp_path / "moved" / "work" / "me").stat().st_ino
        assert (tmp_path / ".sfwatch" / "work" / "me").is_dir()


def test_a_removed_work_area_is_let_go_at_once(tmp_path: Path) -> None:
    """Once .sfwatch is gone, the next use closes every kept handle of that folder."""
    area = safefs.WorkArea(tmp_path)
    with area.folder(["work", "me"]):
        pass
    kept = [key for key in safefs._handles._open if key[0] == tmp_path]
    assert kept
    shutil.rmtree(tmp_path / ".sfwatch")
    with area.folder(["work", "me"], create=True) as fresh:
        assert os.fstat(fresh).st_nlink > 0
    (tmp_path / ".sfwatch").rename(tmp_path / "gone")
    with pytest.raises(FileNotFoundError):
        area.open(["work", "me"], create=False)
    assert not [key for key in safefs._handles._open if key[0] == tmp_path]


def test_a_folder_below_a_kept_one_is_opened_from_it_and_a_removed_one_is_noticed(
    tmp_path: Path,
) -> None:
    """A job folder opens from the kept handle; with that folder removed (by root, say)
    a new one is made, and without ``create`` the missing job is FileNotFoundError."""
    area = safefs.WorkArea(tmp_path)
    with area.folder(["work", "me", "job1"]) as job:
        assert os.fstat(job).st_ino == (tmp_path / ".sfwatch/work/me/job1").stat().st_ino
    with area.folder(["work", "me", "job1"], create=False) as again:
        assert os.fstat(again).st_ino == (tmp_path / ".sfwatch/work/me/job1").stat().st_ino
    shutil.rmtree(tmp_path / ".sfwatch" / "work" / "me")  # the kept folder itself goes
    with pytest.raises(FileNotFoundError):
        area.open(["work", "me", "job1"], create=False)
    with area.folder(["work", "me", "job2"]) as fresh:
        assert os.fstat(fresh).st_nlink > 0
        assert os.fstat(fresh).st_ino == (tmp_path / ".sfwatch/work/me/job2").stat().st_ino
    planted = tmp_path / ".sfwatch" / "work" / "me" / "job3"
    planted.mkdir()
    os.chown(planted, os.geteuid() + 4242, -1)  # someone else's: never used
    with pytest.raises(safefs.UnsafeFolder):
        area.open(["work", "me", "job3"], create=False)


def test_holds_folder_sees_real_folders_only_and_follows_the_area(tmp_path: Path) -> None:
    """A folder in a kept one is seen; a link or a file of that name is not; nor is
    anything once .sfwatch was replaced."""
    area = safefs.WorkArea(tmp_path)
    with area.folder(["work", "me", "job1"]):
        pass
    mine = tmp_path / ".sfwatch" / "work" / "me"
    (mine / "file").write_bytes(b"")
    (mine / "link").symlink_to(mine / "job1")
    assert area.holds_folder(["work", "me"], "job1")
    assert not area.holds_folder(["work", "me"], "job2")
    assert not area.holds_folder(["work", "me"], "file")
    assert not area.holds_folder(["work", "me"], "link")
    assert not area.holds_folder(["work", "other"], "job1"), "no such folder: nothing held"
    (tmp_path / ".sfwatch").rename(tmp_path / "moved")  # (what a writer of the share can do)
    (tmp_path / ".sfwatch").mkdir(mode=0o700)
    assert not area.holds_folder(["work", "me"], "job1"), "not the kept folder any more"


def test_a_kept_folder_is_lent_not_copied_and_a_removed_one_is_made_again(
    tmp_path: Path,
) -> None:
    """folder() of a kept folder gives the kept handle itself while the folder lives;
    once it was removed, a new folder is made and kept instead."""
    area = safefs.WorkArea(tmp_path)
    with area.folder(["tmp", "me"]):
        pass  # now kept
    with area.folder(["tmp", "me"]) as first, area.folder(["tmp", "me"]) as second:
        assert first == second, "one handle, lent twice, not two copies"
    os.fstat(first)  # still open: the kept handle outlives the blocks
    (tmp_path / ".sfwatch" / "tmp" / "me").rmdir()
    with area.folder(["tmp", "me"]) as fresh:  # (its number may be the old one's, reused)
        assert os.fstat(fresh).st_ino == (tmp_path / ".sfwatch/tmp/me").stat().st_ino
    with area.folder(["tmp", "me"]) as again:
        assert os.fstat(again).st_nlink > 0
