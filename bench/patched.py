"""Try a proposed fix without editing sfwatch/: run ``sfwatch`` with patches applied.

``BENCH_PATCHES=grouper-delay=0.05,ledger-sync=NORMAL .venv/bin/python -m bench b``
makes every daemon the benchmarks start run as
``python -m bench.patched grouper-delay=0.05,ledger-sync=NORMAL run -c ...``.
Results record the patches (``machine.patches``), so they are never mistaken for
the tree's own figures. Patches:

- ``grouper-delay=S``: watchdog holds an unpaired IN_MOVED_FROM for S seconds (0.5
  by default) at the head of its event queue, holding back every later event.
- ``ledger-sync=MODE``: ``PRAGMA synchronous=MODE`` for the ledger (FULL in the tree).
- ``hash-chunk=N``: read N bytes at a time when hashing a file (1 MiB in the tree).
- ``claim-no-fsync``: the claim's two directory fsyncs are skipped.
- ``no-running-flag``: skip the ledger's ``stage`` writes per attempt.
- ``watch-root-only``: the inotify observer watches the watched folder alone, not
  its subfolders (so not the work area, ``done/`` and ``failed/`` either): what a
  watch that leaves out the daemon's own folders would cost, for a flat inbox.
- ``switch-interval=S``: ``sys.setswitchinterval(S)`` (how long a thread may hold the
  GIL while others wait; 0.005 by default).
"""

from __future__ import annotations

import sys
from typing import Any

from watchdog.observers import inotify_move_event_grouper as grouper
from watchdog.observers.inotify import InotifyObserver

from sfwatch import claim, fsutil, ledger
from sfwatch.cli import main as sfwatch_main


def apply(spec: str) -> None:
    """Apply a comma-separated list of patches."""
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        if name == "grouper-delay":
            grouper.InotifyMoveEventGrouper.delay = float(value)
        elif name == "ledger-sync":
            original = ledger.Ledger.__init__

            def init(
                self: ledger.Ledger, path: Any, _orig: Any = original, _mode: str = value
            ) -> None:
                _orig(self, path)
                self._db.execute(f"PRAGMA synchronous={_mode}")

            ledger.Ledger.__init__ = init  # type: ignore[method-assign]
        elif name == "hash-chunk":
            fsutil.CHUNK = int(value)
        elif name == "claim-no-fsync":
            claim.__dict__["fsync_dir"] = lambda _path: None
        elif name == "switch-interval":
            sys.setswitchinterval(float(value))
        elif name == "watch-root-only":
            original_schedule = InotifyObserver.schedule

            def schedule(
                self: Any, handler: Any, path: str, _orig: Any = original_schedule, **kwargs: Any
            ) -> Any:
                kwargs["recursive"] = False
                return _orig(self, handler, path, **kwargs)

            InotifyObserver.schedule = schedule  # type: ignore[method-assign,assignment]
        elif name == "no-running-flag":
            ledger.Ledger.set_stage = lambda *_a, **_k: None  # type: ignore[method-assign]
        else:
            raise SystemExit(f"bench.patched: unknown patch {name!r}")


def main() -> int:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m bench.patched PATCHES SFWATCH-ARGS...")
    apply(sys.argv[1])
    return sfwatch_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
