"""Convergence (issue 9): whatever happened in between, every file ends exactly once.

A sibling frozen (SIGSTOP) past its lease wakes up after another daemon adopted
and finished its claims; a config changed between runs (a watched folder removed,
done_dir/failed_dir moved out of the inbox). Real ``sfwatch run`` subprocesses,
real signals, the fake API on loopback.

The lease is shortened with ``Daemon(lease_seconds=...)`` (there is no config or
environment knob): the daemons run as ``python -c LAUNCHER LEASE run -c CONFIG``,
which is ``sfwatch run`` with that one constructor default changed.
"""

from __future__ import annotations

import contextlib
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from sfwatch.config import load_config
from sfwatch.daemon import instance_name
from tests.conftest import (
    DaemonProcess,
    daemon_env,
    daemon_process,
    poll_until,
    wait_until,
    write_config,
)
from tests.fakeapi import FakeAPI, Reply, Upload, stall
from tests.test_crash import (
    all_done,
    assert_delivered,
    done_files,
    immutable,
    print_logs,
    sha,
    tree,
    wav,
)
from tests.test_multi import drop, sibling_configs

#: seconds; over twice the 2 s between lease renewals, so a live daemon's own lease stays fresh
LEASE = 6.0

#: ``sfwatch run`` with a short lease: ``python -c LAUNCHER LEASE run -c CONFIG``
LAUNCHER = """
import sys
import sfwatch.daemon

lease = float(sys.argv[1])
init = sfwatch.daemon.Daemon.__init__


def with_lease(self, *args, **kwargs):
    kwargs.setdefault("lease_seconds", lease)
    init(self, *args, **kwargs)


sfwatch.daemon.Daemon.__init__ = with_lease
from sfwatch.cli import main

sys.exit(main(sys.argv[2:]))
"""

NUMBERED = re.compile(r" \(\d+\)")


@contextlib.contextmanager
def sibling(config_path: Path, lease: float = LEASE) -> Iterator[DaemonProcess]:
    """``sfwatch run -c config_path`` with ``lease_seconds=lease``; killed at the end if up."""
    log_path = config_path.parent / f"daemon-{time.monotonic_ns()}.log"
    command = [sys.executable, "-c", LAUNCHER, str(lease), "run", "-c", str(config_path)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=daemon_env(), cwd=config_path.parent
        )
    running = DaemonProcess(proc, log_path)
    try:
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # (a frozen daemon dies of SIGKILL too; tidier)
        running.kill()


def ledger_rows(state_dir: Path) -> dict[str, str]:
    """job_id → status of every row in the ledger of ``state_dir``."""
    path = state_dir / "ledger.sqlite3"
    if not path.exists():
        return {}
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
        rows = db.execute("SELECT job_id, status FROM jobs").fetchall()
    return {str(job_id): str(status) for job_id, status in rows}


def claimed_rows(*state_dirs: Path) -> dict[str, str]:
    """Rows still ``claimed`` (the only non-terminal status) in these ledgers."""
    return {
        job_id: f"{state_dir.parent.name}: {status}"
        for state_dir in state_dirs
        for job_id, status in ledger_rows(state_dir).items()
        if status == "claimed"
    }


def paid_counts(fake_api: FakeAPI, contents: dict[str, bytes]) -> dict[str, int]:
    """name → uploads of its content that the fake answered 200 (paid); printed."""
    paid: Counter[str] = Counter(u.sha256 for u in fake_api.uploads if u.status == 200)
    counts = {name: paid[sha(data)] for name, data in contents.items()}
    print("paid per file:", counts, "all uploads:", [u.status for u in fake_api.uploads])
    return counts


def assert_converged(
    tmp_path: Path,
    *,
    shared: Path,
    contents: dict[str, bytes],
    fake_api: FakeAPI,
    state_dirs: list[Path],
    max_paid: int,
) -> None:
    """Each original once in done/ with its transcript; no (n) copies; paid <= max_paid."""
    print("tree:", sorted(p.relative_to(shared).as_posix() for p in tree(shared)))
    for state_dir in state_dirs:
        print("ledger", state_dir.parent.name, ledger_rows(state_dir))
    paid = paid_counts(fake_api, contents)
    numbered = sorted(
        p.relative_to(shared).as_posix() for p in tree(shared) if NUMBERED.search(p.name)
    )
    assert numbered == [], "' (n)' copies were made"
    assert_delivered(tmp_path, shared, list(contents.values()))
    inodes = Counter(p.stat().st_ino for p in done_files(shared))
    assert all(n == 1 for n in inodes.values()), "two names for one inode in done/"
    assert all(p.stat().st_nlink == 1 for p in done_files(shared)), "a done/ file has another name"
    assert all(1 <= n <= max_paid for n in paid.values()), paid
    assert claimed_rows(*state_dirs) == {}, "ledger rows left 'claimed' after both daemons stopped"


