"""Several daemons, each with its own state_dir, on one shared folder (promise 4).

A file is claimed by exactly one of them (an atomic rename) and uploaded once;
a daemon killed with claims in hand has them adopted by a sibling once its
lease has expired.
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from sfwatch.config import load_config
from sfwatch.daemon import instance_name
from sfwatch.slots import prepared_ahead
from tests.conftest import daemon_process, running_daemon, wait_until, write_config
from tests.fakeapi import FakeAPI, Reply, Upload, stall
from tests.test_crash import all_done, assert_delivered, done_files, print_logs, sha, wav


def sibling_configs(
    tmp_path: Path, url: str, shared: Path, names: str, **api: object
) -> list[Path]:
    """One config per name, each with its own state_dir, all watching ``shared``."""
    configs = []
    for name in names:
        folder = tmp_path / name
        folder.mkdir()
        configs.append(write_config(folder, url, api=dict(api), watch={"path": str(shared)}))
        (folder / "inbox").rmdir()  # write_config's default inbox: not used here
    return configs


def drop(shared: Path, rel: str, data: bytes) -> None:
    """Write one file into the shared inbox."""
    path = shared / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.mark.slow
def test_three_daemons_share_one_folder(tmp_path: Path, fake_api: FakeAPI) -> None:
    """Three daemons, 300 files: each uploaded exactly once, all done, every daemon worked."""
    seed = random.SystemRandom().randrange(2**32)
    print(f"seed={seed}")
    rng, lock = random.Random(seed), threading.Lock()

    def respond(_upload: Upload) -> Reply:
        with lock:
            return Reply(delay=rng.uniform(0.02, 0.1))

    fake_api.responder = respond
    shared = tmp_path / "shared"
    shared.mkdir()
    configs = sibling_configs(tmp_path, fake_api.url, shared, "abc", concurrency=4)
    files = {
        f"{rng.choice(['', '', 'sub/', 'sub/deeper/'])}rec-{i:03d}.wav": wav(rng, 0.1)
        for i in range(300)
    }
    names = list(files)
    for rel in names[:60]:  # present before any daemon starts
        drop(shared, rel, files[rel])
    with contextlib.ExitStack() as stack:
        daemons = [stack.enter_context(daemon_process(c)) for c in configs]
        for d in daemons:
            d.wait_event("sfwatch.daemon_started")
        for i, rel in enumerate(names[60:]):
            drop(shared, rel, files[rel])
            if i % 20 == 19:
                time.sleep(0.2)  # arrivals spread over a few seconds
        try:
            wait_until(lambda: all_done(shared, len(files)), 90, "every file done")
        except BaseException:
            print_logs(tmp_path, ("error", "warning"))
            raise
        for d in daemons:
            d.signal(signal.SIGTERM)
        assert [d.wait(30) for d in daemons] == [0, 0, 0]

    assert_delivered(tmp_path, shared, list(files.values()))
    twice = {
        rel: [u.status for u in fake_api.uploads_of(sha(data))]
        for rel, data in files.items()
        if [u.status for u in fake_api.uploads_of(sha(data))] != [200]
    }
    assert twice == {}, "files not uploaded exactly once"
    assert len(fake_api.uploads) == len(files)
    shares = [len(d.events("sfwatch.job_finished")) for d in daemons]
    print("files finished per daemon:", shares)
    assert sum(shares) == len(files)
    assert all(n > 0 for n in shares), "a daemon did no work"
    assert not any(d.events("sfwatch.claims_adopted") for d in daemons)


@pytest.mark.slow
def test_sibling_adopts_a_killed_daemons_claims(tmp_path: Path, fake_api: FakeAPI) -> None:
    """A's uploads stall, A is SIGKILLed; B adopts A's claims once the lease expires, not before."""
    stalling, stalled = threading.Event(), []

    def respond(upload: Upload) -> Reply | None:
        if stalling.is_set():
            stalled.append(upload)
            return stall(60)
        return None

    stalling.set()
    fake_api.responder = respond
    shared = tmp_path / "shared"
    shared.mkdir()
    config_a, config_b = sibling_configs(
        tmp_path, fake_api.url, shared, "ab", concurrency=2, timeout_seconds=60
    )
    instance_a = instance_name(load_config(config_a).state_dir)
    work_a = shared / ".sfwatch" / "work" / instance_a
    rng = random.Random()
    files = {f"rec-{i}.wav": wav(rng) for i in range(6)}
    lease = 4.0  # > the 2 s between lease renewals, with room for a busy machine
    ahead = prepared_ahead(2)

    with daemon_process(config_a) as a:
        a.wait_event("sfwatch.daemon_started")
        for rel, data in files.items():
            drop(shared, rel, data)
        wait_until(lambda: len(stalled) == 2 and fake_api.in_flight == 2, 15, "A's 2 uploads")

        def claims_of_a() -> list[str]:
            return sorted(p.name for p in work_a.iterdir() if p.is_dir())

        # Two uploading, and the files A prepares ahead of their turn (slots.py).
        wait_until(lambda: len(claims_of_a()) == 2 + ahead, 15, "A's claims")
        held = claims_of_a()
        stalling.clear()
        with capture_logs() as logs, running_daemon(config_b, lease_seconds=lease):
            started = time.monotonic()
            rest = len(files) - len(held)
            wait_until(lambda: len(done_files(shared)) == rest, 20, "B did the others")
            # B watches A's lease, renewed while A lives, for longer than lease_seconds.
            time.sleep(max(0.0, started + lease + 1.5 - time.monotonic()))
            assert not [e for e in logs if e["event"] == "sfwatch.claims_adopted"]
            assert sorted(p.name for p in work_a.iterdir() if p.is_dir()) == held
            assert fake_api.in_flight == 2, "A's uploads are still running"
            a.kill()  # SIGKILL
            wait_until(lambda: all_done(shared, len(files)), 30, "B finished A's files")

    adopted = [e for e in logs if e["event"] == "sfwatch.claims_adopted"]
    assert [(e["from_instance"], e["jobs"]) for e in adopted] == [(instance_a, len(held))]
    resumed = {e["job_id"] for e in logs if e["event"] == "sfwatch.job_resumed"}
    assert resumed == set(held), "B resumed exactly A's jobs, under their job ids"
    assert_delivered(tmp_path, shared, list(files.values()))
    statuses = {rel: [u.status for u in fake_api.uploads_of(sha(d))] for rel, d in files.items()}
    taken_from_a = {u.sha256 for u in stalled}
    for rel, data in files.items():
        expected = [0, 200] if sha(data) in taken_from_a else [200]
        assert statuses[rel] == expected, (rel, statuses)
    assert not work_a.exists(), "A's instance folder was cleaned up"
