"""a: throughput with a backlog present at start, against a slow API.

1,000 small WAVs are in the inbox before ``sfwatch run --burst`` starts; the fake
answers each upload after 0.25 s. With ``concurrency`` C the ceiling is C ÷ 0.25
files/s. Figure: achieved files/s ÷ (C ÷ latency), where achieved files/s is the
file count over the time from the first ``upload_started`` to the last
``job_finished`` (both from the daemon's log). Also reported: the steady-state
rate (between the C-th and the (N-C)-th finished file, free of ramp-up and tail),
the fake's peak concurrency, the daemon's CPU per file and its peak RSS.

``backlog_run`` is shared with benchmark d (the same run with 10,000 files, no latency).

``--outbox`` (issue 11: hooks and webhooks must not lower throughput) runs each
concurrency twice per repetition, alternately without and with a hook (``true``)
and a webhook (a loopback receiver in this process answering 204) on every file,
and reports both ratios and their difference; also how long after the last
finished file the last delivery ended.

``--transcode`` runs a against files that take real work to prepare: 40 WAVs of
60 s with ``prepare.transcode: always`` (each is re-encoded to MP3 before its
upload, about 0.3 s of CPU here), C=4, the fake answering after 1 s. It measures
how well preparing ahead of the upload's turn keeps the API busy (slots.py).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from bench.common import (
    DaemonRun,
    FakeServer,
    Figure,
    make_wavs,
    median,
    note_inodes_freed,
    parse_ts,
    save,
    scratch,
    times_of,
    wait_for_forgotten_inodes,
    write_config,
)
from bench.fakeonly import ceiling


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real receivers do

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.posts += 1  # type: ignore[attr-defined]
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@contextlib.contextmanager
def webhook_receiver() -> Iterator[ThreadingHTTPServer]:
    """A loopback webhook receiver answering 204 to every POST (``.posts`` counts them)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.posts = 0  # type: ignore[attr-defined]
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def backlog_run(
    root: Path,
    files: int,
    latency: float,
    concurrency: int,
    *,
    settle: float = 0.5,
    timeout: float = 600.0,
    profile: str | None = None,
    outbox: bool = False,
    seconds: float = 0.1,
    transcode: bool = False,
    siblings: int = 1,
    workers: int | str = 1,
    quiet_inodes: bool = False,
) -> dict[str, Any]:
    """One burst run over ``files`` present at start; the measured quantities.

    ``outbox``: a hook and a webhook on every file (the run ends once they are delivered).
    ``seconds``: each WAV's length; ``transcode``: every file is re-encoded before upload.
    ``siblings``: that many daemons on the one inbox, each with its own ``state_dir``
    and ``concurrency ÷ siblings`` uploads (design §6.3), so that the API sees the
    same concurrency; CPU and peak RSS are their sums.
    ``workers``: the config's ``workers`` (processes of one daemon, sharing its ledger).
    ``quiet_inodes``: first wait until the file system forgets the inodes freed last
    (``common.wait_for_forgotten_inodes``: for a CPU-bound run, d).
    """
    if root.exists():
        shutil.rmtree(root)
        note_inodes_freed()
    root.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        fake = stack.enter_context(FakeServer(root, latency))
        extra: dict[str, Any] = {}
        receiver = None
        if outbox:
            receiver = stack.enter_context(webhook_receiver())
            port = receiver.server_address[1]
            extra = {
                "hooks": {"on_done": ["true"]},
                "webhooks": [{"url": f"http://127.0.0.1:{port}/hook"}],
            }
        if transcode:
            extra["prepare"] = {"transcode": "always"}
        if workers not in (1, "1"):
            extra["workers"] = int(workers) if str(workers).isdigit() else workers
        per_daemon = max(1, concurrency // siblings)
        config = write_config(root, fake.url, concurrency=per_daemon, settle=settle, extra=extra)
        configs = [config, *(sibling_config(config, i) for i in range(1, siblings))]
        make_wavs(root / "inbox", files, seconds=seconds)
        if quiet_inodes:
            wait_for_forgotten_inodes()
        with contextlib.ExitStack() as running:
            daemons = [
                running.enter_context(DaemonRun(c, "--burst", profile=profile if i == 0 else None))
                for i, c in enumerate(configs)
            ]
            code = max(d.wait_exit(timeout) for d in daemons)
            samplers = [d.sampler for d in daemons if d.sampler is not None]
            cpu = sum(s.cpu for s in samplers)
            peak = round(sum(s.peak_rss_mb for s in samplers), 1)
            peak_pss = round(sum(s.peak_pss_mb for s in samplers), 1)
            processes = sum(s.processes for s in samplers)
            pss_read = all(s.pss_read for s in samplers)
            started = sorted(
                t for d in daemons for t in times_of(d.events("sfwatch.upload_started"))
            )
            finished_events = [e for d in daemons for e in d.events("sfwatch.job_finished")]
            launched = daemons[0].launched
            ready = max(
                parse_ts(str(d.events("sfwatch.daemon_started")[0]["timestamp"])) for d in daemons
            )
            problems = sorted({str(e.get("event")) for d in daemons for e in d.errors()})
            delivered = sorted(
                t
                for d in daemons
                for t in times_of(
                    [*d.events("sfwatch.hook_finished"), *d.events("sfwatch.webhook_delivered")]
                )
            )
        note_inodes_freed()  # (the daemon's job folders and sidecars)
        summary = fake.stop()
        posts = receiver.posts if receiver is not None else 0  # type: ignore[attr-defined]
    finished = times_of(finished_events)
    outcomes = sorted({str(e.get("outcome")) for e in finished_events})
    n = len(finished)
    window = finished[-1] - started[0]
    rate = n / window
    k1, k2 = min(concurrency, n // 4), max(n - concurrency, 3 * n // 4)
    steady = (k2 - k1) / (finished[k2] - finished[k1])
    server_done = [u for u in summary.uploads if u.status == 200]
    return {
        "files": files,
        "latency": latency,
        "concurrency": concurrency,
        "siblings": siblings,
        "workers": workers,
        "settle_seconds": settle,
        "exit_code": code,
        "finished": n,
        "outcomes": outcomes,
        "uploads_seen_by_fake": len(summary.uploads),
        "uploads_200": len(server_done),
        "fake_max_concurrent": summary.max_concurrent,
        "fake_cpu_seconds": round(summary.cpu_seconds, 2),
        "launch_to_ready_s": round(ready - launched, 3),
        "launch_to_first_upload_s": round(started[0] - launched, 3),
        "first_upload_to_last_finish_s": round(window, 3),
        "launch_to_last_finish_s": round(finished[-1] - launched, 3),
        "files_per_s": round(rate, 2),
        "files_per_s_from_launch": round(n / (finished[-1] - launched), 2),
        "steady_files_per_s": round(steady, 2),
        "daemon_cpu_seconds": round(cpu, 2),
        "daemon_cpu_ms_per_file": round(cpu / max(n, 1) * 1000, 2),
        "peak_rss_mb": peak,
        "peak_pss_mb": peak_pss,
        "processes": processes,
        # one process: its RSS (as every earlier figure); several: their summed PSS,
        # which counts the libraries they share once (their summed RSS counts them N times)
        # (without PSS from the kernel, the summed RSS: an upper bound)
        "peak_memory_mb": peak if processes == 1 or not pss_read else peak_pss,
        "warnings_logged": problems,
        "outbox": outbox,
        "deliveries": len(delivered),
        "webhook_posts": posts,
        "last_delivery_after_last_finish_s": round(delivered[-1] - finished[-1], 3)
        if delivered
        else None,
    }


def run_outbox(args: argparse.Namespace) -> list[Figure]:
    """bench a, each run without and then with a hook and a webhook on every file."""
    root = scratch("a")
    files = 300 if args.quick else 1000
    latency = 0.25
    figures: list[Figure] = []
    detail: dict[str, Any] = {"runs": []}
    for concurrency in (8, 32):
        ideal = concurrency / latency
        ratios: dict[bool, list[float]] = {False: [], True: []}
        for i in range(args.runs):
            for outbox in (False, True):
                result = backlog_run(
                    root / f"c{concurrency}-{i}-{'outbox' if outbox else 'plain'}",
                    files,
                    latency,
                    concurrency,
                    outbox=outbox,
                )
                result["ratio"] = round(result["files_per_s"] / ideal, 3)
                print(f"  a C={concurrency} run {i + 1} outbox={outbox}: {result}", flush=True)
                detail["runs"].append(result)
                ratios[outbox].append(result["ratio"])
        plain, with_outbox = median(ratios[False]), median(ratios[True])
        figures.append(
            Figure(f"a: C={concurrency} ratio, no hooks", plain, "ratio", runs=ratios[False])
        )
        figures.append(
            Figure(
                f"a: C={concurrency} ratio, hook + webhook per file",
                with_outbox,
                "ratio",
                runs=ratios[True],
            )
        )
        diffs = [b - a for a, b in zip(ratios[False], ratios[True], strict=True)]
        figures.append(
            Figure(
                f"a: C={concurrency} hook + webhook minus none",
                round(with_outbox - plain, 3),
                "ratio",
                "≥ -0.02",
                with_outbox - plain >= -0.02,
                [round(d, 3) for d in diffs],
            )
        )
    save("a-outbox", figures, detail)
    return figures


def sibling_config(config: Path, index: int) -> Path:
    """A copy of ``config`` for sibling ``index``: the same inbox, a state_dir of its own."""
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    data["state_dir"] = f"{data['state_dir']}-{index}"
    path = config.with_name(f"{config.stem}-{index}{config.suffix}")
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def fake_ceiling(root: Path, files: int, latency: float, concurrency: int) -> float:
    """files/s of the fake alone on this workload, now (``fakeonly.ceiling``)."""
    root.mkdir(parents=True, exist_ok=True)
    with FakeServer(root, latency) as fake:
        result = ceiling(fake.url, files, concurrency)
        fake.stop()
    if result["failures"]:
        raise RuntimeError(f"the fake alone failed: {result['failures']}")
    return float(result["files_per_s"])


def run_transcode(args: argparse.Namespace) -> list[Figure]:
    """bench a over files that must be transcoded before their upload."""
    root = scratch("a")
    files, latency, concurrency = (16 if args.quick else 40), 1.0, 4
    ratios: list[float] = []
    detail: dict[str, Any] = {"runs": []}
    for i in range(args.runs):
        result = backlog_run(
            root / f"transcode-{i}", files, latency, concurrency, seconds=60.0, transcode=True
        )
        result["ratio"] = round(result["files_per_s"] / (concurrency / latency), 3)
        print(f"  a --transcode run {i + 1}: {result}", flush=True)
        detail["runs"].append(result)
        ratios.append(result["ratio"])
    figures = [
        Figure(
            "a: C=4, 60 s files transcoded, files/s ÷ (C÷L)",
            median(ratios),
            "ratio",
            runs=ratios,
        )
    ]
    save("a-transcode", figures, detail)
    return figures


def run(args: argparse.Namespace) -> list[Figure]:
    if getattr(args, "outbox", False):
        return run_outbox(args)
    if getattr(args, "transcode", False):
        return run_transcode(args)
    root = scratch("a")
    files = 300 if args.quick else 1000
    latency = 0.25
    figures: list[Figure] = []
    detail: dict[str, Any] = {"runs": []}
    for concurrency in (8, 32):
        ratios: list[float] = []
        steady: list[float] = []
        of_ceiling: list[float] = []
        for i in range(args.runs):
            # The fake's own ceiling first, then the daemon: side by side, in one run.
            best = fake_ceiling(root / f"ceiling-c{concurrency}-{i}", files, latency, concurrency)
            result = backlog_run(
                root / f"c{concurrency}-{i}",
                files,
                latency,
                concurrency,
                profile=f"a-c{concurrency}" if i == 0 else None,
                siblings=args.siblings,
                workers=args.workers,
            )
            ideal = concurrency / latency
            result["ratio"] = round(result["files_per_s"] / ideal, 3)
            result["steady_ratio"] = round(result["steady_files_per_s"] / ideal, 3)
            result["fake_ceiling_files_per_s"] = best
            result["fake_ceiling_ratio"] = round(best / ideal, 3)
            result["ratio_of_ceiling"] = round(result["files_per_s"] / best, 3)
            print(f"  a C={concurrency} run {i + 1}: {result}", flush=True)
            detail["runs"].append(result)
            ratios.append(result["ratio"])
            steady.append(result["steady_ratio"])
            of_ceiling.append(result["ratio_of_ceiling"])
        figures.append(
            Figure(
                f"a: C={concurrency} files/s ÷ (C÷L)",
                median(ratios),
                "ratio",
                "≥ 0.95",
                median(ratios) >= 0.95,
                ratios,
            )
        )
        figures.append(
            Figure(
                f"a: C={concurrency} files/s ÷ the fake alone (same run)",
                median(of_ceiling),
                "ratio",
                "≥ 0.95",
                median(of_ceiling) >= 0.95,
                of_ceiling,
            )
        )
        figures.append(
            Figure(
                f"a: C={concurrency} steady-state ratio",
                median(steady),
                "ratio",
                runs=steady,
            )
        )
    save("a", figures, detail)
    return figures