def stop(*daemons: DaemonProcess) -> None:
    """SIGTERM each daemon and check that it exits cleanly."""
    for d in daemons:
        d.signal(signal.SIGTERM)
    assert [d.wait(30) for d in daemons] == [0] * len(daemons)


def frozen_siblings(tmp_path: Path, fake_api: FakeAPI) -> tuple[Path, Path, Path, list[Path]]:
    """The shared folder, A's and B's configs, and their state_dirs."""
    shared = tmp_path / "shared"
    shared.mkdir()
    config_a, config_b = sibling_configs(
        tmp_path, fake_api.url, shared, "ab", concurrency=4, timeout_seconds=60
    )
    state_dirs = [load_config(c).state_dir for c in (config_a, config_b)]
    return shared, config_a, config_b, state_dirs


@pytest.mark.slow
def test_sibling_frozen_mid_upload_wakes_after_adoption(tmp_path: Path, fake_api: FakeAPI) -> None:
    """A frozen mid-upload past its lease; B adopts and finishes; A wakes: each file once."""
    holding, gate = threading.Event(), threading.Event()
    held: list[Upload] = []

    def respond(upload: Upload) -> Reply | None:
        if holding.is_set():
            held.append(upload)
            gate.wait(60)  # A's answers wait for the test
        return None

    holding.set()
    fake_api.responder = respond
    shared, config_a, config_b, state_dirs = frozen_siblings(tmp_path, fake_api)
    rng = random.Random()
    files = {f"rec-{i}.wav": wav(rng) for i in range(3)}
    try:
        with sibling(config_a) as a:
            a.wait_event("sfwatch.daemon_started")
            for rel, data in files.items():
                drop(shared, rel, data)
            wait_until(lambda: len(held) == 3 and fake_api.in_flight == 3, 15, "A's 3 uploads")
            holding.clear()
            a.signal(signal.SIGSTOP)
            with sibling(config_b) as b:
                try:
                    wait_until(lambda: all_done(shared, 3), LEASE + 20, "B finished A's files")
                    gate.set()  # A's answers are waiting in its socket when it wakes
                    wait_until(lambda: fake_api.in_flight == 0, 10, "A's uploads answered")
                    a.signal(signal.SIGCONT)
                    poll_until(lambda: not claimed_rows(state_dirs[0]), 15)
                    stop(a, b)
                except BaseException:
                    print_logs(tmp_path, ("error", "warning", "job_", "adopt"))
                    raise
    finally:
        gate.set()
    assert sum(e["jobs"] for e in b.events("sfwatch.claims_adopted")) == 3, (
        "B adopted A's three claims"
    )
    assert len(held) == 3
    assert_converged(
        tmp_path,
        shared=shared,
        contents=files,
        fake_api=fake_api,
        state_dirs=state_dirs,
        max_paid=2,
    )


@pytest.mark.slow
def test_sibling_frozen_mid_finish_wakes_after_adoption(tmp_path: Path, fake_api: FakeAPI) -> None:
    """A frozen after the upload (transcript written, move blocked); B adopts without paying."""
    shared, config_a, config_b, state_dirs = frozen_siblings(tmp_path, fake_api)
    done = shared / "done"
    done.mkdir()
    rng = random.Random()
    files = {f"rec-{i}.wav": wav(rng) for i in range(2)}

    def failed_jobs(d: DaemonProcess) -> set[str]:
        return {str(e.get("job_id")) for e in d.events("sfwatch.finish_failed")}

    with contextlib.ExitStack() as stack:
        a = stack.enter_context(sibling(config_a))
        try:
            a.wait_event("sfwatch.daemon_started")
            with immutable(done):  # the move to done/ fails: A retries it with backoff
                for rel, data in files.items():
                    drop(shared, rel, data)
                wait_until(lambda: len(failed_jobs(a)) == 2, 15, "A's 2 moves failed")
                a.signal(signal.SIGSTOP)
            assert sorted(p.name for p in shared.glob("*.txt")) == ["rec-0.txt", "rec-1.txt"]
            assert len(fake_api.uploads) == 2
            b = stack.enter_context(sibling(config_b))
            wait_until(lambda: all_done(shared, 2), LEASE + 20, "B finished A's files")
            a.signal(signal.SIGCONT)
            poll_until(lambda: not claimed_rows(state_dirs[0]), 15)
            stop(a, b)
        except BaseException:
            print_logs(tmp_path, ("error", "warning", "job_", "adopt"))
            raise
    # The job folder B adopted tells it the text A paid for (the design's sidecar).
    assert_converged(
        tmp_path,
        shared=shared,
        contents=files,
        fake_api=fake_api,
        state_dirs=state_dirs,
        max_paid=1,
    )


