"""Worker processes (``workers: N``, sfwatch/workers.py): real ``sfwatch run`` processes
with real children, real signals, one ledger, the fake API on loopback."""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from structlog.testing import capture_logs

from sfwatch.config import load_config, parse_config
from sfwatch.daemon import instance_name
from sfwatch.errors import ConfigError
from sfwatch.ledger import Ledger, OutboxEvent
from sfwatch.runstatus import WorkerReports, merged
from sfwatch.workers import Share
from tests.audiogen import wav_bytes
from tests.conftest import daemon_process, run_cli, running_daemon, wait_until, write_config
from tests.fakeapi import R401, FakeAPI, Reply, Upload, stall
from tests.test_crash import all_done, assert_delivered, print_logs, sha, wav
from tests.test_metrics import free_port, listening_ports, scrape, value
from tests.test_outbox import receiver


def names_for(inbox: Path, count: int, worker: int, of: int = 2, prefix: str = "rec") -> list[str]:
    """``count`` file names in ``inbox`` that worker ``worker`` of ``of`` takes."""
    share = Share(worker, of)
    found: list[str] = []
    i = 0
    while len(found) < count:
        name = f"{prefix}-{i:04d}.wav"
        if share.owns(inbox / name):
            found.append(name)
        i += 1
    return found


def pids_alive(pids: list[int]) -> list[int]:
    """The pids of ``pids`` that still run (zombies count as gone)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def gone(pid: int) -> bool:
    """The process ``pid`` has ended."""
    return not pids_alive([pid])


def worker_pids(lines: list[dict[str, object]]) -> list[int]:
    """The pids of the workers the face started, as it logged them."""
    return [int(str(e["pid"])) for e in lines if e.get("event") == "sfwatch.worker_started"]


def ledger_rows(state: Path) -> list[tuple[str, str, str, str | None]]:
    """(instance, root, rel, outcome) of every job in the ledger."""
    with sqlite3.connect(state / "ledger.sqlite3") as db:
        return list(db.execute("SELECT instance, root, rel, outcome FROM jobs"))


def config_with_workers(tmp_path: Path, url: str, workers: object, **api: object) -> Path:
    """A config in ``tmp_path`` with ``workers``."""
    return write_config(tmp_path, url, api=dict(api), extra={"workers": workers})


def killed_with_claims(
    tmp_path: Path, fake_api: FakeAPI, per_worker: int
) -> tuple[Path, dict[str, bytes], list[int]]:
    """A face of ``workers: 2`` SIGKILLed with both workers' uploads in flight (the fake
    answers again afterwards): its config, the files dropped, its workers' pids."""
    stalling = threading.Event()
    stalling.set()
    fake_api.responder = lambda _u: stall(30) if stalling.is_set() else None
    config = config_with_workers(tmp_path, fake_api.url, 2, timeout_seconds=30)
    inbox = tmp_path / "inbox"
    rng = random.Random()
    names = names_for(inbox, per_worker, 0) + names_for(inbox, per_worker, 1)
    files = {n: wav(rng, 0.1) for n in names}
    for name, data in files.items():
        (inbox / name).write_bytes(data)
    with daemon_process(config) as face:
        wait_until(lambda: fake_api.in_flight == 4, 20, "both workers' uploads")
        children = worker_pids(face.lines())
        face.kill()
    stalling.clear()
    return config, files, children


# -- the config -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "between 1 and 64"),
        (65, "between 1 and 64"),
        ("many", "integer or auto"),
        (True, "must be an integer"),
        (5, "api.concurrency is 4"),
    ],
)
def test_a_bad_workers_value_names_the_key(tmp_path: Path, value: object, message: str) -> None:
    """workers: 0, 65, a word, a boolean, more than api.concurrency: an error naming the key."""
    data = {
        "api": {"concurrency": 4},
        "state_dir": str(tmp_path / "state"),
        "watch": [{"path": str(tmp_path / "in")}],
        "workers": value,
    }
    with pytest.raises(ConfigError, match=message) as caught:
        parse_config(data, tmp_path, env={})
    assert caught.value.key == "workers"


