"""watch: notice paths that may hold new files; nothing more.

One watch per watched folder: our own inotify reader on local disks
(``inotify.InotifyTree``: it leaves out the work area, ``done/`` and ``failed/``,
which watchdog's recursive watch cannot), watchdog's polling observer on network
and FUSE mounts, where inotify sees only local writers. Either only notes paths
in a ``PathNotes`` set; the scheduler drains it. A scan at start-up and a
periodic rescan catch whatever events missed (files present before start, an
inotify queue overflow, a network share's remote writers).
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.polling import PollingObserverVFS

from sfwatch.config import WatchConfig
from sfwatch.inotify import InotifyTree

#: names that are never audio we should take: temp files, OS and NAS litter
IGNORED_NAMES = (
    ".*",
    "*.part",
    "*.tmp",
    "*.crdownload",
    "~$*",
    "@eaDir",
    "Thumbs.db",
    ".DS_Store",
    "#recycle",
    "$RECYCLE.BIN",
    "lost+found",
)
#: file systems where inotify misses other machines' writes
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "afs")
#: the events worth noting when polling; opens and reads (ours included) are not
_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileClosedEvent,
    DirCreatedEvent,
    DirMovedEvent,
]
#: folder levels below a watched path that are looked into: ``inbox/1/…/64/a.mp3`` is
#: taken, anything deeper is not (``sfwatch.file_skipped`` reason ``too_deep``, naming
#: the first folder not looked into). No walk, watch or path of ours grows with a tree
#: someone made a thousand levels deep.
MAX_DEPTH = 64


class PathNotes:
    """A thread-safe set of paths noted by observers and scans, drained by the scheduler."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: set[str] = set()
        self.wakeup = threading.Event()
        self.rescan_requested = threading.Event()

    def note(self, path: str) -> None:
        """Remember that something happened at ``path``."""
        with self._lock:
            self._paths.add(path)
        self.wakeup.set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._paths)

    def drain(self, limit: int | None = None) -> set[str]:
        """Take every noted path, or up to ``limit`` of them (the wakeup stays set for the rest)."""
        with self._lock:
            if limit is None or len(self._paths) <= limit:
                paths, self._paths = self._paths, set()
                return paths
            paths = {self._paths.pop() for _ in range(limit)}
        self.wakeup.set()
        return paths


class _NoteHandler(FileSystemEventHandler):
    """Notes the paths an event names; filtering is settle's job, not the observer's."""

    def __init__(self, notes: PathNotes, ignored: tuple[Path, ...]) -> None:
        self.notes = notes
        # Our own work area and done/failed folders churn with every file; their
        # changes must not wake the work loop.
        self.ignored = tuple(f"{p}{os.sep}" for p in ignored)

    def on_any_event(self, event: FileSystemEvent) -> None:
        """Note both ends of a move, or the one path of anything else."""
        for raw in (event.src_path, event.dest_path):
            path = os.fsdecode(raw)
            if path and not path.startswith(self.ignored):
                self.notes.note(path)


def mount_fstype(path: Path, mountinfo: str | None = None) -> str:
    """The file-system type of the mount that holds ``path`` (from /proc/self/mountinfo)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
    # Resolve symlinks: an inbox that links into a network mount lives on that mount.
    target = os.path.realpath(path)
    best, best_type = "", ""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right:
            continue
        point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, right.split()[0]
    return best_type


def needs_polling(watch: WatchConfig, mountinfo: str | None = None) -> bool:
    """``poll: auto`` → poll on network and FUSE file systems; else what the config says."""
    if watch.poll is not None:
        return watch.poll
    fstype = mount_fstype(watch.path, mountinfo)
    return fstype in NETWORK_FS or fstype == "fuse" or fstype.startswith("fuse.")


def excluded_dirs(watch: WatchConfig) -> tuple[Path, ...]:
    """Folders under a watched path that are never looked into.

    The default ``done/`` and ``failed/`` stay excluded when ``done_dir`` or
    ``failed_dir`` point elsewhere: after such a change the files an earlier run
    put there must not be transcribed again.
    """
    defaults = (watch.path / "done", watch.path / "failed")
    return tuple(dict.fromkeys((watch.done_dir, watch.failed_dir, watch.work_dir, *defaults)))


def pruned_dirs(watch: WatchConfig) -> frozenset[str]:
    """``excluded_dirs`` as strings: what walks, polls and inotify watches never enter."""
    return frozenset(str(d) for d in excluded_dirs(watch))


def never_looks_into(folder: Path, watch: WatchConfig) -> bool:
    """Would this watch never take a file below ``folder``, a subfolder of its path?

    True when ``folder`` is (or is under) one of its excluded folders, when a
    folder name on the way matches an ignored or ``exclude`` pattern, or when
    the watch is not recursive (it takes only the files directly in its path).
    """
    if any(folder == d or folder.is_relative_to(d) for d in excluded_dirs(watch)):
        return True
    if not watch.recursive:
        return True
    return any(is_ignored_name(part, watch) for part in folder.relative_to(watch.path).parts)


@functools.lru_cache(maxsize=64)
def _matcher(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """One compiled regex for a set of case-insensitive shell patterns.

    A rescan asks this of every file in the tree: one regex match per name is
    what keeps a 10,000-file idle tree cheap (fnmatch per pattern was not).
    """
    if not patterns:
        return re.compile(r"(?!)")  # matches nothing
    return re.compile("|".join(fnmatch.translate(p.lower()) for p in patterns))


def is_ignored_name(name: str, watch: WatchConfig) -> bool:
    """True for temp and system names, and for the config's ``exclude`` patterns."""
    return _matcher((*IGNORED_NAMES, *watch.exclude)).match(name.lower()) is not None