@pytest.mark.slow
def test_claim_in_a_folder_removed_from_the_config_is_finished(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """Killed with a claim in W2, W2 dropped from the config: the restart still finishes it."""
    stalling = threading.Event()
    stalling.set()

    def respond(_upload: Upload) -> Reply | None:
        return stall(60) if stalling.is_set() else None

    fake_api.responder = respond
    w2 = tmp_path / "w2"
    w2.mkdir()
    api = {"timeout_seconds": 60}
    second_watch = {"path": str(w2), "settle_seconds": 0.3, "rescan_seconds": 5}
    config = write_config(tmp_path, fake_api.url, api=api, extra_watches=[second_watch])
    state_dir = load_config(config).state_dir
    data = wav(random.Random())
    with daemon_process(config) as first:
        first.wait_event("sfwatch.daemon_started")
        drop(w2, "sub/a.wav", data)
        wait_until(lambda: fake_api.in_flight == 1, 15, "the upload reached the API")
        first.kill()  # SIGKILL
    claims = [p for p in tree(w2 / ".sfwatch") if p.name == "a.wav"]
    assert len(claims) == 1, "the file is claimed in W2's work area"
    assert claims[0].is_relative_to(w2 / ".sfwatch" / "work" / instance_name(state_dir))
    stalling.clear()

    write_config(tmp_path, fake_api.url, api=api)  # W2 is no longer watched
    with daemon_process(config) as second:
        second.wait_event("sfwatch.daemon_started")
        finished = poll_until(lambda: all_done(w2, 1), 10)
        stop(second)
    if not finished:
        print_logs(tmp_path, ("error", "warning", "job_", "w2"))
    print("tree:", sorted(p.relative_to(w2).as_posix() for p in tree(w2)))
    print("ledger:", ledger_rows(state_dir))
    assert finished, "the claim in W2 (no longer in the config) was not finished"
    assert (w2 / "done" / "sub" / "a.wav").read_bytes() == data
    assert_delivered(tmp_path, w2, [data])
    assert paid_counts(fake_api, {"a.wav": data}) == {"a.wav": 1}
    assert claimed_rows(state_dir) == {}


@pytest.mark.slow
def test_old_done_and_failed_are_not_ingested_when_the_dirs_move(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """done_dir/failed_dir moved out of the inbox: the old inbox/done and failed stay put."""
    config = write_config(tmp_path, fake_api.url)
    state_dir = load_config(config).state_dir
    inbox = tmp_path / "inbox"
    rng = random.Random()
    good, later = wav(rng), wav(rng)
    with daemon_process(config) as first:
        first.wait_event("sfwatch.daemon_started")
        drop(inbox, "a.wav", good)
        drop(inbox, "sub/bad.wav", b"not audio at all\n" * 64)
        wait_until(
            lambda: (
                (inbox / "done" / "a.wav").exists()
                and (inbox / "failed" / "sub" / "bad.wav.error.json").exists()
            ),
            15,
            "a.wav done, bad.wav failed",
        )
        stop(first)

    def snapshot() -> dict[str, tuple[int, str]]:
        return {
            p.relative_to(inbox).as_posix(): (p.stat().st_ino, sha(p.read_bytes()))
            for folder in (inbox / "done", inbox / "failed")
            for p in tree(folder)
            if p.is_file()
        }

    before, uploads = snapshot(), len(fake_api.uploads)
    assert sorted(before) == ["done/a.wav", "failed/sub/bad.wav", "failed/sub/bad.wav.error.json"]
    done_out, failed_out = tmp_path / "done-out", tmp_path / "failed-out"
    write_config(
        tmp_path, fake_api.url, watch={"done_dir": str(done_out), "failed_dir": str(failed_out)}
    )
    with daemon_process(config) as second:
        second.wait_event("sfwatch.scan_finished")
        drop(inbox, "c.wav", later)  # settles after anything the start-up scan found
        wait_until((done_out / "c.wav").exists, 15, "c.wav in the new done_dir")
        stop(second)
    print("tree:", sorted(p.relative_to(tmp_path).as_posix() for p in tree(tmp_path)))
    assert snapshot() == before, "the old inbox/done or inbox/failed files were touched"
    assert [u.sha256 for u in fake_api.uploads[uploads:]] == [sha(later)]
    assert sorted(p.relative_to(done_out).as_posix() for p in tree(done_out)) == ["c.wav"]
    assert not failed_out.exists() or tree(failed_out) == []
    assert not (inbox / "done" / "a.txt").exists()
    assert claimed_rows(state_dir) == {}