def test_workers_auto_is_one_per_cpu_within_the_concurrency(tmp_path: Path) -> None:
    """workers: auto is the CPUs this process may use, at most api.concurrency."""
    cpus = len(os.sched_getaffinity(0))
    for concurrency in (1, 64):
        data = {
            "api": {"concurrency": concurrency},
            "state_dir": str(tmp_path / "state"),
            "watch": [{"path": str(tmp_path / "in")}],
            "workers": "auto",
        }
        assert parse_config(data, tmp_path, env={}).workers == min(cpus, concurrency)


def test_shares_split_the_files_and_the_concurrency(tmp_path: Path) -> None:
    """Every path belongs to exactly one of N workers, and their concurrencies add up."""
    data = {
        "api": {"concurrency": 7, "requests_per_minute": 60},
        "state_dir": str(tmp_path / "state"),
        "watch": [{"path": str(tmp_path / "in")}],
        "workers": 3,
    }
    config = parse_config(data, tmp_path, env={})
    shares = [Share(i, 3) for i in range(3)]
    paths = [tmp_path / "in" / f"sub{i % 7}" / f"f{i}.wav" for i in range(3000)]
    owners = [[s.index for s in shares if s.owns(p)] for p in paths]
    assert all(len(o) == 1 for o in owners)
    counts = [sum(o == [i] for o in owners) for i in range(3)]
    assert min(counts) > 800, f"an uneven split: {counts}"
    assert sum(s.config(config).api.concurrency for s in shares) == 7
    assert {s.config(config).api.requests_per_minute for s in shares} == {20.0}
    assert {s.instance("h-1") for s in shares} == {"h-1", "h-1-w1", "h-1-w2"}
    for bad in ("0/2", "2/2", "x", "1/"):
        with pytest.raises(ConfigError, match="K/N"):
            Share.parse(bad)


# -- real processes ---------------------------------------------------------------------------


@pytest.mark.slow
def test_two_workers_share_the_files_and_one_ledger(tmp_path: Path, fake_api: FakeAPI) -> None:
    """60 files, workers: 2: each uploaded once, each worker takes exactly its share,
    both write the one ledger, status shows both, and one SIGTERM stops both."""
    fake_api.responder = lambda _u: Reply(delay=0.05)
    config = config_with_workers(tmp_path, fake_api.url, 2)
    inbox = tmp_path / "inbox"
    rng = random.Random()
    files = {f"{'sub/' if i % 3 == 0 else ''}rec-{i:03d}.wav": wav(rng, 0.1) for i in range(60)}
    for rel in list(files)[:30]:
        (inbox / rel).parent.mkdir(exist_ok=True)
        (inbox / rel).write_bytes(files[rel])
    with daemon_process(config) as face:
        face.wait_event("sfwatch.daemon_started", count=2)
        for rel in list(files)[30:]:
            (inbox / rel).write_bytes(files[rel])
        try:
            wait_until(lambda: all_done(inbox, len(files)), 60, "every file done")
        except BaseException:
            print_logs(tmp_path, ("error", "warning"))
            raise
        status = run_cli("status", "--json", "-c", str(config))
        children = worker_pids(face.lines())
        assert len(children) == 1
        face.signal(signal.SIGTERM)
        assert face.wait(30) == 0
        wait_until(lambda: not pids_alive(children), 10, "the worker gone with the face")

    assert_delivered(tmp_path, inbox, list(files.values()))
    assert sorted(len(fake_api.uploads_of(sha(d))) for d in files.values()) == [1] * len(files)
    base = instance_name(load_config(config).state_dir)
    rows = ledger_rows(tmp_path / "state")
    assert len(rows) == len(files)
    for instance, root, rel, outcome in rows:
        owner = Share(0, 2) if instance == base else Share(1, 2)
        assert instance in (base, f"{base}-w1"), instance
        assert owner.owns(Path(root) / rel), f"{rel} taken by {instance}, not its owner"
        assert outcome == "done"
    assert {r[0] for r in rows} == {base, f"{base}-w1"}, "a worker did no work"
    daemons = {d["instance"] for d in json.loads(status.stdout)["daemons"]}
    assert daemons == {base, f"{base}-w1"}
    stops = face.events("sfwatch.daemon_stopping")
    assert sorted(e.get("worker", 0) for e in stops) == [0, 1]
    assert {e["mode"] for e in stops} == {"warm"}