def wants(path: Path, watch: WatchConfig) -> bool:
    """Does ``path`` (by name and place alone) belong to this watched folder's work?"""
    text, root = str(path), str(watch.path)
    if not text.startswith(root + os.sep):
        return False
    parts = text[len(root) + 1 :].split(os.sep)  # noqa: PTH206 - str ops: called per file
    if not watch.recursive and len(parts) > 1:
        return False
    if len(parts) - 1 > MAX_DEPTH:
        return False
    for folder in excluded_dirs(watch):
        excluded = str(folder)
        if text == excluded or text.startswith(excluded + os.sep):
            return False
    if any(is_ignored_name(part, watch) for part in parts):
        return False
    return _matcher(watch.include).match(parts[-1].lower()) is not None


def too_deep(path: Path, root: Path, *, folder: bool = False) -> Path | None:
    """The first folder not looked into on the way to ``path``, if ``path`` is too deep.

    Files may sit up to ``MAX_DEPTH`` folders below ``root``; a folder at level
    ``MAX_DEPTH + 1`` is not entered, and nothing below it is taken. ``folder``:
    ``path`` is itself a folder (so its own level counts).
    """
    parts = path.relative_to(root).parts
    levels = len(parts) if folder else len(parts) - 1
    if levels <= MAX_DEPTH:
        return None
    return root.joinpath(*parts[: MAX_DEPTH + 1])


def scan(
    watch: WatchConfig, on_file: Callable[[str], None], stop: threading.Event | None = None
) -> int:
    """Walk the watched folder and call ``on_file`` for each wanted file; return the count.

    A folder that cannot be listed (no permission), or is too deep to look into
    (``MAX_DEPTH``), is passed to ``on_file`` too, so that the daemon can say
    why its files are not taken.

    Symlinks are not followed (a link may point anywhere on the system), and the
    done, failed and work folders are pruned.
    """
    return _walk(watch, watch.path, on_file, stop)


def walk_dir(path: Path, watch: WatchConfig) -> list[str]:
    """What ``scan`` would find below ``path`` (a folder moved into a watched tree)."""
    found: list[str] = []
    _walk(watch, path, found.append)
    return found


def _walk(
    watch: WatchConfig,
    start: Path,
    on_path: Callable[[str], None],
    stop: threading.Event | None = None,
) -> int:
    """``scan`` from ``start`` (the watched folder or one below it), with a stack.

    Never recursion: a tree can be deeper than Python's recursion limit. Nor does
    it go below ``MAX_DEPTH``, so its cost does not grow with a tree's depth.
    """
    pruned = pruned_dirs(watch)
    count = 0
    stack = [(str(start), len(start.relative_to(watch.path).parts))]
    while stack:
        if stop is not None and stop.is_set():
            break
        top, level = stack.pop()
        try:
            entries = list(os.scandir(top))
        except OSError:
            if top != str(start):
                on_path(top)  # a folder we may not enter: the daemon logs it
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if (
                    watch.recursive
                    and entry.path not in pruned
                    and not is_ignored_name(entry.name, watch)
                ):
                    if level + 1 > MAX_DEPTH:
                        on_path(entry.path)  # too deep to look into: the daemon logs it
                    else:
                        stack.append((entry.path, level + 1))
            elif entry.path not in pruned and _wanted_name(entry.name, watch):
                on_path(entry.path)  # (``wants``, minus what entering the folder checked)
                count += 1
    return count


def _wanted_name(name: str, watch: WatchConfig) -> bool:
    """``wants`` for a file in a folder a walk entered: its name decides.

    A rescan asks this of every file in the tree, so it is two regex matches,
    include first (most names in a big tree are transcripts and other files).
    """
    lowered = name.lower()
    return _matcher(watch.include).match(lowered) is not None and not is_ignored_name(name, watch)


def utf8_name(path: Path, root: Path) -> bool:
    """Is ``path`` below ``root`` valid UTF-8? (Other bytes arrive as lone surrogates.)"""
    try:
        str(path.relative_to(root)).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def under_link(path: Path, root: Path) -> bool:
    """Is a folder between ``root`` and ``path`` a symlink? (Links are never followed.)"""
    parent = path.parent
    while parent != root and root in parent.parents:
        if parent.is_symlink():
            return True
        parent = parent.parent
    return False


