"""The config's folder rules: nothing the daemon moves or writes may feed a watch,
hide one, or hold the ledger (docs/design.md §9).

``check_folders`` refuses a done_dir or failed_dir that is, contains, or lies
where a watch looks into another watch's path, anything inside a work area
(``.sfwatch/``), and failed_dirs that overlap; ``check_state_dir`` refuses a
state_dir inside a watched folder. config.py calls both while parsing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sfwatch.errors import ConfigError

if TYPE_CHECKING:
    from sfwatch.config import WatchConfig


def check_folders(watches: list[WatchConfig]) -> None:
    """Where originals and transcripts go must not feed a watch or hide one (§9).

    Rules, for every watch W and every watch V (W itself included):
    W's done_dir and failed_dir neither are nor contain V's path (a file moved
    there would be taken again, or every file of V would count as done and be
    ignored), and lie inside V's path only where V never looks (V's own done/,
    failed/, an ``exclude``d or ignored folder name, or V not recursive); no
    folder lies in V's work area (``.sfwatch/``); transcript_dir is not V's path;
    failed_dirs do not overlap each other or any done_dir (``retry`` must know
    which inbox a failed file goes back to). done_dirs may be shared.
    """
    for index, watch in enumerate(watches):
        where = f"watch[{index}]"
        for name in ("done_dir", "failed_dir", "transcript_dir"):
            folder: Path | None = getattr(watch, name)
            if folder is not None:
                _check_one_folder(f"{where}.{name}", folder, index, watches)
        if watch.failed_dir.is_relative_to(watch.done_dir):
            raise ConfigError(
                f"{where}.failed_dir", f"must not be inside done_dir ({watch.done_dir})"
            )
        if watch.done_dir.is_relative_to(watch.failed_dir):
            raise ConfigError(
                f"{where}.done_dir", f"must not be inside failed_dir ({watch.failed_dir})"
            )
    # Pairs within one watch were checked by _parse_watch, with their own messages.
    moved = [
        (index, f"watch[{index}].{name}", getattr(watch, name))
        for index, watch in enumerate(watches)
        for name in ("done_dir", "failed_dir")
    ]
    for later, (index, key, folder) in enumerate(moved):
        for other_index, other_key, other in moved[:later]:
            if other_index == index or not (
                key.endswith(".failed_dir") or other_key.endswith(".failed_dir")
            ):
                continue  # done_dirs may be shared
            if folder == other:
                raise ConfigError(key, f"same folder as {other_key} ({other})")
            if folder.is_relative_to(other):
                raise ConfigError(key, f"is inside {other_key} ({other})")
            if other.is_relative_to(folder):
                raise ConfigError(key, f"contains {other_key} ({other})")


def _check_one_folder(key: str, folder: Path, index: int, watches: list[WatchConfig]) -> None:
    """One watch's done_dir, failed_dir or transcript_dir against every watched path."""
    from sfwatch.watch import never_looks_into  # noqa: PLC0415 - watch imports config, config this

    moved_here = not key.endswith(".transcript_dir")
    for other_index, other in enumerate(watches):
        path_key = f"watch[{other_index}].path"
        if folder == other.path:
            if other_index == index:
                raise ConfigError(key, "must not be the watched folder itself")
            raise ConfigError(key, f"must not be a watched folder: {path_key} ({other.path})")
        if folder.is_relative_to(other.work_dir):
            raise ConfigError(
                key, f"must not be inside the daemon's work area {other.work_dir} ({path_key})"
            )
        if not moved_here:
            continue  # transcripts (*.txt) are not audio: beside or under an inbox is fine
        if other.path.is_relative_to(folder):
            why = (
                "the daemon never looks into it, so every file there would be ignored"
                if other_index == index
                else "files moved here could land in it and be taken again"
            )
            raise ConfigError(
                key, f"must not contain a watched folder: {path_key} ({other.path}); {why}"
            )
        if (
            other_index != index
            and folder.is_relative_to(other.path)
            and not never_looks_into(folder, other)
        ):
            raise ConfigError(
                key,
                f"is inside {path_key} ({other.path}), which would take every file moved "
                f"here as a new one; move it out, or add {folder.name!r} to "
                f"watch[{other_index}].exclude",
            )


def check_state_dir(state_dir: Path, watches: tuple[WatchConfig, ...], *, explicit: bool) -> None:
    """The ledger is the daemon's alone: never inside a folder others write to."""
    for index, watch in enumerate(watches):
        if state_dir == watch.path or state_dir.is_relative_to(watch.path):
            origin = "" if explicit else " (the default; set state_dir)"
            raise ConfigError(
                "state_dir",
                f"{state_dir}{origin} must not be inside a watched folder: "
                f"watch[{index}].path ({watch.path}); whoever may write there could "
                "reach the ledger",
            )


__all__ = ["check_folders", "check_state_dir"]
