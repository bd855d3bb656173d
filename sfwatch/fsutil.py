"""File-system steps that must never lose or overwrite a file.

Every move here is *no-replace*: the destination is created with ``link()``
(which fails with EEXIST instead of overwriting), and only then is the source
name removed. Between the two steps the file has two names for one inode — a
crash there leaves the same file twice, which recovery resolves by comparing
inodes, never a lost file. Where the destination is on another file system
(EXDEV) the file is copied, fsynced, verified byte for byte and only then is the
source removed. File systems without hard links (FAT, some SMB mounts) fall
back to a check followed by ``rename()``.
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

from sfwatch.safefs import NO_DIR_FSYNC, folder, fsync_fd

CHUNK = 1 << 16  # 64 KiB: larger reads only grow each thread's malloc arena
#: the longest file name Linux file systems take, in bytes (not characters)
NAME_MAX = 255
#: errno values meaning "this file system does not do hard links"
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new name) durable, where the file system can."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in NO_DIR_FSYNC:
            return
        raise
    try:
        fsync_fd(fd)
    finally:
        os.close(fd)


def temp_name(final: Path, tag: str | None = None) -> Path:
    """A hidden temporary sibling of ``final`` (hidden names are never picked up).

    With a ``tag`` (a job id) the name is predictable, so that a writer killed
    mid-write can find and remove its leftover; otherwise it is random.
    """
    return final.with_name(temp_leaf(final.name, tag))


def temp_leaf(name: str, tag: str | None = None) -> str:
    """``temp_name`` for a bare file name."""
    # NAME_MAX (255) counts bytes, not characters: cut the UTF-8 name, not the str.
    head = os.fsencode(name)[:200].decode("utf-8", "ignore")
    return f".{head}.{tag or secrets.token_hex(4)}.sfwatch-tmp"


def make_dirs(path: Path) -> None:
    """``mkdir -p`` whose new folders are durable: each one's parent is fsynced.

    A new folder is an entry in its parent; without the parent's fsync a power
    loss can drop the folder, and with it a file just made durable inside it.

    A name on the way held by something that is not a folder (someone made a
    file named ``done``; a dangling link) raises NotADirectoryError, never
    FileExistsError: callers answer FileExistsError with the next free name,
    and no name under a file is ever taken, so they would try names forever.
    """
    missing: list[Path] = []
    current = path
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for created in reversed(missing):
        try:
            created.mkdir()
        except FileExistsError:
            if created.is_dir():
                continue  # made by another thread or daemon meanwhile
            raise NotADirectoryError(
                errno.ENOTDIR, "not a folder, but a folder is needed here", str(created)
            ) from None
        fsync_dir(created.parent)


def files_below(top: Path) -> Iterator[Path]:
    """Every entry below ``top`` that is not a folder, at any depth, without recursion.

    Links are not followed (a link to a folder is yielded, not entered); folders
    that cannot be listed are passed over. A stack, not ``os.walk``: on Python
    3.11 that recurses once per level, and a deep tree would end it with a
    RecursionError.
    """
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as entries:
                listed = list(entries)
        except OSError:
            continue
        for entry in listed:
            path = folder / entry.name
            if entry.is_dir(follow_symlinks=False):
                stack.append(path)
            else:
                yield path


# -- the steps, on folder handles (see safefs.py) -----------------------------------------


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` at ``fd``'s position.

    Not ``os.fdopen``: a buffered file object costs three more system calls to set
    up (``fstat``, ``isatty``, ``lseek``), each a hand-off of the interpreter lock
    when threads are busy (docs/benchmarks.md).
    """
    view = memoryview(data)
    while view:  # (a write may take less than it was given)
        written = os.write(fd, view)
        if not written:  # (a broken network file system; never loop for ever)
            raise OSError(errno.EIO, "write took nothing")
        view = view[written:]


