"""Intake: the watch and settle stages, wired together for the daemon.

Observers and the scanner only *note* paths; ``take_notes`` (on the daemon's
main thread) decides what each noted path is — a folder moved in, a file worth
settling, or something to skip and say why, once — and ``settled`` hands over
the files that stopped changing. Observers that die are restarted; one that
cannot be restarted makes the daemon unhealthy, so systemd's watchdog acts.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sfwatch.config import WatchConfig
from sfwatch.folders import FolderChange, Folders
from sfwatch.logs import get_logger
from sfwatch.settle import SettledFile, Settler
from sfwatch.text import printable
from sfwatch.watch import (
    PathNotes,
    Watcher,
    is_ignored_name,
    scan,
    too_deep,
    under_link,
    utf8_name,
    walk_dir,
    wants,
    wants_dir,
)

#: how long to wait before trying again to restart an observer that failed to start
WATCH_RETRY = 30.0


#: noted paths looked at per turn of the work loop (about 20 ms of work)
NOTES_PER_TICK = 500
#: lstat errors that mean the path is not there (any more): nothing to take, nothing to say
_GONE = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EBADF}


class Intake:
    """Observers, the scanner and the settler for every watched folder."""

    def __init__(self, folders: Folders, owns: Callable[[str | Path], bool] | None = None) -> None:
        #: the folders' settings (a reload replaces them; the scanner thread reads them)
        self.folders = folders
        #: whether a file is this worker process's to take (workers.py); every file if None
        self.owns = owns
        self.log = get_logger()
        self.notes = PathNotes()
        self.settler = Settler()
        self.watchers: dict[Path, Watcher] = {}
        self.broken: dict[Path, float] = {}  # observer down: when to try again
        self.skipped: set[Path] = set()
        self.scan_done = threading.Event()
        self.stop_scanner = threading.Event()
        self.scanner: threading.Thread | None = None

    # -- observers and the scanner -------------------------------------------------

    def start(self) -> None:
        """Start an observer per folder, then the scanner (start-up scan, rescans)."""
        for watch in self.folders.watched():
            self.start_watcher(watch)
        self.scanner = threading.Thread(target=self._scan_loop, name="sfwatch-scan", daemon=True)
        self.scanner.start()

    def start_watcher(self, watch: WatchConfig) -> None:
        """Start (or restart) the observer of one folder."""
        watcher = Watcher(watch, self.notes, self.owns)
        watcher.start()
        self.watchers[watch.path] = watcher
        self.log.info(
            "sfwatch.watch_started",
            path=str(watch.path),
            polling=watcher.polling,
            recursive=watch.recursive,
        )

    def check_watchers(self) -> None:
        """Restart observers that died (a deleted folder ends inotify's reader)."""
        now = time.monotonic()
        for path, watcher in list(self.watchers.items()):
            if watcher.alive() or now < self.broken.get(path, 0.0):
                continue
            if path not in self.broken:
                self.log.error("sfwatch.watch_died", path=str(path), error=watcher.failure())
            watcher.stop()
            try:
                self.start_watcher(self.folders.for_root(path))
            except (OSError, RecursionError) as exc:
                # Unhealthy until it works again: systemd's watchdog will restart us.
                self.broken[path] = now + WATCH_RETRY
                self.log.error("sfwatch.watch_restart_failed", path=str(path), error=str(exc))
                continue
            self.broken.pop(path, None)
            self.notes.rescan_requested.set()

    def healthy(self) -> bool:
        """Every observer and the scanner running."""
        return self.problem() is None

    def problem(self) -> tuple[str, str] | None:
        """Why intake is not healthy, as (reason, detail), or None.

        ``observer_down``: an observer could not be restarted, or died and is not
        restarted yet; ``scanner_down``: the scanner thread ended. The detail names
        the watch by its key (``watch[0]``), not its path.
        """
        keys = {w.path: f"watch[{i}]" for i, w in enumerate(self.folders.watched())}
        if broken := list(self.broken):
            key = keys.get(broken[0], "a removed watch")
            return "observer_down", f"{key}: its observer could not be restarted (retrying)"
        for path, watcher in list(self.watchers.items()):
            if not watcher.alive():
                return "observer_down", f"{keys.get(path, 'a removed watch')}: its observer died"
        if self.scanner is not None and not self.scanner.is_alive():
            return "scanner_down", "the scanner thread has ended"
        return None

    def apply(self, change: FolderChange) -> list[WatchConfig]:
        """A reload (``Folders.replace``): stop removed folders' observers, (re)start the rest.

        Returns the new folders whose observer started (their left-over claims need
        recovering).
        """
        for watch in change.removed:
            self.watchers.pop(watch.path).stop()
            self.broken.pop(watch.path, None)
            self.log.info("sfwatch.watch_stopped", path=str(watch.path))
        added: list[WatchConfig] = []
        new = {w.path for w in change.added}
        restart = new | {w.path for w in change.changed}
        for watch in self.folders.watched():  # in config order, as at start-up
            path = watch.path
            if path not in restart:
                continue
            if path in self.watchers:
                self.watchers.pop(path).stop()
            try:
                self.start_watcher(watch)
            except (OSError, RecursionError) as exc:
                self.broken[path] = time.monotonic() + WATCH_RETRY
                self.log.error("sfwatch.watch_restart_failed", path=str(path), error=str(exc))
                continue
            if path in new:
                added.append(watch)
        self.notes.rescan_requested.set()
        return added

    def stop(self) -> None:
        """Stop the scanner and every observer."""
        self.stop_scanner.set()
        self.notes.rescan_requested.set()
        for watcher in self.watchers.values():
            watcher.stop()

    def _scan_loop(self) -> None:
        self._scan_all()
        self.scan_done.set()
        self.notes.wakeup.set()
        while not self.stop_scanner.is_set():
            interval = min((w.rescan_seconds for w in self.folders.watched()), default=60.0)
            self.notes.rescan_requested.wait(interval)
            if self.stop_scanner.is_set():
                return
            self.notes.rescan_requested.clear()
            self._scan_all()

    def _scan_all(self) -> None:
        for watch in self.folders.watched():
            started = time.monotonic()
            found = scan(watch, self.notes.note, self.stop_scanner)
            self.log.debug(
                "sfwatch.scan_finished",
                path=str(watch.path),
                files=found,
                seconds=round(time.monotonic() - started, 3),
            )

    # -- noted paths → settle --------------------------------------------------------

    def idle(self) -> bool:
        """The start-up scan is done and nothing is noted or settling."""
        return self.scan_done.is_set() and len(self.notes) == 0 and len(self.settler) == 0

    def take_notes(self, queued: set[Path]) -> None:
        """Look at the noted paths, ``NOTES_PER_TICK`` at most (``queued``: settled files).

        A start-up scan of a big backlog notes thousands of paths at once; looked at
        in one go, they would hold the work loop for seconds while the first of them
        settled long ago (docs/benchmarks.md, d). The rest wait for the next turn.
        """
        for raw in self.notes.drain(NOTES_PER_TICK):
            path = Path(raw)
            watch = self._watch_for(path)
            if watch is None or path in queued:
                continue
            try:
                self._take_note(path, watch)
            except OSError as exc:  # e.g. in a folder we may not enter: stat() says EACCES
                if wants(path, watch):
                    reason = "no_access" if isinstance(exc, PermissionError) else "os_error"
                    self._skip(path, watch, reason)

    def settled(self) -> list[SettledFile]:
        """Files that stayed unchanged for their folder's ``settle_seconds``."""
        # A file settling in a folder a reload removed keeps its (retired) settings.
        return self.settler.due(lambda root: self.folders.for_root(root).settle_seconds)

    def _watch_for(self, path: Path) -> WatchConfig | None:
        for watch in self.folders.watched():
            if watch.path in path.parents:
                return watch
        return None

    def _take_note(self, path: Path, watch: WatchConfig) -> None:
        if (cut := too_deep(path, watch.path)) is not None:
            self._too_deep(cut, watch)  # below a folder the scan does not enter either
            return
        # One lstat per noted path: the work loop looks at every path an event names,
        # most often the source of our own claim's rename, which is gone by now.
        try:
            st = os.lstat(path)
        except OSError as exc:
            if exc.errno not in _GONE:
                raise  # EACCES: take_notes says why the file is not taken
            self.settler.forget(path)
            return
        if under_link(path, watch.path):
            return  # a path through a symlinked folder: links are not followed
        if self.owns is not None and not stat.S_ISDIR(st.st_mode) and not self.owns(path):
            return  # another worker's file: it settles it
        if stat.S_ISDIR(st.st_mode):
            if (cut := too_deep(path, watch.path, folder=True)) is not None:
                self._too_deep(cut, watch)
            elif not os.access(path, os.R_OK | os.X_OK):
                self._skip(path, watch, "no_access")
            elif wants_dir(path, watch):  # a folder moved in: its files have no events
                for inner in walk_dir(path, watch):
                    self.notes.note(inner)
            return
        if not wants(path, watch):
            return
        if not utf8_name(path, watch.path):  # the ledger, logs and uploads need UTF-8
            self._skip(path, watch, "name_not_utf8")
        elif not self.settler.note(path, watch.path, watch.settle_seconds, st):
            self._skip(path, watch)

    def _too_deep(self, folder: Path, watch: WatchConfig) -> None:
        """Say once that ``folder`` is too deep to look into, if a scan would reach it.

        One line per such folder, however many paths below it are noted: not for
        folders under an ignored name, done/, failed/, the work area or a link.
        """
        if folder in self.skipped:
            return
        rel = folder.relative_to(watch.path).parts
        if any(is_ignored_name(part, watch) for part in rel) or not wants_dir(folder, watch):
            return
        if under_link(folder, watch.path) or not folder.is_dir():
            return
        self._skip(folder, watch, "too_deep")

    def _skip(self, path: Path, watch: WatchConfig, reason: str | None = None) -> None:
        """Log once why a path is not taken (a link, a FIFO, a non-UTF-8 name, no access, depth).

        With several worker processes, the one whose share the path is says it (a
        folder's path hashes to one of them as a file's does).
        """
        if path in self.skipped or (self.owns is not None and not self.owns(path)):
            return
        if reason is None:
            if not os.path.lexists(path):
                return  # gone meanwhile: nothing to say
            reason = "symlink" if path.is_symlink() else "not_a_regular_file"
        self.skipped.add(path)
        self.log.warning(
            "sfwatch.file_skipped", file=printable(path), reason=reason, watch=str(watch.path)
        )
