"""Folder handles: reach below a trusted root without following any link.

The share is not trusted (docs/design.md §11): anyone who can write to a watched
folder can replace a folder with a symlink at any moment (also *between* our
check and our use). So nothing below a trusted root is ever reached by path.
A folder is opened one component at a time with ``O_NOFOLLOW | O_DIRECTORY``
from its parent's handle, and every step then acts on handles (``*at`` calls:
``dir_fd=`` in Python). A swapped component can make a step fail (ELOOP,
ENOTDIR: a ``finish_error``, tried again later), never send it elsewhere.

The trusted roots are the configured folders themselves (``watch.path``,
``done_dir``, …): an administrator may well have made one a symlink. Everything
*below* them is the share's.

The work area (``<watched>/.sfwatch``) is the daemon's alone: created 0700 and
checked on every use to be a real folder owned by the daemon's user that nobody
else may write to (``WorkArea``).

Handles of folders inside the work area are kept open between uses (a bounded
cache): a use checks with one ``lstat`` that ``<watched>/.sfwatch`` is still the
private folder the handle was opened in, and with one ``fstat`` that the folder
was not removed. Only our user can change anything inside a private folder, so
that is the same guarantee as walking it again — at 3 system calls, not 17
(each of which hands the GIL to another thread: docs/benchmarks.md). A folder
*below* a kept one (a job's) is opened straight from the kept handle, without
copying or ``fstat``-ing it: nothing can be found or made in a removed folder,
so a miss there is what sends us to the check. The daemon keeps them only while
it has work in flight (``let_go``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sfwatch.logs import get_logger

#: how a folder below a root is opened: never through a symlink
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: how a root (trusted, maybe a symlink the administrator made) is opened
ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
#: the work area's mode, whatever the umask
PRIVATE_DIR = 0o700
#: the name of the work area in a watched folder
WORK_AREA = ".sfwatch"


class UnsafeFolder(OSError):
    """A folder we must use is not what it must be (a symlink, a file, not ours)."""


def _check_part(part: str) -> None:
    if part in ("", ".", "..") or "/" in part or "\0" in part:
        raise UnsafeFolder(errno.EINVAL, f"{part!r} is not a plain folder name")


def open_below(
    root: Path | int,
    parts: Sequence[str],
    *,
    create: bool = False,
    mode: int = 0o777,
    durable: bool = True,
) -> int:
    """A handle of ``root/parts[0]/…``; no symlink below ``root`` is followed.

    ``root`` is a path (opened as given) or a handle (kept open). With
    ``create``, missing folders are made with ``mode`` (the umask applies) and,
    if ``durable``, made durable in their parents (else the caller sees to it).
    The caller closes the returned handle.
    """
    # A handle given is walked from, not copied: every system call here hands the
    # interpreter lock to another thread and back (docs/benchmarks.md).
    owned = not isinstance(root, int)
    fd = os.open(root, ROOT_FLAGS) if not isinstance(root, int) else root
    try:
        for depth, part in enumerate(parts, 1):
            _check_part(part)
            try:
                child = _open_child(fd, part, root, parts, depth)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, mode, dir_fd=fd)
                    if durable:
                        fsync_fd(fd)
                child = _open_child(fd, part, root, parts, depth)
            if owned:
                os.close(fd)
            fd, owned = child, True
    except BaseException:
        if owned:
            os.close(fd)
        raise
    return fd if owned else os.dup(fd)  # (no parts: the caller closes a copy)


def _open_child(dfd: int, name: str, root: Path | int, parts: Sequence[str], depth: int) -> int:
    """Open folder ``name`` in an open folder, never through a link (UnsafeFolder says why).

    ``root`` and ``parts[:depth]``: where it is, for the message (made only when there is one:
    building paths costs more than the system call, docs/benchmarks.md).
    """
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dfd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        shown = (Path(f"<fd {root}>") if isinstance(root, int) else root).joinpath(*parts[:depth])
        st = lstat_at(dfd, name)
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise UnsafeFolder(
                errno.ELOOP, f"{shown} is a symlink (links in a watched tree are never followed)"
            ) from None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise UnsafeFolder(errno.ENOTDIR, f"{shown} is not a folder") from None
        raise exc from None


def lstat_at(dfd: int, name: str) -> os.stat_result | None:
    """``lstat`` of ``name`` in a folder; None if there is no such name."""
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def read_at(dfd: int, name: str, limit: int = 1 << 20) -> bytes:
    """Up to ``limit`` bytes of a regular file in a folder; never a link, FIFO or device."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", name)
        chunks: list[bytes] = []
        left = limit
        while left > 0 and (chunk := os.read(fd, min(1 << 16, left))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def scan_dir(dfd: int) -> Iterator[os.DirEntry[str]]:
    """The entries of an open folder (``scandir`` on the handle)."""
    with os.scandir(dfd) as entries:
        yield from entries


@contextmanager
def folder(
    root: Path | int, parts: Sequence[str], *, create: bool = False, mode: int = 0o777
) -> Iterator[int]:
    """``open_below`` as a context manager that closes the handle."""
    fd = open_below(root, parts, create=create, mode=mode)
    try:
        yield fd
    finally:
        os.close(fd)


#: errno values meaning "this file system cannot fsync a directory" (some FUSE, SMB)
NO_DIR_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES}


