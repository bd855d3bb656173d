"""Folders and moves below a trusted root that never follow a symlink (docs/design.md §11).

A path such as ``<inbox>/failed/sub/a.mp3`` names folders that the share's
writers may have replaced by symlinks (``sub -> /etc/cron.d``) after sfwatch
last looked. Resolving the path and then acting on it would follow the link, so
here a folder is opened one component at a time with ``O_NOFOLLOW |
O_DIRECTORY`` below a root the admin configured, and every later step uses the
folder's descriptor (``dir_fd``): once opened, no rename or link in the share
can redirect it. A symlink anywhere on the way is an :class:`UnsafePath`, never
followed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from sfwatch.fsutil import CHUNK

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
#: errno values meaning "this file system does not do hard links" (as in fsutil)
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}
#: errno values meaning "this file system cannot fsync a folder" (as in fsutil)
_NO_DIR_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES}


class UnsafePath(Exception):
    """A component of a path is a symlink (or not a folder): it is not followed."""


def _check_part(part: str) -> None:
    if part in ("", ".", "..") or "/" in part or "\0" in part:
        raise UnsafePath(f"{part!r} is not a plain folder name")


def open_dir(root: Path, parts: Sequence[str], *, create: bool = False) -> int:
    """Open ``root/parts[0]/parts[1]/…`` as a folder without following any link below root.

    ``root`` itself is the admin's (a configured path) and is opened normally.
    ``create``: make missing folders (durably: each parent is fsynced). Raises
    :class:`UnsafePath` for a symlink or a non-folder on the way, FileNotFoundError
    for a missing folder (without ``create``), OSError for the rest. The caller
    closes the returned descriptor.
    """
    fd = os.open(root, _DIR_FLAGS)
    here = root
    try:
        for part in parts:
            here = here / part
            try:
                child = open_child(fd, part, here)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):  # made meanwhile: opened below
                    os.mkdir(part, dir_fd=fd)
                    fsync_dir_fd(fd)
                child = open_child(fd, part, here)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_child(dir_fd: int, name: str, shown: Path) -> int:
    """Open folder ``name`` in an open folder, never through a link.

    ``shown``: the path to name in an :class:`UnsafePath`. FileNotFoundError if
    there is no such name.
    """
    _check_part(name)
    try:
        return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        try:
            mode = os.lstat(name, dir_fd=dir_fd).st_mode
        except OSError:
            raise exc from None
        if stat.S_ISLNK(mode):
            raise UnsafePath(
                f"{shown} is a symlink (links in a watched tree are never followed)"
            ) from None
        if not stat.S_ISDIR(mode):
            raise UnsafePath(f"{shown} is not a folder") from None
        raise


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    """``lstat`` of ``name`` in a folder; None if there is no such name."""
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def read_at(dir_fd: int, name: str, limit: int = 1 << 20) -> bytes:
    """Up to ``limit`` bytes of a regular file in a folder; never a link, FIFO or device."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", name)
        chunks: list[bytes] = []
        left = limit
        while left > 0 and (chunk := os.read(fd, min(CHUNK, left))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def scan_dir(dir_fd: int) -> Iterator[os.DirEntry[str]]:
    """The entries of an open folder (``scandir`` on a copy of the descriptor)."""
    with os.scandir(dir_fd) as entries:
        yield from entries


def move_at(src_fd: int, name: str, dst_fd: int, new_name: str) -> None:
    """Move regular file ``name`` to ``new_name`` in another folder; never replace a file.

    FileExistsError if ``new_name`` is taken. As ``fsutil.move_no_replace``:
    ``link()`` then ``unlink()``; a copy that is fsynced and verified before the
    source goes when the folders are on different file systems; an exclusive
    create plus ``rename()`` where there are no hard links.
    """
    st = os.lstat(name, dir_fd=src_fd)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file", name)
    try:
        _link_at(src_fd, name, dst_fd, new_name)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_at(src_fd, name, dst_fd, new_name)
    fsync_dir_fd(dst_fd)  # the new name is durable before the old one goes
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=src_fd)
    with contextlib.suppress(OSError):  # moved: a failing fsync now does not undo that
        fsync_dir_fd(src_fd)


def _link_at(src_fd: int, name: str, dst_fd: int, new_name: str) -> None:
    try:
        os.link(name, new_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        # No hard links: reserve the name atomically, then rename onto the placeholder.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        os.close(os.open(new_name, flags, 0o600, dir_fd=dst_fd))
        try:
            os.rename(name, new_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(new_name, dir_fd=dst_fd)
            raise


def _copy_at(src_fd: int, name: str, dst_fd: int, new_name: str) -> None:
    """Copy to a hidden temp in ``dst_fd``, fsync, verify, then give it ``new_name``."""
    head = os.fsencode(new_name)[:200].decode("utf-8", "ignore")
    tmp = f".{head}.{secrets.token_hex(4)}.sfwatch-tmp"
    fin = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=src_fd)
    try:
        st = os.fstat(fin)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", name)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fout = os.open(tmp, flags, st.st_mode & 0o777, dir_fd=dst_fd)
        try:
            digest = hashlib.sha256()
            while chunk := os.read(fin, CHUNK):
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fout, view) :]
            os.fsync(fout)
            with contextlib.suppress(OSError):
                os.utime(fout, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.lseek(fout, 0, os.SEEK_SET)
            check = hashlib.sha256()
            while chunk := os.read(fout, CHUNK):
                check.update(chunk)
            if check.digest() != digest.digest():
                raise OSError(errno.EIO, "copy does not match its source", new_name)
        finally:
            os.close(fout)
        _link_at(dst_fd, tmp, dst_fd, new_name)
    finally:
        os.close(fin)
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dst_fd)


def fsync_dir_fd(dir_fd: int) -> None:
    """fsync an open folder where the file system can (some FUSE and SMB mounts cannot)."""
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno not in _NO_DIR_FSYNC:
            raise
