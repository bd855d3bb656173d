"""fake: the fake API alone, driven by a plain concurrent client.

Before the fake serves the daemon benchmarks, check that it is not their
bottleneck: C client threads, each with one keep-alive connection (what httpx
does), POST small multipart uploads in a loop for a few seconds. Figures: the
achieved requests/s ÷ (C ÷ latency), and with latency 0 the most requests/s the
fake can serve on this machine (benchmark d needs well over 200). The slowest
*first* request shows whether C simultaneous connects overflow the listen backlog
(a dropped SYN is retried after 1 s).
"""

from __future__ import annotations

import argparse
import http.client
import secrets
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from bench.common import API_KEY, MODEL, FakeServer, Figure, median, save, scratch, wav_bytes


def multipart(payload: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with ``model`` and ``file``; (body, content type)."""
    boundary = secrets.token_hex(16)
    head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="model"\r\n\r\n'
        f"{MODEL}\r\n"
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head + payload + tail, f"multipart/form-data; boundary={boundary}"


def post(conn: http.client.HTTPConnection, path: str, body: bytes, headers: dict[str, str]) -> None:
    """One request on a kept-alive connection; RuntimeError unless it is a 200."""
    conn.request("POST", path, body, headers)
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}")


def drive(url: str, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` threads POST for ``seconds``; requests/s and latencies."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    body, ctype = multipart(wav_bytes(0.25))
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": ctype}
    path = f"{parts.path}/audio/transcriptions"
    barrier = threading.Barrier(clients + 1)
    first: list[float] = []
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop_at = [0.0]

    def client() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=30)
        mine: list[float] = []
        barrier.wait()
        try:
            while True:
                t0 = time.monotonic()
                if mine and t0 >= stop_at[0]:
                    break
                post(conn, path, body, headers)
                mine.append(time.monotonic() - t0)
        except Exception as exc:
            with lock:
                failures.append(repr(exc))
        finally:
            conn.close()
        with lock:
            first.append(mine[0] if mine else float("inf"))
            latencies.extend(mine)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.monotonic() + seconds
    started = time.monotonic()
    barrier.wait()
    for t in threads:
        t.join(seconds + 60)
    elapsed = time.monotonic() - started
    return {
        "clients": clients,
        "requests": len(latencies),
        "seconds": round(elapsed, 3),
        "rps": round(len(latencies) / elapsed, 1),
        "median_latency_ms": round(median(latencies) * 1000, 2),
        "slowest_first_request_ms": round(max(first) * 1000, 1),
        "failures": failures[:5],
    }


def ceiling(url: str, files: int, clients: int) -> dict[str, Any]:
    """The fake's own ceiling for benchmark a's workload: ``files`` uploads, ``clients``
    at a time, by a client that does nothing else.

    Measured like a daemon run (files ÷ (last answer - first request)), so the two
    can be compared in one run, on the same machine at the same moment.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    body, ctype = multipart(wav_bytes(0.1))
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": ctype}
    path = f"{parts.path}/audio/transcriptions"
    left = [files]
    lock = threading.Lock()
    starts: list[float] = []
    ends: list[float] = []
    failures: list[str] = []

    def client() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=30)
        try:
            while True:
                with lock:
                    if left[0] == 0:
                        return
                    left[0] -= 1
                t0 = time.monotonic()
                post(conn, path, body, headers)
                t1 = time.monotonic()
                with lock:
                    starts.append(t0)
                    ends.append(t1)
        except Exception as exc:
            with lock:
                failures.append(repr(exc))
        finally:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    window = max(ends) - min(starts)
    return {
        "files": len(ends),
        "clients": clients,
        "files_per_s": round(len(ends) / window, 2),
        "failures": failures[:5],
    }


def run(args: argparse.Namespace) -> list[Figure]:
    root = scratch("fake")
    figures: list[Figure] = []
    detail: dict[str, Any] = {"runs": []}
    seconds = 3.0
    for latency, clients in ((0.25, 8), (0.25, 32), (0.0, 8), (0.0, 32)):
        ratios: list[float] = []
        rpss: list[float] = []
        for _ in range(max(1, args.runs)):
            with FakeServer(root, latency) as fake:
                result = drive(fake.url, clients, seconds)
                summary = fake.stop()
            result.update(latency=latency, fake_cpu_seconds=round(summary.cpu_seconds, 2))
            result["fake_max_concurrent"] = summary.max_concurrent
            detail["runs"].append(result)
            print(f"  fake alone: latency {latency}, {clients} clients: {result}")
            rpss.append(result["rps"])
            if latency:
                ratios.append(result["rps"] / (clients / latency))
        if latency:
            figures.append(
                Figure(
                    f"fake alone, latency {latency}, C={clients}: rps÷(C÷L)",
                    round(median(ratios), 3),
                    "ratio",
                    "≥ 0.98 (not the bottleneck)",
                    median(ratios) >= 0.98,
                    [round(r, 3) for r in ratios],
                )
            )
        else:
            figures.append(
                Figure(
                    f"fake alone, latency 0, C={clients}: requests/s",
                    round(median(rpss), 1),
                    "req/s",
                    "≫ 200",
                    median(rpss) >= 400,
                    rpss,
                )
            )
    save("fake", figures, detail)
    return figures
