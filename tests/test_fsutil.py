"""fsutil: no-replace moves and atomic writes on real file systems (promise 1)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import pytest

from sfwatch.fsutil import (
    files_below,
    free_stems,
    make_dirs,
    move_no_replace,
    remove_empty_dirs,
    temp_name,
    write_new_file,
)

#: a name of 244 UTF-8 bytes: legal (NAME_MAX is 255 bytes) but 82 characters long
LONG_UNICODE = "語" * 80


def temp_files(folder: Path) -> list[str]:
    """Our temporary files anywhere below ``folder``."""
    return sorted(p.name for p in folder.rglob("*.sfwatch-tmp"))


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs mounted in tmp_path (needs root); unmounted afterwards."""
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if mount is None or umount is None:
        pytest.skip("mount/umount not available")
    point = tmp_path / "tiny"
    point.mkdir()
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(point)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield point
    finally:
        subprocess.run([umount, str(point)], capture_output=True, check=False)


# --- write_new_file -------------------------------------------------------------------


def test_write_new_file_creates_file_and_parents(tmp_path: Path) -> None:
    """A new file gets exactly the bytes, missing folders are made, no temp is left."""
    target = tmp_path / "a" / "b" / "out.txt"
    write_new_file(target, b"hello\n")
    assert target.read_bytes() == b"hello\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_write_new_file_never_overwrites(tmp_path: Path) -> None:
    """A taken name raises FileExistsError; the original and the folder are unchanged."""
    target = tmp_path / "out.txt"
    target.write_bytes(b"original")
    inode = target.stat().st_ino
    with pytest.raises(FileExistsError):
        write_new_file(target, b"replacement")
    assert target.read_bytes() == b"original"
    assert target.stat().st_ino == inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_write_new_file_does_not_replace_a_dangling_symlink(tmp_path: Path) -> None:
    """A dangling symlink is a taken name: not replaced, its target not created."""
    target = tmp_path / "out.txt"
    target.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):
        write_new_file(target, b"data")
    assert target.is_symlink()
    assert not (tmp_path / "nowhere").exists()
    assert temp_files(tmp_path) == []


def test_temp_name_is_hidden_sibling(tmp_path: Path) -> None:
    """The temp file sits beside the final name, hidden from the watcher's include rules."""
    tmp = temp_name(tmp_path / "a.txt")
    assert tmp.parent == tmp_path
    assert tmp.name.startswith(".a.txt.")
    assert tmp.name.endswith(".sfwatch-tmp")
    assert temp_name(tmp_path / "a.txt") != tmp


def test_write_new_file_long_unicode_name(tmp_path: Path) -> None:
    """A legal name of many multi-byte characters still gets a temp name within NAME_MAX."""
    target = tmp_path / f"{LONG_UNICODE}.txt"
    write_new_file(target, b"text\n")
    assert target.read_bytes() == b"text\n"
    assert len(os.fsencode(temp_name(target).name)) <= 255
    assert temp_files(tmp_path) == []


def test_write_new_file_is_atomic_for_a_concurrent_reader(tmp_path: Path) -> None:
    """A reader polling the final names never sees a partly written file."""
    size = 1 << 20
    names = [tmp_path / f"f{i}.bin" for i in range(25)]
    writing = threading.Event()
    writing.set()
    seen_sizes: list[int] = []

    def reader() -> None:
        while writing.is_set():
            for name in names:
                try:
                    seen_sizes.append(name.stat().st_size)
                except FileNotFoundError:
                    continue

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for name in names:
            write_new_file(name, b"\xa5" * size)
    finally:
        writing.clear()
        thread.join(10)
    assert seen_sizes, "the reader never saw a file: the test proved nothing"
    assert set(seen_sizes) == {size}
    assert temp_files(tmp_path) == []


def test_write_new_file_disk_full(tiny_fs: Path) -> None:
    """On a full disk: ENOSPC, no partial file under either name, and the space is freed."""
    target = tiny_fs / "big.txt"
    with pytest.raises(OSError) as caught:
        write_new_file(target, b"x" * 256 * 1024)
    assert caught.value.errno == errno.ENOSPC
    assert list(tiny_fs.iterdir()) == []
    # the failed temp file was removed, so a small write fits again
    write_new_file(tiny_fs / "small.txt", b"ok\n")
    assert (tiny_fs / "small.txt").read_bytes() == b"ok\n"


