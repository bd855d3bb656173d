"""Events: what the daemon does, handed to whoever listens (the metrics, for one).

The pipeline emits an event where it writes the log line of the same name, with
the same fields (``sfwatch.job_finished``, ``sfwatch.upload_finished``, …), and
knows nothing of who listens: the scheduler and the worker depend on this module
only, never on the metrics. Log lines are no substitute: a level filter drops
debug lines before any processor sees them, and tests replace the processors.

A listener runs on the emitter's thread (the main loop, or an upload thread), so
it must be quick and thread-safe, and it must not raise: one that does is logged
and the pipeline carries on. With no listener (no ``metrics.listen``), an event
costs one empty loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from sfwatch.logs import get_logger

#: ``listener(event, fields)``
Listener = Callable[[str, Mapping[str, Any]], None]


class Events:
    """The listeners of one daemon (each daemon has its own: tests run several)."""

    def __init__(self) -> None:
        self._listeners: tuple[Listener, ...] = ()
        self.log = get_logger()

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` for every event from now on."""
        self._listeners = (*self._listeners, listener)

    def emit(self, event: str, fields: Mapping[str, Any]) -> None:
        """Hand ``event`` to every listener; a listener that raises is logged, never felt."""
        if not self._listeners:
            return
        view = MappingProxyType(dict(fields))
        for listener in self._listeners:
            try:
                listener(event, view)
            except Exception:  # a bug in a listener must not stop a file
                self.log.exception("sfwatch.listener_failed", about=event)


__all__ = ["Events", "Listener"]
