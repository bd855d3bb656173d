"""The fake API (``tests.fakeapi.FakeAPI``) as a subprocess, for the benchmarks.

Like ``python -m tests.fakeapi``: prints the base URL on its first stdout line and
serves until SIGTERM/SIGINT. On exit it writes every recorded upload (name, size,
SHA-256, status, start and end as wall-clock times), the peak concurrency and its
own CPU time to ``--out`` as JSON, which ``bench.common.FakeServer`` reads.

``--backlog`` sets the listening socket's accept queue (socketserver's default is 5).
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
import threading
import time
from pathlib import Path

from tests import fakeapi


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fakeserver")
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--key", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backlog", type=int, default=None)
    args = parser.parse_args(argv)
    if args.backlog is not None:
        fakeapi._Server.request_queue_size = args.backlog  # noqa: SLF001
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    with fakeapi.FakeAPI(args.key, args.latency) as api:
        print(api.url, flush=True)
        while not done.wait(0.5):
            pass
    offset = time.time() - time.monotonic()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    summary = {
        "uploads": [
            {
                "filename": u.filename,
                "size": u.size,
                "sha256": u.sha256,
                "status": u.status,
                "started": u.started + offset,
                "ended": u.ended + offset if u.ended else 0.0,
                "complete": u.body_complete,
            }
            for u in api.uploads
        ],
        "requests_total": api.requests_total,
        "max_concurrent": api.max_concurrent,
        "errors": api.errors,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
    }
    args.out.write_text(json.dumps(summary), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