# --- move_no_replace --------------------------------------------------------------------


def test_move_same_fs_keeps_inode(tmp_path: Path) -> None:
    """A same-filesystem move keeps the inode and bytes, removes the source, makes folders."""
    src = tmp_path / "in" / "a.mp3"
    src.parent.mkdir()
    src.write_bytes(b"audio" * 1000)
    inode = src.stat().st_ino
    dst = tmp_path / "done" / "sub" / "a.mp3"
    move_no_replace(src, dst)
    assert not src.exists()
    assert dst.read_bytes() == b"audio" * 1000
    assert dst.stat().st_ino == inode
    assert dst.stat().st_nlink == 1


@pytest.mark.parametrize("taken_by", ["file", "dangling symlink"])
def test_move_same_fs_never_replaces(tmp_path: Path, taken_by: str) -> None:
    """A taken destination raises FileExistsError; source and destination stay as they were."""
    src = tmp_path / "a.mp3"
    src.write_bytes(b"mine")
    inode = src.stat().st_ino
    dst = tmp_path / "done" / "a.mp3"
    dst.parent.mkdir()
    if taken_by == "file":
        dst.write_bytes(b"theirs")
    else:
        dst.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):
        move_no_replace(src, dst)
    assert src.read_bytes() == b"mine"
    assert src.stat().st_ino == inode
    assert src.stat().st_nlink == 1
    if taken_by == "file":
        assert dst.read_bytes() == b"theirs"
    else:
        assert dst.is_symlink()
        assert not (tmp_path / "nowhere").exists()


def test_move_cross_fs_copies_and_verifies(tmp_path: Path, shm_dir: Path) -> None:
    """To another file system: same bytes, mtime kept, source removed, no temp left."""
    src = tmp_path / "a.mp3"
    data = os.urandom(3 * (1 << 20) + 17)  # more than one copy chunk
    src.write_bytes(data)
    old_mtime = 1_500_000_000_123_456_789
    os.utime(src, ns=(old_mtime, old_mtime))
    dst = shm_dir / "done" / "a.mp3"
    move_no_replace(src, dst)
    assert not src.exists()
    assert dst.read_bytes() == data
    assert dst.stat().st_mtime_ns == old_mtime
    assert temp_files(shm_dir) == []


def test_move_cross_fs_never_replaces(tmp_path: Path, shm_dir: Path) -> None:
    """A taken name on the other file system is not replaced and the source stays."""
    src = tmp_path / "a.mp3"
    src.write_bytes(b"mine")
    dst = shm_dir / "a.mp3"
    dst.write_bytes(b"theirs")
    with pytest.raises(FileExistsError):
        move_no_replace(src, dst)
    assert src.read_bytes() == b"mine"
    assert dst.read_bytes() == b"theirs"
    assert temp_files(shm_dir) == []


def test_move_cross_fs_to_full_disk_keeps_source(tmp_path: Path, tiny_fs: Path) -> None:
    """A copy that hits a full disk fails with ENOSPC; the source is intact, nothing is left."""
    src = tmp_path / "a.mp3"
    data = os.urandom(256 * 1024)
    src.write_bytes(data)
    with pytest.raises(OSError) as caught:
        move_no_replace(src, tiny_fs / "done" / "a.mp3")
    assert caught.value.errno == errno.ENOSPC
    assert src.read_bytes() == data
    assert [p for p in tiny_fs.rglob("*") if not p.is_dir()] == []


# --- free_stems -------------------------------------------------------------------------


def test_free_stems_counts_up_from_the_plain_name(tmp_path: Path) -> None:
    """With nothing taken the stems are a, a (1), a (2), …."""
    stems = free_stems("a", [(tmp_path, ".txt")])
    assert list(islice(stems, 3)) == ["a", "a (1)", "a (2)"]