def wants_dir(path: Path, watch: WatchConfig) -> bool:
    """Should a scan descend into ``path``?"""
    if path.is_symlink() or not watch.recursive:
        return False
    if any(path == d or d in path.parents for d in excluded_dirs(watch)):
        return False
    return not is_ignored_name(path.name, watch)


def polling_listdir(watch: WatchConfig) -> Callable[[str | None], Iterator[os.DirEntry[str]]]:
    """``os.scandir`` for the polling observer: folders and wanted files, where a scan goes.

    watchdog's snapshot stats every entry of every folder it lists, every poll
    (twice: ``lstat`` and ``statx``). Listing nothing in the work area, ``done/``,
    ``failed/``, ignored folders and below ``MAX_DEPTH``, and only the names a scan
    would take elsewhere, keeps a poll to what can be work (and stops its
    recursion where the scan stops, however deep the tree is). A transcript, a
    picture or a ``.part`` renamed to ``.mp3`` is still seen: by its new name.
    """
    root = str(watch.path)
    prefix = f"{root}{os.sep}"
    pruned = pruned_dirs(watch)
    wanted = functools.partial(_wanted_name, watch=watch)

    def listdir(path: str | None) -> Iterator[os.DirEntry[str]]:
        if path is None:
            return os.scandir()
        if path.startswith(prefix):
            level = path.count(os.sep, len(prefix)) + 1
            if not enters(path, level, watch=watch, pruned=pruned):
                return iter(())
        with os.scandir(path) as entries:
            kept = [e for e in entries if e.is_dir(follow_symlinks=False) or wanted(e.name)]
        return iter(kept)

    return listdir


def enters(path: str, level: int, *, watch: WatchConfig, pruned: frozenset[str]) -> bool:
    """Would a scan go into the folder ``path``, ``level`` folders below the watched one?

    ``pruned``: ``pruned_dirs(watch)``, made once by the caller. The same rules as
    ``_walk``: recursive watches only, not below ``MAX_DEPTH``, not an excluded
    folder, not an ignored or excluded name.
    """
    if not watch.recursive or level > MAX_DEPTH or path in pruned:
        return False
    return not is_ignored_name(os.path.basename(path), watch)  # noqa: PTH119 - str, per event


class Watcher:
    """The watch of one folder: our inotify reader, or watchdog's polling observer."""

    def __init__(
        self, watch: WatchConfig, notes: PathNotes, owns: Callable[[str], bool] | None = None
    ) -> None:
        self.watch = watch
        self.notes = notes
        self.polling = needs_polling(watch)
        self.observer: PollingObserverVFS | InotifyTree
        if self.polling:
            # Polling with lstat: watchdog's default (stat) would walk into symlinked folders.
            self.observer = PollingObserverVFS(os.lstat, polling_listdir(watch), polling_interval=2)
        else:
            self.observer = InotifyTree(
                str(watch.path),
                enters=functools.partial(enters, watch=watch, pruned=pruned_dirs(watch)),
                note=notes.note,
                overflowed=self._overflowed,
                takes=functools.partial(_wanted_name, watch=watch),
                owns=owns,  # (polling: intake's lstat looks first, then asks whose it is)
            )

    def start(self) -> None:
        """Create the folder if needed and start observing it."""
        try:
            self.watch.path.mkdir(parents=True, exist_ok=True)
        except OSError:
            self.stop()  # intake retries every WATCH_RETRY: leave no descriptor behind
            raise
        if isinstance(self.observer, InotifyTree):
            self.observer.start()
            return
        self.observer.schedule(
            _NoteHandler(self.notes, excluded_dirs(self.watch)),
            str(self.watch.path),
            recursive=self.watch.recursive,
            event_filter=_EVENTS,
        )
        self.observer.start()

    def _overflowed(self) -> None:
        """The kernel dropped events: only looking at the folder again recovers them."""
        self.notes.rescan_requested.set()
        self.notes.wakeup.set()

    def alive(self) -> bool:
        """Is everything that reports events running?

        The inotify reader ends on any exception and when the watched folder is
        deleted or moved; a polling observer's emitter ends when the folder is deleted.
        """
        if isinstance(self.observer, InotifyTree):
            return self.observer.is_alive()
        return all(t.is_alive() for t in (self.observer, *self.observer.emitters))

    def failure(self) -> str | None:
        """What ended the inotify reader, if an exception did (for the log line)."""
        error = getattr(self.observer, "error", None)
        return None if error is None else f"{type(error).__name__}: {error}"

    def stop(self) -> None:
        """Stop observing (returns once the reader or observer thread has ended)."""
        self.observer.stop()
        if isinstance(self.observer, PollingObserverVFS) and self.observer.is_alive():
            self.observer.join(timeout=5)