def write_and_close(fd: int, data: bytes, *, sync: bool) -> None:
    """``write_all``, then (``sync``) ``fsync``, then close ``fd`` whatever happened."""
    try:
        write_all(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_new_at(
    dfd: int, name: str, data: bytes, tag: str | None = None, mode: int = 0o666
) -> None:
    """Create ``name`` in folder ``dfd`` with ``data``, atomically and durably.

    FileExistsError if the name is taken. Readers see no file or the whole file,
    never a half-written one. ``tag`` names the temporary file (see
    ``temp_name``); a leftover of the same tag, from a crash, is overwritten.
    ``mode`` is intersected with the umask, as for any new file.
    """
    tmp = temp_leaf(name, tag)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_TRUNC if tag else os.O_EXCL
    fd = os.open(tmp, flags, mode, dir_fd=dfd)
    try:
        write_and_close(fd, data, sync=True)
        link_or_rename_at(dfd, tmp, dfd, name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dfd)
    fsync_fd(dfd)


def link_or_rename_at(sfd: int, sname: str, dfd: int, dname: str) -> None:
    """Give ``sname``'s file the name ``dname`` without replacing anything there."""
    try:
        os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        # No hard links here: reserve the name with an exclusive create (which fails if
        # it is taken, atomically), then rename onto our own placeholder.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            os.close(os.open(dname, flags, 0o600, dir_fd=dfd))
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, "file exists", dname) from exc
        try:
            os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(dname, dir_fd=dfd)
            raise


def move_no_replace_at(sfd: int, sname: str, dfd: int, dname: str, tag: str | None = None) -> None:
    """Move ``sname`` (in ``sfd``) to ``dname`` (in ``dfd``); FileExistsError if taken.

    Once the source name is gone the move has happened: a failing fsync of the
    source's folder afterwards is not reported as a failed move (the caller
    would look for a source that is no longer there). ``tag`` names the
    temporary copy made across file systems, so a killed copy can be found.
    """
    if not stat.S_ISREG(os.stat(sname, dir_fd=sfd, follow_symlinks=False).st_mode):
        raise OSError(errno.EINVAL, "not a regular file", sname)  # never a link or a FIFO
    try:
        link_or_rename_at(sfd, sname, dfd, dname)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        copy_verify_at(sfd, sname, dfd, dname, tag)
    fsync_fd(dfd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sname, dir_fd=sfd)
    with contextlib.suppress(OSError):
        fsync_fd(sfd)


def copy_verify_at(sfd: int, sname: str, dfd: int, dname: str, tag: str | None = None) -> None:
    """Copy a file to a new name on another file system, fsync, then verify it.

    The source is left in place; the caller removes it once this returns. The
    copy keeps the source's permission bits and times (never wider than the
    original: the mode is set on the copy's handle, not asked of the umask).
    """
    tmp = temp_leaf(dname, tag)
    src = os.open(sname, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sfd)
    try:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        flags |= os.O_TRUNC if tag else os.O_EXCL
        out = os.open(tmp, flags, 0o600, dir_fd=dfd)
        try:
            st = os.fstat(src)
            os.fchmod(out, stat.S_IMODE(st.st_mode) & 0o777)
            digest = hashlib.sha256()
            while chunk := os.read(src, CHUNK):
                digest.update(chunk)
                write_all(out, chunk)
            os.fsync(out)
            with contextlib.suppress(OSError):
                os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
            if _sha256_fd(out) != digest.hexdigest():
                raise OSError(errno.EIO, "copy does not match its source", dname)
        finally:
            os.close(out)
        link_or_rename_at(dfd, tmp, dfd, dname)
    finally:
        os.close(src)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dfd)


def same_content_at(
    dfd: int, name: str, size: int, inode: tuple[int, int], sha256: str | None
) -> bool:
    """Is ``name`` a regular file holding a given file: its inode, or its size and SHA-256?

    A move made by ``link()`` keeps the inode; one made by a copy across file
    systems keeps only the bytes.
    """
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        return False
    if (st.st_dev, st.st_ino) == inode:
        return True
    if sha256 is None:
        return False
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return False
    try:
        return _sha256_fd(fd) == sha256
    except OSError:
        return False
    finally:
        os.close(fd)


