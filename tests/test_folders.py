"""The folder registry: watched and retired folders, and what a reload changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from sfwatch.config import WatchConfig
from sfwatch.folders import Folders

A = WatchConfig(path=Path("/srv/a"))
B = WatchConfig(path=Path("/srv/b"), settle_seconds=5.0)
C = WatchConfig(path=Path("/srv/c"), model="other")


def test_watched_folders_in_config_order() -> None:
    """watched() and work_dirs() list the current folders in config order."""
    folders = Folders([B, A])
    assert folders.watched() == [B, A]
    assert folders.work_dirs() == [B.work_dir, A.work_dir]


def test_unknown_root_is_a_key_error() -> None:
    """A root never watched nor retired has no settings."""
    folders = Folders([A])
    assert Path("/srv/x") not in folders
    assert folders.get(Path("/srv/x")) is None
    with pytest.raises(KeyError):
        folders.for_root(Path("/srv/x"))


def test_replace_reports_added_removed_changed() -> None:
    """replace() says which folders were added, removed and changed."""
    folders = Folders([A, B])
    b2 = WatchConfig(path=B.path, settle_seconds=1.0)
    added, removed, changed = folders.replace([b2, C])
    assert (added, removed, changed) == ([C], [A], [b2])
    assert folders.watched() == [b2, C]
    assert folders.for_root(B.path) == b2


def test_a_removed_folder_retires_with_its_settings() -> None:
    """A removed folder is no longer watched but its jobs keep its last settings."""
    folders = Folders([A, B])
    folders.replace([A])
    assert folders.get(B.path) is None
    assert B.path in folders
    assert folders.for_root(B.path) == B
    assert folders.work_dirs() == [A.work_dir]


def test_a_readded_folder_is_current_again() -> None:
    """Adding a retired folder back makes its new settings current."""
    folders = Folders([A, B])
    folders.replace([A])
    b2 = WatchConfig(path=B.path, model="new")
    added, _, _ = folders.replace([A, b2])
    assert added == [b2]
    assert folders.for_root(B.path) == b2
    assert folders.get(B.path) == b2


def test_retire_adds_a_folder_outside_the_config() -> None:
    """retire() makes a folder's settings known without watching it."""
    folders = Folders([A])
    folders.retire(C)
    assert folders.for_root(C.path) == C
    assert folders.watched() == [A]
    assert folders.get(C.path) is None


def test_unchanged_reload_changes_nothing() -> None:
    """The same folders again: nothing added, removed or changed."""
    folders = Folders([A, B])
    assert folders.replace([A, B]) == ([], [], [])