def fsync_fd(fd: int) -> None:
    """Make a folder's entries durable, where the file system can (some FUSE/SMB cannot)."""
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in NO_DIR_FSYNC:
            raise


def anchored(path: Path, roots: Sequence[Path | None]) -> tuple[Path, tuple[str, ...]]:
    """Split ``path`` into the first trusted root containing it and the parts below.

    The order of ``roots`` matters: the watched folder comes first, so that a
    ``done/`` inside it is reached through the share's own (untrusted) entry.
    """
    for root in roots:
        if root is None:
            continue
        try:
            rel = path.relative_to(root)
        except ValueError:
            continue
        return root, PurePosixPath(rel.as_posix()).parts if str(rel) != "." else ()
    raise UnsafeFolder(errno.EPERM, f"{path} is under no configured folder")


#: this process's user (it never changes: asked once, not at every check)
EUID = os.geteuid()
#: work-area folder handles kept open (all work areas together; the oldest are closed)
MAX_CACHED_HANDLES = 64
#: how deep below ``.sfwatch`` handles are kept (``work/<instance>``, ``tmp/<instance>``)
KEPT_DEPTH = 2


def is_private(st: os.stat_result) -> bool:
    """A folder only this process's user may change."""
    return stat.S_ISDIR(st.st_mode) and st.st_uid == EUID and not st.st_mode & 0o022


@dataclass(eq=False)
class _Kept:
    """One kept handle: closed when dropped and no thread is copying it."""

    fd: int
    area_id: tuple[int, int]
    users: int = 0
    dead: bool = False


class _Handles:
    """Open handles of work-area folders: (root, parts) → handle and ``.sfwatch``'s id.

    The lock guards only the table (no system call runs under it: 64 upload threads
    ask at once); a handle being copied is closed by its last user once dropped.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: OrderedDict[tuple[Path, tuple[str, ...]], _Kept] = OrderedDict()
        self._dead: list[_Kept] = []

    def get(self, key: tuple[Path, tuple[str, ...]], area: os.stat_result) -> int | None:
        """A new handle of the folder, if it is still where and what it was; else None."""
        with self._lock:
            kept = self._open.get(key)
            if kept is None:
                return None
            if kept.area_id != (area.st_dev, area.st_ino):
                self._forget(key)
                kept = None
            else:
                kept.users += 1
                self._open.move_to_end(key)
        if kept is None:
            self._close_dead()
            return None
        try:
            fd = os.dup(kept.fd)
        finally:
            with self._lock:
                kept.users -= 1
            self._close_dead()
        try:
            removed = os.fstat(fd).st_nlink == 0  # (by us, or by root)
        except OSError:  # (ESTALE: removed on an NFS server)
            removed = True
        if removed:
            os.close(fd)
            with self._lock:
                if self._open.get(key) is kept:
                    self._forget(key)
            self._close_dead()
            return None
        return fd

    @contextmanager
    def lent(self, key: tuple[Path, tuple[str, ...]], area: os.stat_result) -> Iterator[int | None]:
        """The kept handle itself, not a copy, for the block; None as for ``get``.

        Not checked for removal: a caller that only opens something below it learns
        of that from the open (nothing is found in, or made in, a removed folder)
        and then asks ``get``, which checks and forgets it.
        """
        with self._lock:
            kept = self._open.get(key)
            if kept is not None and kept.area_id == (area.st_dev, area.st_ino):
                kept.users += 1
                self._open.move_to_end(key)
            else:
                kept = None
        if kept is None:
            yield None
            return
        try:
            yield kept.fd
        finally:
            with self._lock:
                kept.users -= 1
            self._close_dead()

    def put(self, key: tuple[Path, tuple[str, ...]], fd: int, area_id: tuple[int, int]) -> None:
        """Keep a copy of ``fd`` (the caller keeps its own)."""
        kept = _Kept(os.dup(fd), area_id)
        with self._lock:
            if key in self._open:
                self._forget(key)
            self._open[key] = kept
            while len(self._open) > MAX_CACHED_HANDLES:
                self._forget(next(iter(self._open)))
        self._close_dead()

    def drop(self, root: Path | None = None) -> None:
        """Close the kept handles of one watched folder's work area (None: of all)."""
        if not self._open:  # (an idle daemon asks at every tick)
            return
        with self._lock:
            for key in [key for key in self._open if root is None or key[0] == root]:
                self._forget(key)
        self._close_dead()

    def _forget(self, key: tuple[Path, tuple[str, ...]]) -> None:
        """Take ``key`` out of the table (with the lock held); closed by ``_close_dead``."""
        kept = self._open.pop(key)
        kept.dead = True
        self._dead.append(kept)

    def _close_dead(self) -> None:
        """Close the dropped handles nobody is copying (outside the lock)."""
        if not self._dead:  # (the common case; one left over is closed by the next call)
            return
        with self._lock:
            ready = [kept for kept in self._dead if kept.users == 0]
            self._dead = [kept for kept in self._dead if kept.users > 0]
        for kept in ready:
            os.close(kept.fd)