def _sha256_fd(fd: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


# -- the same steps by path (for the one-shot command, retry, tests) ----------------------


def write_new_file(path: Path, data: bytes, tag: str | None = None, mode: int = 0o666) -> None:
    """``write_new_at`` in ``path``'s folder (made if missing)."""
    make_dirs(path.parent)
    with folder(path.parent, ()) as dfd:
        write_new_at(dfd, path.name, data, tag, mode)


def move_no_replace(src: Path, dst: Path, tag: str | None = None) -> None:
    """``move_no_replace_at`` between two folders given by path (made if missing)."""
    make_dirs(dst.parent)
    with folder(src.parent, ()) as sfd, folder(dst.parent, ()) as dfd:
        move_no_replace_at(sfd, src.name, dfd, dst.name, tag)


def copy_verify(src: Path, dst: Path, tag: str | None = None) -> None:
    """``copy_verify_at`` between two folders given by path."""
    with folder(src.parent, ()) as sfd, folder(dst.parent, ()) as dfd:
        copy_verify_at(sfd, src.name, dfd, dst.name, tag)


def gone(path: Path) -> bool:
    """Whether nothing is at ``path`` for sure: ``lstat`` says ENOENT or ENOTDIR.

    ``os.path.lexists`` says False for any error; an error that leaves it unknown
    (EIO, a stale NFS handle, a lost share server, EACCES) is not "gone" here.
    """
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


def same_content(path: Path, size: int, inode: tuple[int, int], sha256: str | None) -> bool:
    """``same_content_at`` for a path."""
    try:
        with folder(path.parent, ()) as dfd:
            return same_content_at(dfd, path.name, size, inode, sha256)
    except OSError:
        return False


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's content, read in chunks."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _sha256_fd(fd)
    finally:
        os.close(fd)


def fit_stem(stem: str, room: int) -> str:
    """``stem``, cut at a character boundary to at most ``room`` bytes (file-system encoding)."""
    if len(os.fsencode(stem)) <= room:
        return stem
    used = 0
    for i, char in enumerate(stem):
        used += len(os.fsencode(char))
        if used > room:
            return stem[:i]
    return stem  # pragma: no cover - the whole stem fits, handled above


def numbered(stem: str, n: int, suffix: str, longest: str = "") -> str:
    """``a.mp3`` → ``a (n).mp3``: the name used when ``a.mp3`` is taken.

    A stem too long for NAME_MAX is cut (never a character in half) so that the
    name fits; with ``longest``, so that the stem also fits that longer suffix
    (``.mp3.error.json`` beside ``.mp3``), for names that must share the stem.
    """
    mark = "" if n == 0 else f" ({n})"
    tail = max(len(os.fsencode(suffix)), len(os.fsencode(longest)))
    return f"{fit_stem(stem, NAME_MAX - len(mark) - tail)}{mark}{suffix}"


def free_stems(stem: str, dirs_and_suffixes: Sequence[tuple[Path, str]]) -> Iterator[str]:
    """Yield stems (``a``, ``a (1)``, …) under which every (folder, suffix) is free.

    One stem is shared by the transcript and the moved original, so a user sees
    ``done/a (1).mp3`` beside ``a (1).txt``. A long stem is cut so that the stem
    with the longest of the suffixes fits NAME_MAX (see ``numbered``).
    """
    suffixes = [suffix for _, suffix in dirs_and_suffixes]
    longest = max(suffixes, key=lambda suffix: len(os.fsencode(suffix)), default="")
    n = 0
    while True:
        candidate = numbered(stem, n, "", longest)
        if not any(
            os.path.lexists(folder / f"{candidate}{suffix}") for folder, suffix in dirs_and_suffixes
        ):
            yield candidate
        n += 1


def remove_empty_dirs(top: Path, stop: Path) -> None:
    """Remove ``top`` and its empty parents up to (not including) ``stop``."""
    current = top
    while current != stop and stop in current.parents:
        try:
            current.rmdir()
        except OSError:
            return
        current = current.parent
