"""Reading one mapping of the config so that every error names its key (docs/design.md §9).

``Section`` is the checked reader the config's parsers share (config.py,
config_extras.py): strings, numbers, paths, patterns, a hook's argv, event lists,
each with its key path in the error. ``show`` and ``shown_url`` describe a wrong
value or a URL for a message without printing too much (or a password).
"""

from __future__ import annotations

import difflib
import math
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

from sfwatch.errors import ConfigError

#: a hook's PATH: its environment is built from scratch, never inherited (§13)
HOOK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def show(value: object) -> str:
    """Describe a wrong value briefly for a message (a list could be huge)."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Section:
    """One mapping of the config plus its key path, so every error names the key."""

    def __init__(self, data: object, where: str, known: tuple[str, ...]) -> None:
        if data is None:  # "api:" with every child commented out
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(where, f"must be a mapping, got {show(data)}")
        for name in data:
            if name not in known:
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(self._key(where, str(name)), f"unknown key{hint}")
        self.data: dict[str, object] = data
        self.where = where

    @staticmethod
    def _key(where: str, name: str) -> str:
        return f"{where}.{name}" if where else name

    def key(self, name: str) -> str:
        return self._key(self.where, name)

    def optional_string(self, name: str) -> str | None:
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigError(self.key(name), f"must be a string, got {show(value)}")
        if not value.strip():
            raise ConfigError(self.key(name), "must not be empty")
        return value.strip()

    def string(self, name: str, default: str) -> str:
        value = self.optional_string(name)
        return default if value is None else value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.string(name, default).lower()
        if value not in choices:
            wanted = ", ".join(choices)
            raise ConfigError(self.key(name), f"must be one of {wanted}; got {self.data[name]!r}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(self.key(name), f"must be true or false, got {show(value)}")
        return value

    def integer(self, name: str, default: int, low: int, high: int | None = None) -> int:
        value = self.data.get(name)
        if value is None:
            return default
        # bool is an int subclass, but "concurrency: yes" is surely a mistake.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.key(name), f"must be an integer, got {show(value)}")
        if high is not None and not low <= value <= high:
            raise ConfigError(self.key(name), f"must be between {low} and {high}")
        if value < low:
            raise ConfigError(self.key(name), f"must be >= {low}")
        return value

    def optional_positive(self, name: str) -> float | None:
        """A positive, finite number (YAML ints are fine), or None when unset."""
        value = self.data.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(self.key(name), f"must be a number, got {show(value)}")
        if math.isinf(value):  # .inf would mean "never settle" or "wait forever"
            raise ConfigError(self.key(name), "must be a finite number")
        if not value > 0:  # also rejects .nan
            raise ConfigError(self.key(name), "must be > 0")
        return float(value)

    def positive(self, name: str, default: float) -> float:
        value = self.optional_positive(name)
        return default if value is None else value

    def optional_path(self, name: str, base: Path) -> Path | None:
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(self.key(name), f"must be a path, got {show(value)}")
        if "\0" in value:
            raise ConfigError(self.key(name), "must not contain a NUL character")
        try:
            return (base / Path(value.strip()).expanduser()).resolve(strict=False)
        except RuntimeError:  # "~someone/..." for a user this system does not know
            raise ConfigError(self.key(name), f"no home directory for {value!r}") from None

    def patterns(self, name: str, default: tuple[str, ...], *, empty_ok: bool) -> tuple[str, ...]:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, list):
            raise ConfigError(self.key(name), f"must be a list of patterns, got {show(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise ConfigError(
                    f"{self.key(name)}[{index}]", f"must be a pattern, got {show(item)}"
                )
        if not value and not empty_ok:
            raise ConfigError(self.key(name), "must list at least one pattern")
        return tuple(value)

    def argv(self, name: str, base: Path) -> tuple[str, ...] | None:
        """A command as an argv list (never a shell string); its program must exist.

        A program with a ``/`` is a path (relative to the config's folder), any other
        is looked up in ``HOOK_PATH``, the PATH hooks run with. The result names the
        program by its absolute path. ``[]`` is "no command"; None is "not set".
        """
        value = self.data.get(name)
        if value is None:
            return None
        key = self.key(name)
        if isinstance(value, str):
            raise ConfigError(
                key,
                "must be a list of arguments, e.g. [/usr/local/bin/notes-hook, --quiet]; "
                "nothing runs through a shell unless you write [sh, -c, '...']",
            )
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list of arguments, got {show(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, str) or (index == 0 and not item.strip()):
                raise ConfigError(f"{key}[{index}]", f"must be a string, got {show(item)}")
            if "\0" in item:
                raise ConfigError(f"{key}[{index}]", "must not contain a NUL character")
        if not value:
            return ()
        program = value[0].strip()
        if "/" in program:
            # Not resolved: a link (/opt/tool/current/hook) is followed at each run.
            path = Path(os.path.normpath(base / Path(program).expanduser()))
            if not (path.is_file() and os.access(path, os.X_OK)):
                raise ConfigError(f"{key}[0]", f"{path} is not an executable file")
            return (str(path), *value[1:])
        found = shutil.which(program, path=HOOK_PATH)
        if found is None:
            raise ConfigError(
                f"{key}[0]", f"{program!r} is not found in the hooks' PATH ({HOOK_PATH})"
            )
        return (found, *value[1:])

    def events(
        self, name: str, default: tuple[str, ...], allowed: tuple[str, ...]
    ) -> tuple[str, ...]:
        """A list of event names, each one of ``allowed``, at least one, no repeats."""
        chosen = self.choices(name, allowed, noun="event")
        return default if chosen is None else chosen

    def choices(self, name: str, allowed: tuple[str, ...], *, noun: str) -> tuple[str, ...] | None:
        """A list of ``noun``s, each one of ``allowed``, at least one, no repeats; None if
        the key is not set."""
        value = self.data.get(name)
        if value is None:
            return None
        key = self.key(name)
        if not isinstance(value, list) or not value:
            raise ConfigError(key, f"must list at least one {noun} out of {', '.join(allowed)}")
        for index, item in enumerate(value):
            if item not in allowed:
                raise ConfigError(
                    f"{key}[{index}]", f"must be one of {', '.join(allowed)}; got {show(item)}"
                )
        if len(set(value)) != len(value):
            raise ConfigError(key, f"names {'an' if noun[0] in 'aeiou' else 'a'} {noun} twice")
        return tuple(value)


def shown_url(url: str) -> str:
    """``url`` fit to print: without the ``user:password@`` it may carry."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


__all__ = ["HOOK_PATH", "Section", "show", "shown_url"]
