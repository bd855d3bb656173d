"""The one registry of per-folder settings: the watched folders and the retired ones.

Intake, the worker, the scheduler, the claim step and the leases all need a
folder's settings, and a reload (SIGHUP) changes them while jobs are under way.
Copies updated by hand drift apart; so every stage asks this registry instead.

A *retired* folder has left the config but still has claims to finish: a reload
removed it (its last settings are kept), or the start-up reconcile found ledger
rows of a folder no longer configured (``recovery.retired_watch`` rebuilds its
settings from what the ledger recorded at claim). Its jobs finish with those
settings; nothing new is claimed there and no lease is kept there.

``Config.watch`` is only what the daemon started with; after a reload this
registry alone knows the folders. Worker threads and the scanner read it while
the main thread replaces it: each update swaps in a new dict in one assignment
(never mutating one being read), so readers need no lock.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from sfwatch.config import WatchConfig


class FolderChange(NamedTuple):
    """What a reload changed: folders added, removed, and kept with new settings."""

    added: list[WatchConfig]
    removed: list[WatchConfig]
    changed: list[WatchConfig]


class Folders:
    """Settings of the watched folders, and of retired folders with claims left."""

    def __init__(self, watches: Iterable[WatchConfig]) -> None:
        self._current: dict[Path, WatchConfig] = {w.path: w for w in watches}
        self._retired: dict[Path, WatchConfig] = {}
        #: how many reloads replaced the settings (a hold "until a reload" compares it)
        self.generation = 0

    def watched(self) -> list[WatchConfig]:
        """The folders watched now, in config order."""
        return list(self._current.values())

    def work_dirs(self) -> list[Path]:
        """The claim areas of the folders watched now (where leases are kept)."""
        return [w.work_dir for w in self._current.values()]

    def get(self, root: Path) -> WatchConfig | None:
        """The settings of ``root`` if it is watched now (retired folders: None)."""
        return self._current.get(root)

    def for_root(self, root: Path) -> WatchConfig:
        """The settings a job of ``root`` runs with, watched or retired; KeyError if neither."""
        watch = self._current.get(root)
        return watch if watch is not None else self._retired[root]

    def __contains__(self, root: object) -> bool:
        return root in self._current or root in self._retired

    def retire(self, watch: WatchConfig) -> None:
        """Keep the settings of a folder outside the config whose claims must finish."""
        self._retired = {**self._retired, watch.path: watch}

    def replace(self, watches: Iterable[WatchConfig]) -> FolderChange:
        """A reload: watch ``watches`` from now on; removed folders retire with their settings."""
        old = self._current
        fresh = {w.path: w for w in watches}
        removed = [w for path, w in old.items() if path not in fresh]
        # In this order a worker thread finds every root at every moment.
        self._retired = {**self._retired, **{w.path: w for w in removed}}
        self._current = fresh
        self._retired = {p: w for p, w in self._retired.items() if p not in fresh}
        self.generation += 1
        return FolderChange(
            added=[w for path, w in fresh.items() if path not in old],
            removed=removed,
            changed=[w for path, w in fresh.items() if path in old and old[path] != w],
        )


__all__ = ["FolderChange", "Folders"]
