"""Try a proposed fix without editing sfwatch/: run ``sfwatch`` with patches applied.

``BENCH_PATCHES=ledger-sync=NORMAL,hash-chunk=65536 .venv/bin/python -m bench b``
makes every daemon the benchmarks start run as
``python -m bench.patched ledger-sync=NORMAL,hash-chunk=65536 run -c ...``.
Results record the patches (``machine.patches``), so they are never mistaken for
the tree's own figures. Patches:

- ``ledger-sync=MODE``: ``PRAGMA synchronous=MODE`` for the ledger (FULL in the tree).
- ``hash-chunk=N``: read N bytes at a time when hashing a file (1 MiB in the tree).
- ``claim-no-fsync``: the claim's two directory fsyncs are skipped.
- ``no-running-flag``: skip the ledger's ``stage`` writes per attempt.

(``grouper-delay`` and ``watch-root-only`` patched watchdog's inotify observer, which
the daemon no longer uses: ``sfwatch.inotify`` replaced it.)
- ``switch-interval=S``: ``sys.setswitchinterval(S)`` (how long a thread may hold the
  GIL while others wait; 0.005 by default).
- ``finishing-headroom=N``: upload threads per slot (``slots.FINISHING_HEADROOM``).
- ``no-core-pin``: the threads never share one CPU (``cores.CorePin`` stays off), to
  compare with the tree's pin while busy.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from sfwatch import claim, cores, fsutil, ledger, slots
from sfwatch.cli import main as sfwatch_main


def apply(spec: str) -> None:
    """Apply a comma-separated list of patches."""
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        if name == "ledger-sync":
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
        elif name == "no-running-flag":
            ledger.Ledger.set_stage = lambda *_a, **_k: None  # type: ignore[method-assign]
        elif name == "finishing-headroom":
            slots.FINISHING_HEADROOM = int(value)
        elif name == "no-core-pin":
            cores.CorePin.turn = lambda *_a, **_k: None  # type: ignore[method-assign]
        elif name == "cpu-by-config":
            # sibling i (config "...-i.yaml") runs on CPU i mod the allowed count
            config = sys.argv[sys.argv.index("-c") + 1]
            stem = config.rsplit(".", 1)[0]
            index = int(stem.rsplit("-", 1)[1]) if stem.rsplit("-", 1)[-1].isdigit() else 0
            allowed = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(0, {allowed[index % len(allowed)]})
        else:
            raise SystemExit(f"bench.patched: unknown patch {name!r}")


def main() -> int:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m bench.patched PATCHES SFWATCH-ARGS...")
    apply(sys.argv[1])
    return sfwatch_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