@pytest.mark.slow
def test_the_same_recording_in_two_workers_shares_is_paid_once(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """One recording under a name of worker 0's, then under one of worker 1's: one upload."""
    config = config_with_workers(tmp_path, fake_api.url, 2)
    inbox = tmp_path / "inbox"
    data = wav(random.Random(), 0.2)
    first, second = names_for(inbox, 1, 0)[0], names_for(inbox, 1, 1)[0]
    with daemon_process(config) as face:
        face.wait_event("sfwatch.daemon_started", count=2)
        (inbox / first).write_bytes(data)
        wait_until(lambda: all_done(inbox, 1), 30, "the first copy done")
        (inbox / second).write_bytes(data)
        wait_until(lambda: all_done(inbox, 2), 30, "the second copy done")
        face.signal(signal.SIGTERM)
        assert face.wait(30) == 0
    assert len(fake_api.uploads_of(sha(data))) == 1
    outcomes = {
        e["file"].rsplit("/", 1)[-1]: e["outcome"] for e in face.events("sfwatch.job_finished")
    }
    assert outcomes == {first: "done", second: "dedup"}
    assert [e.get("worker") for e in face.events("sfwatch.job_finished")] == [None, 1]


@pytest.mark.slow
def test_a_killed_worker_is_started_again_and_finishes_its_claims(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """Worker 1 SIGKILLed with uploads in flight: the face starts it again, and the new
    one resumes the claims its old self left; nothing is lost, none is vanished."""
    stalling = threading.Event()
    stalling.set()

    def respond(upload: Upload) -> Reply | None:
        return stall(30) if stalling.is_set() else None

    fake_api.responder = respond
    config = config_with_workers(tmp_path, fake_api.url, 2, timeout_seconds=30)
    inbox = tmp_path / "inbox"
    rng = random.Random()
    files = {name: wav(rng, 0.1) for name in names_for(inbox, 6, 1)}
    with daemon_process(config) as face:
        face.wait_event("sfwatch.daemon_started", count=2)
        for name, data in files.items():
            (inbox / name).write_bytes(data)
        wait_until(lambda: fake_api.in_flight == 2, 20, "worker 1's two uploads")
        [child] = worker_pids(face.lines())
        os.kill(child, signal.SIGKILL)
        stalling.clear()
        died = face.wait_event("sfwatch.worker_died")[0]
        assert died["signal"] == "SIGKILL" and died["worker"] == 1
        face.wait_event("sfwatch.worker_started", count=2)
        try:
            wait_until(lambda: all_done(inbox, len(files)), 60, "every file done")
        except BaseException:
            print_logs(tmp_path, ("error", "warning"))
            raise
        face.signal(signal.SIGTERM)
        assert face.wait(30) == 0
        assert not face.events("sfwatch.job_vanished")
        assert not face.events("sfwatch.claims_adopted"), "resumed by its new self, not adopted"
    assert_delivered(tmp_path, inbox, list(files.values()))
    # The two killed in flight went again (never answered: not paid); the rest once.
    assert sum(len(fake_api.uploads_of(sha(d))) for d in files.values()) == len(files) + 2


def test_the_face_s_metrics_count_every_worker_and_a_restart_keeps_the_count(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """The face's /metrics counts both workers' files; a worker SIGKILLed and started
    again keeps its earlier counts in the total (a counter never goes down)."""
    port = free_port()
    listen = {"listen": f"127.0.0.1:{port}"}
    config = write_config(tmp_path, fake_api.url, extra={"workers": 2, "metrics": listen})
    inbox = tmp_path / "inbox"
    done = {"outcome": "done", "reason": ""}

    def counted(n: int) -> bool:
        return value(scrape(port), "sfwatch_files_total", **done) == n

    with daemon_process(config) as face:
        face.wait_event("sfwatch.daemon_started", count=2)
        for name in names_for(inbox, 3, 0) + names_for(inbox, 3, 1):
            (inbox / name).write_bytes(wav_bytes(3000))
        wait_until(lambda: counted(6), 20, "six files counted")
        [child] = worker_pids(face.lines())
        assert listening_ports(child) == []
        assert listening_ports(face.proc.pid) == [port]
        os.kill(child, signal.SIGKILL)
        face.wait_event("sfwatch.worker_started", count=2)
        for name in names_for(inbox, 2, 1, prefix="more"):
            (inbox / name).write_bytes(wav_bytes(5000))
        wait_until(lambda: counted(8), 20, "eight files counted")
        after = scrape(port)
        face.signal(signal.SIGTERM)
        assert face.wait(30) == 0
    assert value(after, "sfwatch_uploads_total", status_class="2xx") == 8
    assert value(after, "sfwatch_upload_seconds_count") == 8
    assert value(after, "sfwatch_upload_seconds_bucket", le="+Inf") == 8
    assert value(after, "sfwatch_bytes_uploaded_total") == sum(u.size for u in fake_api.uploads)
    assert value(after, "sfwatch_last_success_timestamp_seconds") > time.time() - 60


def test_an_account_fault_both_workers_meet_is_announced_once(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """A 401 paused both workers and their probes resumed both: the webhook hears one
    `paused` and one `resumed`, then each file's `done`."""
    fake_api.set_default(R401)
    fake_api.info_reply = R401
    with receiver() as hooks:
        config = write_config(
            tmp_path, fake_api.url, extra={"workers": 2, "webhooks": [{"url": hooks.url}]}
        )
        inbox = tmp_path / "inbox"
        names = names_for(inbox, 1, 0) + names_for(inbox, 1, 1)
        with daemon_process(config) as face:
            face.wait_event("sfwatch.daemon_started", count=2)
            for name in names:
                (inbox / name).write_bytes(wav_bytes(3000))
            paused = face.wait_event("sfwatch.uploads_paused", count=2, timeout=20)
            assert {e.get("worker", 0) for e in paused} == {0, 1}
            fake_api.set_default(None)
            fake_api.info_reply = None
            face.wait_event("sfwatch.uploads_resumed", count=2, timeout=30)
            wait_until(lambda: all_done(inbox, 2), 20, "both files done")
            wait_until(lambda: len(hooks.accepted()) >= 4, 20, "the events delivered")
            face.signal(signal.SIGTERM)
            assert face.wait(30) == 0
    types = [r.json["type"] for r in hooks.accepted()]
    assert sorted(types) == ["done", "done", "paused", "resumed"], types
    assert types.index("paused") < types.index("resumed")


@pytest.mark.slow
def test_killing_the_face_takes_its_workers_and_a_restart_finishes_everything(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """SIGKILL to the face: its worker dies with it (no orphan works on); the next run
    finishes every file, and neither worker's start-up takes the other's rows as lost."""
    config, files, children = killed_with_claims(tmp_path, fake_api, 6)
    inbox = tmp_path / "inbox"
    wait_until(lambda: not pids_alive(children), 10, "the worker killed with its face")
    with daemon_process(config, "--burst") as again:
        assert again.wait(60) == 0
        assert not again.events("sfwatch.job_vanished")
    assert_delivered(tmp_path, inbox, list(files.values()))
    assert {r[3] for r in ledger_rows(tmp_path / "state")} == {"done"}


@pytest.mark.slow
def test_sigterm_to_every_process_is_one_warm_stop(tmp_path: Path, fake_api: FakeAPI) -> None:
    """A unit's KillMode=control-group signals every process at once: the workers ignore
    it and stop warm when the face passes it on; uploads in flight finish."""
    fake_api.responder = lambda _u: Reply(delay=1.5)
    config = config_with_workers(tmp_path, fake_api.url, 2)
    inbox = tmp_path / "inbox"
    rng = random.Random()
    files = {n: wav(rng, 0.1) for n in names_for(inbox, 2, 0) + names_for(inbox, 2, 1)}
    with daemon_process(config) as face:
        face.wait_event("sfwatch.daemon_started", count=2)
        for name, data in files.items():
            (inbox / name).write_bytes(data)
        wait_until(lambda: fake_api.in_flight == 4, 20, "four uploads in flight")
        [child] = worker_pids(face.lines())
        os.kill(child, signal.SIGTERM)
        face.signal(signal.SIGTERM)
        assert face.wait(30) == 0
        stops = face.events("sfwatch.daemon_stopping")
    assert sorted((e.get("worker", 0), e["mode"]) for e in stops) == [(0, "warm"), (1, "warm")]
    assert all_done(inbox, len(files)), "the uploads in flight were not let finish"


@pytest.mark.slow
def test_a_workers_finished_files_run_the_face_s_hooks(tmp_path: Path, fake_api: FakeAPI) -> None:
    """Hooks of files worker 1 finished are delivered once each, by the face."""
    marks = tmp_path / "marks"
    marks.mkdir()
    config = write_config(
        tmp_path,
        fake_api.url,
        extra={
            "workers": 2,
            "hooks": {"on_done": ["sh", "-c", f'touch "{marks}/$SFWATCH_JOB_ID"']},
        },
    )
    inbox = tmp_path / "inbox"
    rng = random.Random()
    names = names_for(inbox, 3, 0) + names_for(inbox, 3, 1)
    for name in names:
        (inbox / name).write_bytes(wav(rng, 0.1))
    with daemon_process(config, "--burst") as face:
        assert face.wait(60) == 0
        hooks = face.events("sfwatch.hook_finished")
    finished = {e["job_id"] for e in face.events("sfwatch.job_finished")}
    assert len(finished) == len(names)
    assert {p.name for p in marks.iterdir()} == finished
    assert len(hooks) == len(names)
    assert {e.get("worker") for e in hooks} == {None}, "a hook run by a worker, not the face"


@pytest.mark.slow
def test_each_worker_reconciles_only_its_own_rows(tmp_path: Path, fake_api: FakeAPI) -> None:
    """An open row of worker 1 whose claimed file is gone is worker 1's to call vanished,
    one of another instance name the face's: each row is reconciled by one process."""
    config = config_with_workers(tmp_path, fake_api.url, 2)
    state = load_config(config).state_dir
    base = instance_name(state)
    Ledger.in_state_dir(state).close()  # (the schema)
    with sqlite3.connect(state / "ledger.sqlite3") as db:
        for job_id, instance in (("j-w1", f"{base}-w1"), ("j-old", "oldhost-1a2b3c4d")):
            db.execute(
                "INSERT INTO jobs (job_id, instance, root, rel, size, status, work_path,"
                " created, updated) VALUES (?, ?, ?, 'gone.wav', 10, 'claimed', ?, 0, 0)",
                (job_id, instance, str(tmp_path / "inbox"), str(tmp_path / "no" / "gone.wav")),
            )
    with daemon_process(config, "--burst") as face:
        assert face.wait(30) == 0
    vanished = face.events("sfwatch.job_vanished")
    # (a row of another host name, here before a rename, is the face's alone)
    assert sorted((e["job_id"], e.get("worker")) for e in vanished) == [
        ("j-old", None),
        ("j-w1", 1),
    ]


@pytest.mark.slow
def test_a_stop_while_a_worker_waits_to_be_started_again_is_quick(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """SIGTERM while a dead worker waits out its restart delay: the face stops warm at
    once, not after the grace period, and the worker is not started again."""
    config = config_with_workers(tmp_path, fake_api.url, 2)
    with daemon_process(config) as face:
        face.wait_event("sfwatch.daemon_started", count=2)
        [child] = worker_pids(face.lines())
        os.kill(child, signal.SIGKILL)
        face.wait_event("sfwatch.worker_died")
        face.signal(signal.SIGTERM)
        assert face.wait(10) == 0
        assert len(face.events("sfwatch.worker_started")) == 1
        assert {e["mode"] for e in face.events("sfwatch.daemon_stopping")} == {"warm"}


@pytest.mark.slow
def test_a_worker_that_reads_another_config_stops_and_the_face_says_so(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """The config file's state_dir edited, then worker 1 dies: the one started again reads
    the new file, refuses it (exit 2), is not started again, and the face logs why."""
    config = config_with_workers(tmp_path, fake_api.url, 2)
    with daemon_process(config) as face:
        face.wait_event("sfwatch.daemon_started", count=2)
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
        data["state_dir"] = str(tmp_path / "elsewhere")
        config.write_text(yaml.safe_dump(data), encoding="utf-8")
        [child] = worker_pids(face.lines())
        os.kill(child, signal.SIGKILL)
        failed = face.wait_event("sfwatch.worker_failed", timeout=20)
        assert failed[0]["code"] == 2
        raw = [e.get("raw", "") for e in face.lines()]
        assert any("state_dir: changed since the service started" in r for r in raw), raw
        face.signal(signal.SIGTERM)
        assert face.wait(20) == 1, "a worker that could not run is a failed run"
    assert len(face.events("sfwatch.worker_started")) == 2
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.slow
def test_fewer_workers_after_a_crash_adopt_the_claims_of_the_ones_gone(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """workers: 2 killed with claims in hand, restarted as workers: 1: worker 1's claims
    are left to the lease, then adopted; their rows become the face's, and end done;
    `sfwatch status` no longer lists worker 1."""
    config, files, _ = killed_with_claims(tmp_path, fake_api, 3)
    inbox = tmp_path / "inbox"
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    data["workers"] = 1
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    base = instance_name(load_config(config).state_dir)

    def listed() -> set[str]:
        report = json.loads(run_cli("status", "--json", "-c", str(config)).stdout)
        return {d["instance"] for d in report["daemons"]}

    assert listed() == {base, f"{base}-w1"}
    with capture_logs() as logs, running_daemon(config, lease_seconds=2.0) as one:
        wait_until(lambda: all_done(inbox, len(files)), 40, "every file done")
        one.stop()
    assert listed() == {base}
    events = [e["event"] for e in logs]
    assert "sfwatch.claims_adopted" in events
    assert "sfwatch.job_vanished" not in events
    assert_delivered(tmp_path, inbox, list(files.values()))
    assert {(r[0], r[3]) for r in ledger_rows(tmp_path / "state")} == {(base, "done")}


def test_workers_opening_a_new_ledger_at_once_all_succeed(tmp_path: Path) -> None:
    """Processes creating and upgrading one new ledger at the same moment all get it."""
    script = (
        "import sys, time; from pathlib import Path; from sfwatch.ledger import Ledger\n"
        "start = float(sys.argv[2])\n"
        "while time.time() < start: pass\n"
        "Ledger(Path(sys.argv[1])).close()\n"
    )
    for attempt in range(4):
        path = tmp_path / f"ledger-{attempt}.sqlite3"
        start = f"{time.time() + 0.6:.3f}"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(path), start], stderr=subprocess.PIPE
            )
            for _ in range(4)
        ]
        errors = [p.communicate(timeout=30)[1].decode() for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, errors


def test_the_face_s_status_adds_its_workers_numbers() -> None:
    """STATUS= and the gauges: the face's numbers plus each worker's; a pause shows."""
    own = {
        "queued": 3,
        "in_flight": 2,
        "uploading": 1,
        "limit": 2,
        "paused": False,
        "paused_reason": None,
        "counts": {"done": 5},
        "watches": ["/in"],
    }
    other = {
        "instance": "h-w1",
        "pid": 9,
        "updated": 0.0,
        "queued": 4,
        "in_flight": 2,
        "uploading": 2,
        "limit": 2,
        "paused": True,
        "paused_reason": "rate_limited",
        "counts": {"done": 7, "failed": 1},
    }
    total = merged(own, [other])
    assert (total["queued"], total["in_flight"], total["uploading"], total["limit"]) == (7, 4, 3, 4)
    assert total["counts"] == {"done": 12, "failed": 1}
    assert (total["paused"], total["paused_reason"]) == (True, "rate_limited")
    assert total["watches"] == ["/in"] and own["counts"] == {"done": 5}, "own changed"
    assert merged(own, []) is own


@pytest.mark.slow
def test_a_burst_ends_when_a_worker_keeps_dying(tmp_path: Path, fake_api: FakeAPI) -> None:
    """run --burst: a worker that dies three times in a row is not started again, and the
    run ends (exit 1) with its files left claimed for the next run, not lost."""
    fake_api.responder = lambda _u: stall(60)
    config = config_with_workers(tmp_path, fake_api.url, 2, timeout_seconds=60)
    inbox = tmp_path / "inbox"
    rng = random.Random()
    names = names_for(inbox, 2, 1)  # worker 1's alone: the face is idle
    for name in names:
        (inbox / name).write_bytes(wav(rng, 0.1))
    with daemon_process(config, "--burst") as face:
        for death in range(1, 4):
            wait_until(lambda: fake_api.in_flight == 2, 30, "worker 1's uploads")
            child = worker_pids(face.lines())[-1]
            os.kill(child, signal.SIGKILL)
            wait_until(functools.partial(gone, child), 10, "the worker dead")
            if death < 3:
                face.wait_event("sfwatch.worker_started", count=death + 1, timeout=20)
        assert face.wait(20) == 1
        assert face.events("sfwatch.worker_failed")
    base = instance_name(load_config(config).state_dir)
    rows = ledger_rows(tmp_path / "state")
    assert sorted((r[0], r[2], r[3]) for r in rows) == [(f"{base}-w1", n, None) for n in names]


@pytest.mark.slow
def test_a_signal_reaching_a_new_worker_before_its_handlers_is_held(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """A reload (SIGHUP) sent to a worker the moment it is started does not kill it: it
    reloads once its handlers are in place."""
    config = config_with_workers(tmp_path, fake_api.url, 2)
    with daemon_process(config) as face:
        [started] = face.wait_event("sfwatch.worker_started", timeout=20)
        os.kill(int(started["pid"]), signal.SIGHUP)  # (it is still importing Python)
        reloads = wait_until(
            lambda: [e for e in face.events("sfwatch.reload_finished") if e.get("worker") == 1],
            20,
            "worker 1's reload",
        )
        assert reloads
        assert not face.events("sfwatch.worker_died")
        face.signal(signal.SIGTERM)
        assert face.wait(20) == 0


def _signal_mask(pid: int, field: str) -> int:
    """``SigBlk`` (held) or ``SigCgt`` (handled) of ``pid``, from /proc (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields[field], 16)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_a_stop_while_the_daemon_starts_is_a_warm_stop(
    tmp_path: Path, fake_api: FakeAPI, workers: int
) -> None:
    """A SIGTERM that reaches ``sfwatch run`` while it still imports (its handlers not yet
    in place) is held until they are: a warm stop, exit 0, workers stopped, not a kill."""
    config = config_with_workers(tmp_path, fake_api.url, workers)
    term = 1 << (signal.SIGTERM - 1)
    with daemon_process(config) as face:
        pid = face.proc.pid
        wait_until(
            lambda: _signal_mask(pid, "SigBlk") & term and not _signal_mask(pid, "SigCgt") & term,
            20,
            "SIGTERM held before its handler",
        )
        face.signal(signal.SIGTERM)
        assert face.wait(30) == 0, face.lines()[-5:]
        assert face.events("sfwatch.daemon_stopping")[0]["mode"] == "warm"
        assert len(face.events("sfwatch.daemon_stopped")) == workers
        assert not face.events("sfwatch.worker_died")


def test_the_face_keeps_a_restarted_worker_s_counts() -> None:
    """A worker's new process starts counting at 0: the face adds its old self's last
    tally; a dead pid's row, a row older than its pid's worker (an earlier run's, the
    pid used again) and a malformed tally count for nothing."""
    reports = WorkerReports()
    own = {"queued": 0, "counts": {}}

    def state(pid: int, done: int, updated: float, **extra: object) -> dict[str, object]:
        tally = {"files": {"done/": done}, "uploads": {"2xx": done}, "buckets": ["bad"] * 13}
        row = {"instance": "h-w1", "pid": pid, "updated": updated, "queued": 1}
        return {**row, "metrics": tally, **extra}

    def done() -> float:
        return float(sum(t.get("files", {}).get("done/", 0) for t in reports.tallies()))

    live = {"h-w1"}
    earlier_run = state(10, 500, updated=50.0)
    assert reports.status(own, [earlier_run], live, running={10: 100.0})["queued"] == 0
    assert done() == 0, "pid 10 again, but the row is from before this worker started"
    reports.status(own, [state(10, 3, updated=101.0)], live, running={10: 100.0})
    assert done() == 3
    assert reports.status(own, [state(10, 4, updated=102.0)], live, running={})["queued"] == 0
    assert done() == 3, "a dead pid's row is not heard"
    reports.status(own, [state(11, 2, updated=110.0)], live, running={11: 105.0})
    assert done() == 3 + 2
    reports.status(own, [state(11, 5, 111.0, metrics=["nonsense"])], live, running={11: 105.0})
    assert done() == 3 + 2


def test_an_account_event_is_left_out_only_when_it_repeats_the_run_s_last(
    tmp_path: Path,
) -> None:
    """`paused` again for the same reason, or `resumed` again, in one run: left out; a
    new reason, a resume no sink hears, or another run: told again."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    hooked = "webhook:http://127.0.0.1:9/x"

    def tell(event: str, reason: str | None = None, run: str = "r1", sink: str = "notify") -> bool:
        row = OutboxEvent(event, sink, "account", None, {}, {"reason": reason}, 0.0)
        return ledger.account_told(run, event, reason, [row])

    try:
        told = [
            tell("paused", "unauthorized"),
            tell("paused", "unauthorized", sink=hooked),  # the second worker: left out
            tell("paused", "no_balance"),  # a new reason
            ledger.account_told("r1", "resumed", None, []),  # no sink hears resumes
            ledger.account_told("r1", "resumed", None, []),  # the second worker's
            tell("paused", "no_balance"),  # the next pause is told
            tell("paused", "no_balance", run="r2"),  # a new run, never resumed
            tell("paused", "no_balance", run="r2"),
        ]
        rows = [(r.event, r.payload["reason"]) for r in ledger.outbox_rows()]
    finally:
        ledger.close()
    assert told == [True, False, True, True, False, True, True, False]
    assert rows == [("paused", "unauthorized"), *[("paused", "no_balance")] * 3]