_handles = _Handles()


def _alive(fd: int) -> bool:
    """The folder of ``fd`` was not removed (an NFS ESTALE counts as removed)."""
    try:
        return os.fstat(fd).st_nlink > 0
    except OSError:
        return False


def let_go() -> None:
    """Close every kept work-area handle (the daemon does when it has nothing in flight).

    A kept handle pins the folders above it: a watched folder removed while we hold
    one is not gone (its observer hears nothing) until we let go.
    """
    _handles.drop()


class WorkArea:
    """``<watched>/.sfwatch``, checked on every use (see the module docstring).

    A work area that is not a real folder owned by our user is refused with one
    error line (per folder, until it is fixed). One of ours that others may
    write to (made by an older version under a 0007 umask) is narrowed to 0700
    with a warning: it is ours to narrow, and what others put inside is theirs,
    never taken (``is_private`` is asked of every folder below it too).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        #: where it is (for logs; never for acting); its lstat (``_private_area``) is asked
        #: a dozen times a file, so the path is made once
        self.path = root / WORK_AREA
        self._path = os.fspath(self.path)
        self.log = get_logger()
        self._refused = False
        self._lock = threading.Lock()

    def open(self, parts: Sequence[str] = (), *, create: bool = True) -> int:
        """A handle of ``.sfwatch/<parts>``, every folder checked; the caller closes it.

        A handle kept from an earlier use is given (a copy) while ``.sfwatch`` is
        still the same private folder (see the module docstring).
        """
        # Kept: ``.sfwatch`` and the two levels below (``work/<instance>``); a job's own
        # folders come and go, so they are walked from there.
        kept_parts, below = tuple(parts[:KEPT_DEPTH]), list(parts[KEPT_DEPTH:])
        key = (self.root, kept_parts)
        area = self._private_area()
        if area is not None:
            if below and (child := self._below_kept(key, area, below[0], create=create)) >= 0:
                where = (*kept_parts, below[0])
                self._check_or_close(child, where)
                return self._below(child, where, below[1:], create=create)
            if (kept := _handles.get(key, area)) is not None:
                return self._below(kept, kept_parts, below, create=create)
        else:
            # Gone or replaced: let go of its folders at once. A kept handle pins the
            # folders above it, so a removed watched folder would not be gone (its
            # observer would never hear that it was removed) until we did.
            _handles.drop(self.root)
        fd = open_below(self.root, [WORK_AREA], create=create, mode=PRIVATE_DIR)
        try:
            area = self._check(fd, ())
        except BaseException:
            os.close(fd)
            raise
        fd = self._below(fd, (), list(kept_parts), create=create)
        try:
            _handles.put(key, fd, (area.st_dev, area.st_ino))
        except BaseException:
            os.close(fd)
            raise
        fd = self._below(fd, kept_parts, below, create=create)
        if self._refused:
            self._refused = False
            self.log.info("sfwatch.work_area_accepted", path=str(self.path))
        return fd

    def holds_folder(self, parts: Sequence[str], name: str) -> bool:
        """Whether ``.sfwatch/<parts>`` has a folder ``name`` (not a link): three system
        calls when ``parts`` is a kept folder (``folder`` lends it). A missing or refused
        area, or an error (ESTALE on NFS), holds nothing."""
        _check_part(name)
        try:
            with self.folder(parts, create=False) as fd:
                st = lstat_at(fd, name)
        except OSError:
            return False
        return st is not None and stat.S_ISDIR(st.st_mode)

    def _below_kept(
        self, key: tuple[Path, tuple[str, ...]], area: os.stat_result, part: str, *, create: bool
    ) -> int:
        """A handle of ``part`` in a kept folder, opened from the kept handle (no copy
        of it, no ``fstat`` of it: three system calls fewer); -1 if that is not for
        sure (nothing kept, or ``part`` not found: maybe the kept folder was removed;
        ``get`` checks)."""
        with _handles.lent(key, area) as kept:
            if kept is None:
                return -1
            try:
                return open_below(kept, [part], create=create, mode=PRIVATE_DIR)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ESTALE):  # (removed here, or by NFS)
                    return -1
                raise

    def _check_or_close(self, fd: int, where: tuple[str, ...]) -> None:
        try:
            self._check(fd, where)
        except BaseException:
            os.close(fd)
            raise

    def _below(self, fd: int, where: tuple[str, ...], parts: list[str], *, create: bool) -> int:
        """Walk ``parts`` down from ``fd`` (at ``.sfwatch/<where>``; consumed), checking
        every folder."""
        try:
            for part in parts:
                child = open_below(fd, [part], create=create, mode=PRIVATE_DIR)
                os.close(fd)
                fd = child
                where = (*where, part)
                self._check(fd, where)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextmanager
    def folder(self, parts: Sequence[str] = (), *, create: bool = True) -> Iterator[int]:
        """``open`` as a context manager that closes the handle.

        A kept folder itself (``work/<instance>``, ``tmp/<instance>``: asked a few
        times a file) is lent for the block, not copied: its removal checked with one
        ``fstat`` instead of a copy, an ``fstat`` and a ``close``.
        """
        if len(parts) == KEPT_DEPTH and (area := self._private_area()) is not None:
            with _handles.lent((self.root, tuple(parts)), area) as kept:
                if kept is not None and _alive(kept):
                    yield kept
                    return
        fd = self.open(parts, create=create)
        try:
            yield fd
        finally:
            os.close(fd)

    def _private_area(self) -> os.stat_result | None:
        """The ``lstat`` of ``.sfwatch`` if it is a private folder; else None."""
        try:
            area = os.lstat(self._path)
        except OSError:
            return None
        return area if is_private(area) else None

    def _check(self, fd: int, parts: tuple[str, ...]) -> os.stat_result:
        """The folder's stat, once it is private (narrowed if ours); UnsafeFolder if not ours.

        ``parts``: where it is below ``.sfwatch`` (a path is made only for a message).
        """
        st = os.fstat(fd)
        if is_private(st):
            return st
        where = self.path.joinpath(*parts)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == EUID:
            with self._lock:
                os.fchmod(fd, PRIVATE_DIR)
            self.log.warning(
                "sfwatch.work_area_narrowed",
                path=str(where),
                was=oct(stat.S_IMODE(st.st_mode)),
                now=oct(PRIVATE_DIR),
            )
            return os.fstat(fd)
        if not self._refused:
            self._refused = True
            self.log.error(
                "sfwatch.work_area_refused",
                path=str(where),
                owner_uid=st.st_uid,
                mode=oct(stat.S_IMODE(st.st_mode)),
                fix=f"remove it; sfwatch makes its own (0700, owned by uid {EUID})",
            )
        raise UnsafeFolder(errno.EPERM, f"work area {where} is not sfwatch's own folder")


_areas: dict[Path, WorkArea] = {}
_areas_lock = threading.Lock()


def work_area(root: Path) -> WorkArea:
    """The ``WorkArea`` of a watched folder (one per folder, so refusals are logged once)."""
    area = _areas.get(root)  # (the common case needs no lock: entries are never replaced)
    if area is not None:
        return area
    with _areas_lock:
        area = _areas.get(root)
        if area is None:
            area = _areas[root] = WorkArea(root)
        return area