def test_free_stems_skips_a_stem_taken_in_any_folder(tmp_path: Path) -> None:
    """A stem is skipped when any one of the (folder, suffix) pairs is taken."""
    texts, done = tmp_path / "t", tmp_path / "done"
    texts.mkdir()
    done.mkdir()
    (texts / "a.txt").write_text("x")  # taken for the transcript only
    (done / "a (1).mp3").write_text("x")  # taken for the original only
    (done / "a (2).txt").write_text("x")  # another suffix: does not count
    (texts / "a (3).mp3").write_text("x")  # another folder's suffix: does not count
    (done / "a (4).mp3").symlink_to(tmp_path / "nowhere")  # a dangling link is taken
    stems = free_stems("a", [(texts, ".txt"), (done, ".mp3")])
    assert list(islice(stems, 3)) == ["a (2)", "a (3)", "a (5)"]


def test_free_stems_keeps_dots_in_the_stem(tmp_path: Path) -> None:
    """The number goes after the whole stem, dots and all."""
    (tmp_path / "my.song.mp3").write_text("x")
    assert next(free_stems("my.song", [(tmp_path, ".mp3")])) == "my.song (1)"


# --- remove_empty_dirs ------------------------------------------------------------------


def test_remove_empty_dirs_stops_at_stop(tmp_path: Path) -> None:
    """Empty folders are removed up to, not including, ``stop`` (even if it is empty)."""
    stop = tmp_path / "stop"
    top = stop / "a" / "b" / "c"
    top.mkdir(parents=True)
    remove_empty_dirs(top, stop)
    assert stop.is_dir()
    assert list(stop.iterdir()) == []


def test_remove_empty_dirs_stops_at_a_non_empty_folder(tmp_path: Path) -> None:
    """A folder that still holds something is kept, and so are its parents."""
    stop = tmp_path / "stop"
    top = stop / "a" / "b" / "c"
    top.mkdir(parents=True)
    (stop / "a" / "keep.txt").write_text("x")
    remove_empty_dirs(top, stop)
    assert not (stop / "a" / "b").exists()
    assert (stop / "a" / "keep.txt").is_file()


def test_remove_empty_dirs_ignores_folders_outside_stop(tmp_path: Path) -> None:
    """A folder that is not below ``stop`` is left alone, as is ``stop`` itself."""
    stop = tmp_path / "stop"
    stop.mkdir()
    elsewhere = tmp_path / "elsewhere" / "x"
    elsewhere.mkdir(parents=True)
    remove_empty_dirs(elsewhere, stop)
    remove_empty_dirs(stop, stop)
    assert elsewhere.is_dir()
    assert stop.is_dir()


# --- a file where a folder must be ----------------------------------------------------


@pytest.mark.parametrize("squatter", ["file", "dangling-link"])
def test_make_dirs_under_a_non_folder_is_not_a_taken_name(tmp_path: Path, squatter: str) -> None:
    """A file (or dangling link) named like a needed folder: ENOTDIR, never FileExistsError."""
    done = tmp_path / "done"
    if squatter == "file":
        done.write_text("not a folder")
    else:
        done.symlink_to(tmp_path / "nowhere")
    with pytest.raises(NotADirectoryError) as caught:
        make_dirs(done / "sub")
    assert not isinstance(caught.value, FileExistsError)
    assert caught.value.errno == errno.ENOTDIR
    source = tmp_path / "a.mp3"
    source.write_bytes(b"audio")
    with pytest.raises(NotADirectoryError):
        move_no_replace(source, done / "sub" / "a.mp3")
    with pytest.raises(NotADirectoryError):
        write_new_file(done / "a.txt", b"text")
    assert source.read_bytes() == b"audio"
    assert done.is_symlink() or done.read_text() == "not a folder"


def test_files_below_any_depth_without_recursion(tmp_path: Path) -> None:
    """1,100 levels (past the recursion limit): every file found, links not entered."""
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        for _ in range(1100):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        os.close(os.open("deep.mp3", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    (tmp_path / "top.mp3").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path, target_is_directory=True)
    try:
        found = {p.relative_to(tmp_path).parts[-1]: len(p.parts) for p in files_below(tmp_path)}
        assert set(found) == {"deep.mp3", "top.mp3", "link"}
        assert found["deep.mp3"] == len(tmp_path.parts) + 1101
    finally:
        subprocess.run(["rm", "-rf", str(tmp_path / "d")], check=True)
