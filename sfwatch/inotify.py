"""inotify: a recursive inotify watch that leaves out the daemon's own folders.

watchdog's recursive inotify watch cannot leave out a subtree
(gorakhargosh/watchdog#212), so every rename into the work area, every sidecar and
every move into ``done/`` went through its three threads (reader, emitter,
observer) only to be dropped by our handler: about 1 ms of CPU a file at high
concurrency (docs/benchmarks.md). This watch adds an inotify watch to exactly the
folders a scan would enter (``watch.enters``: not the work area, ``done/``,
``failed/``, ignored names or links, nothing below ``MAX_DEPTH``) and turns each
event into a noted path on one thread. ``inotify_simple`` is the thin layer over
the system calls.

What each event means here:

- a name created, written and closed, modified or moved in or out of a watched
  folder → that path is noted (settle and intake decide the rest);
- a folder created or moved in → its watches are added first, then it and the
  files found in it are noted, so every file that arrived before the watch is too;
- a folder moved out → the watches below it are removed (inotify would go on
  reporting them under their old path);
- the watched folder itself deleted, moved or unmounted → the reader ends, and
  intake restarts the watch (``Watcher.alive``);
- a queue overflow → the missing watches are added again and a rescan requested.

A folder that cannot be watched (no permission, gone, replaced by a file or a
link) is skipped: intake logs why when it looks at the noted path; any other
error for one folder (a path too long, EIO) is logged (``sfwatch.watch_failed``)
and that folder skipped, never the whole watch ended. Reaching the kernel's watch
limit is logged once (``sfwatch.watch_limit_reached``); the periodic rescan still
finds the files of folders without a watch.

Watches are added by *path* when an event is handled, which may be later than
the event: a rename is trusted to have moved a watched folder only if its new
path still holds the watched inode (``_moved``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import threading
from collections.abc import Callable

from inotify_simple import INotify, flags

from sfwatch.logs import get_logger

#: the events of a watched folder worth noting; opens, reads, attribute changes
#: and deletions (ours included) are not
FOLDER_MASK = (
    flags.CREATE
    | flags.MODIFY
    | flags.CLOSE_WRITE
    | flags.MOVED_FROM
    | flags.MOVED_TO
    | flags.DELETE_SELF
    | flags.MOVE_SELF
    | flags.ONLYDIR  # a name replaced by a file between listing and watching: skip it
    | flags.DONT_FOLLOW  # ... or by a symlink: links are never followed
    | flags.EXCL_UNLINK  # no events for names already unlinked (a claimed file's temp)
)
#: the watched folder itself is gone: its watch ends, and with it this reader
_ROOT_GONE = flags.DELETE_SELF | flags.MOVE_SELF | flags.UNMOUNT | flags.IGNORED
#: add_watch errors that mean "this folder is not there to watch any more": not logged
_GONE = {errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ELOOP}


class InotifyTree:
    """One inotify instance and reader thread for a watched folder and the folders below it.

    ``enters(path, level)``: would a scan enter this folder (``level`` folders below
    the root)? ``takes(name)``: could a file of this name be taken? An event about a
    file that could not is not noted (our own transcripts and temporary files: the
    work loop need not ``lstat`` them). ``owns(path)``: is the file at ``path`` this
    process's to take (``workers: N``: ``workers.Share.owns``)? An event about
    another worker's file is not noted either: that worker notes it, and the kernel
    says the path is no folder (``IN_ISDIR`` unset), which is all the work loop's
    ``lstat`` would have found out before it let the path go. ``note(path)``:
    something happened at ``path``. ``overflowed()``: the kernel dropped events.
    """

    def __init__(
        self,
        root: str,
        *,
        enters: Callable[[str, int], bool],
        note: Callable[[str], None],
        overflowed: Callable[[], None],
        takes: Callable[[str], bool] | None = None,
        owns: Callable[[str], bool] | None = None,
    ) -> None:
        self.root = root
        self.enters = enters
        self.takes = takes
        self.owns = owns
        self.note = note
        self.overflowed = overflowed
        self.log = get_logger()
        #: what ended the reader, if an exception did
        self.error: BaseException | None = None
        self._inotify = INotify()  # OSError (EMFILE) at fs.inotify.max_user_instances
        self._paths: dict[int, str] = {}  # watch descriptor → folder path
        self._levels: dict[int, int] = {}  # watch descriptor → folders below the root
        self._wds: dict[str, int] = {}  # folder path → watch descriptor
        self._limit_logged = False
        self._renames: dict[int, tuple[str, int]] = {}  # cookie → (old path, level)
        self._stopped = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name="sfwatch-inotify", daemon=True)

    # -- the life of the reader ------------------------------------------------------

    def start(self) -> None:
        """Watch the root and every folder below it a scan would enter, then start reading.

        Raises ``OSError`` if the root itself cannot be watched; its descriptors are
        closed then (intake retries a failed start every few seconds, for months).
        """
        try:
            root_wd = self._inotify.add_watch(self.root, FOLDER_MASK)
            self._remember(root_wd, self.root, 0)
            self._add_below(self.root, 0)
            self._thread.start()
        except BaseException:
            self.stop()
            raise

    def fileno(self) -> int:
        """The inotify descriptor (``/proc/self/fdinfo/<fd>`` lists its watches' inodes)."""
        return int(self._inotify.fileno())

    def is_alive(self) -> bool:
        """Is the reader thread running?"""
        return self._thread.is_alive()

    def stop(self) -> None:
        """End the reader (it returns within a read) and release its descriptors.

        A reader busy past the join's timeout (re-adding a big tree's watches) closes
        them itself when it ends: closed under it, their numbers could be reused.
        """
        if self._stopped:
            return
        self._stopped = True
        os.write(self._wake_w, b"x")
        if self._thread.ident is not None:
            self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._close()

    def _close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._inotify.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._inotify.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while not self._stopped:
                ready = {fd for fd, _ in poller.poll()}
                if self._wake_r in ready or self._stopped:
                    return
                if not self._handle(self._inotify.read(timeout=0)):
                    return
        except Exception as exc:  # noqa: BLE001 - the thread ends; intake restarts the watch
            self.error = exc
        finally:
            if self._stopped:
                self._close()  # stop() gave up waiting for us

    # -- events ----------------------------------------------------------------------

    def _handle(self, events: list[tuple[int, int, int, str]]) -> bool:
        """Note what ``events`` name; False once the root's own watch has ended."""
        for i, (wd, mask, cookie, name) in enumerate(events):
            if mask & flags.Q_OVERFLOW:
                self.log.warning("sfwatch.events_overflowed", path=self.root)
                self._rebuild()
                self.overflowed()
                continue
            folder = self._paths.get(wd)
            if folder is None:
                continue  # a watch removed a moment ago: its last events are stale
            if not name:  # an event about the watched folder itself
                if mask & _ROOT_GONE:
                    if wd == self._wds.get(self.root):
                        return False
                    if mask & flags.IGNORED:
                        self._forget(wd)
                continue
            path, level = f"{folder}{os.sep}{name}", self._levels[wd] + 1
            if mask & flags.ISDIR:
                if mask & flags.MOVED_FROM:
                    self._moved_from(path, level, cookie, events[i + 1 : i + 2])
                elif mask & flags.MOVED_TO and cookie in self._renames:
                    self._moved(*self._renames.pop(cookie), path, level)
                elif mask & (flags.CREATE | flags.MOVED_TO):
                    self._add_tree(path, level)
            elif not self._taken(name, path):
                continue  # not a folder, and not a file this process could take
            self.note(path)
        for old, _ in self._renames.values():  # the other half was not for a watched folder
            self._remove_tree(old)
        self._renames.clear()
        return True

    def _taken(self, name: str, path: str) -> bool:
        """Could the file ``name`` at ``path`` (not a folder) be taken by this process?"""
        if self.takes is not None and not self.takes(name):
            return False
        return self.owns is None or self.owns(path)

    def _moved_from(
        self, path: str, level: int, cookie: int, after: list[tuple[int, int, int, str]]
    ) -> None:
        """A folder renamed away: kept for its other half, or no longer watched.

        The kernel queues both halves of a rename one after the other; a folder
        renamed within the tree keeps its watches (under the new path), one moved
        out of it (or into ``done/``, which is not watched) loses them before any
        later event could be reported under its old path.
        """
        if after and after[0][2] == cookie and after[0][1] & flags.MOVED_TO:
            self._renames[cookie] = (path, level)
        else:
            self._remove_tree(path)

    def _moved(self, old: str, old_level: int, new: str, level: int) -> None:
        """A folder renamed within the tree: re-label its watches, or redo them.

        Re-labelling is right only if ``new`` still holds the inode watched as
        ``old`` (``mkdir x; mv x y; mkdir x`` before we read: the watch added "for
        x" is the second x's). Otherwise the old watches go and ``new`` gets its
        own; intake walks ``new`` (it is noted) for what arrived in between.
        """
        wd = self._wds.get(old)
        if wd is None or level != old_level or not self.enters(new, level):
            self._remove_tree(old)
            self._add_tree(new, level)
            return
        try:
            same = self._inotify.add_watch(new, FOLDER_MASK) == wd
        except OSError:
            same = False
        if not same:
            self._remove_tree(old)
            self._add_tree(new, level)
            return
        prefix = f"{old}{os.sep}"
        moved = sorted(p for p in self._wds if p == old or p.startswith(prefix))
        for path in moved:
            wd = self._wds.pop(path)
            self._remember(wd, new + path[len(old) :], self._levels[wd])
        for path in moved:  # parents first: a subfolder may now be, say, the done_dir
            relabelled = new + path[len(old) :]
            kept = self._wds.get(relabelled)
            if kept is not None and not self.enters(relabelled, self._levels[kept]):
                self._remove_tree(relabelled)

    # -- watches ---------------------------------------------------------------------

    def _add_tree(self, path: str, level: int) -> None:
        """Watch ``path`` (a folder just made or moved in) and the folders below it.

        Files already in them are noted too: a file written between the folder's
        creation and its watch raised no event, and the listing that finds the
        subfolders (made after the watch, so nothing falls between) sees it anyway.
        """
        if self._enter(path, level):
            self._add_below(path, level, note_files=True)

    def _add_below(self, top: str, top_level: int, *, note_files: bool = False) -> None:
        """Watch every folder below ``top`` that a scan would enter; a stack, not recursion."""
        stack = [(top, top_level)]
        while stack:
            folder, level = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue  # unreadable or gone: intake says why when it looks
            for entry in entries:
                if not entry.is_dir(follow_symlinks=False):
                    if note_files and self._taken(entry.name, entry.path):
                        self.note(entry.path)
                    continue
                if self._enter(entry.path, level + 1):
                    stack.append((entry.path, level + 1))

    def _enter(self, path: str, level: int) -> bool:
        """Watch one folder if a scan would enter it; False if not, or if it cannot be."""
        if not self.enters(path, level):
            return False
        try:
            wd = self._inotify.add_watch(path, FOLDER_MASK)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self._limit_reached(path)
            elif exc.errno not in _GONE:
                self.log.warning("sfwatch.watch_failed", path=path, error=str(exc))
            return False
        old = self._paths.get(wd)
        if old is not None and old != path:
            self._wds.pop(old, None)  # the same folder, moved: it has one watch
        self._remember(wd, path, level)
        return True

    def _rebuild(self) -> None:
        """After an overflow: every watch below the root again, from what is there now.

        The events lost may have moved folders in, out or around; only a fresh
        look knows where they are. The old watches' last events are dropped as stale.
        """
        root_wd = self._wds[self.root]
        for wd in [wd for wd in self._paths if wd != root_wd]:
            self._unwatch(wd)
        self._add_below(self.root, 0)

    def _remember(self, wd: int, path: str, level: int) -> None:
        self._paths[wd], self._levels[wd], self._wds[path] = path, level, wd

    def _forget(self, wd: int) -> None:
        path = self._paths.pop(wd, None)
        self._levels.pop(wd, None)
        if path is not None and self._wds.get(path) == wd:
            del self._wds[path]

    def _remove_tree(self, path: str) -> None:
        """Stop watching ``path`` and everything below it (it moved away)."""
        prefix = f"{path}{os.sep}"
        for folder in [p for p in self._wds if p == path or p.startswith(prefix)]:
            self._unwatch(self._wds[folder])

    def _unwatch(self, wd: int) -> None:
        self._forget(wd)
        # EINVAL: the kernel ended the watch already (the folder is gone)
        with contextlib.suppress(OSError):
            self._inotify.rm_watch(wd)

    def _limit_reached(self, path: str) -> None:
        if self._limit_logged:
            return
        self._limit_logged = True
        self.log.warning(
            "sfwatch.watch_limit_reached",
            path=path,
            watches=len(self._paths),
            hint="raise the sysctl fs.inotify.max_user_watches; until then the "
            "periodic rescan finds the files of folders without a watch",
        )
