"""kill -9 at any moment loses nothing, doubles nothing and pays (nearly) once.

Real ``sfwatch run`` subprocesses, SIGKILLed mid-work and started again on the
same state_dir; the fake API on loopback. Promises P1 and P4 of docs/design.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
import wave
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from sfwatch.claim import claim
from sfwatch.config import load_config
from sfwatch.daemon import instance_name
from sfwatch.finish import transcript_bytes
from sfwatch.fsutil import temp_name
from sfwatch.job import Plan
from sfwatch.ledger import Ledger
from sfwatch.prepare import identify
from sfwatch.scheduler import POISON_AFTER
from sfwatch.settle import SettledFile, signature_of
from sfwatch.slots import prepared_ahead
from tests.conftest import (
    DaemonProcess,
    daemon_process,
    running_daemon,
    wait_until,
    write_config,
)
from tests.fakeapi import R500, RESET, FakeAPI, Reply, Upload, stall

AUDIO_SUFFIXES = {".mp3", ".wav", ".m4a"}
KILLS = 5
CONCURRENCY = 4


def wav(rng: random.Random, seconds: float = 0.3, rate: int = 8000) -> bytes:
    """A small, real (decodable) WAV file of noise, unique for each call."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(rng.randbytes(int(seconds * rate) * 2))
    return buf.getvalue()


def sha(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def tree(folder: Path) -> list[Path]:
    """Every file and folder below ``folder``; what a running daemon removes meanwhile is skipped.

    (``Path.rglob`` raises when a folder vanishes under it.)
    """
    out: list[Path] = []
    for top, dirs, names in os.walk(folder):
        out.extend(Path(top) / name for name in [*dirs, *names])
    return out


def audio_in_inbox(inbox: Path) -> list[Path]:
    """Audio files still in the inbox proper (not in done/, failed/ or the work area)."""
    skip = {"done", "failed", ".sfwatch"}
    return [
        p
        for p in tree(inbox)
        if p.is_file()
        and p.suffix in AUDIO_SUFFIXES
        and not skip.intersection(p.relative_to(inbox).parts[:1])
    ]


def work_leftovers(inbox: Path) -> list[str]:
    """Everything in the work area except the instances' lease files and folders."""
    work = inbox / ".sfwatch"
    if not work.exists():
        return []
    out = []
    for p in tree(work):
        rel = p.relative_to(work)
        if p.is_file() and p.name == ".lease":
            continue
        if p.is_dir() and len(rel.parts) <= 2:  # work/, work/<instance>/
            continue
        out.append(rel.as_posix())
    return sorted(out)


def done_files(inbox: Path) -> list[Path]:
    """Every file in done/."""
    done = inbox / "done"
    return [p for p in tree(done) if p.is_file()]


def all_done(inbox: Path, expected: int) -> bool:
    """``expected`` files in done/, none waiting in the inbox, no claim left."""
    return (
        len(done_files(inbox)) == expected
        and not audio_in_inbox(inbox)
        and not work_leftovers(inbox)
    )


def assert_delivered(root: Path, inbox: Path, contents: list[bytes]) -> None:
    """Each dropped content is in done/ exactly once, with its transcript beside it."""
    done = inbox / "done"
    found = sorted(sha(p.read_bytes()) for p in done_files(inbox))
    assert found == sorted(sha(c) for c in contents), "done/ does not hold each file once"
    assert not audio_in_inbox(inbox), "files left in the inbox"
    assert tree(inbox / "failed") == [], "files in failed/"
    assert work_leftovers(inbox) == []
    transcripts = {
        p
        for p in tree(inbox)
        if p.suffix == ".txt"
        and not {"done", "failed", ".sfwatch"}.intersection(p.relative_to(inbox).parts[:1])
    }
    for original in done_files(inbox):
        rel = original.relative_to(done)
        transcript = inbox / rel.parent / f"{original.stem}.txt"
        assert transcript in transcripts, f"no transcript with the stem of done/{rel}"
        expected = FakeAPI.text_for(sha(original.read_bytes())) + "\n"
        assert transcript.read_text(encoding="utf-8") == expected, transcript
        transcripts.discard(transcript)
    assert not transcripts, f"transcripts without an original: {sorted(map(str, transcripts))}"
    temps = [str(p) for p in tree(root) if p.name.endswith(".sfwatch-tmp")]
    assert temps == [], "temporary files left behind"


def upload_table(uploads: list[Upload], names: dict[str, list[str]]) -> Counter[str]:
    """Print uploads per content (paid = answered 200); return the paid counts."""
    paid: Counter[str] = Counter(u.sha256 for u in uploads if u.status == 200)
    other: Counter[str] = Counter(u.sha256 for u in uploads if u.status != 200)
    print(f"{'file(s)':<40} {'sha256':<12} {'paid':>4} {'other':>5}")
    for digest, files in sorted(names.items(), key=lambda kv: kv[1]):
        print(f"{', '.join(files)[:40]:<40} {digest[:12]} {paid[digest]:>4} {other[digest]:>5}")
    print(f"uploads: {len(uploads)}, paid: {sum(paid.values())}, files: {len(names)}")
    return paid


def risky_to_kill(state_dir: Path) -> bool:
    """A job that crashed POISON_AFTER - 1 times is running: a kill now would poison it."""
    path = state_dir / "ledger.sqlite3"
    if not path.exists():
        return False
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=5)) as db:
            (n,) = db.execute(
                "SELECT count(*) FROM jobs WHERE running = 1 AND crashes >= ?",
                (POISON_AFTER - 1,),
            ).fetchone()
    except sqlite3.Error:
        return False
    return bool(n)


def print_logs(root: Path, events: tuple[str, ...] = ()) -> None:
    """Print the daemons' log lines (those naming ``events``, or all), for a failing run."""
    for log in sorted(root.glob("daemon-*.log")):
        print(f"--- {log.name}")
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            if not events or any(e in line for e in events):
                print(line)


@dataclass
class Drop:
    """A file the test drops into the inbox at ``at`` s (once ``after`` is in done/)."""

    rel: str
    data: bytes
    at: float
    after: str | None = None
    dropped_at: float | None = None  # time.monotonic() when it was written


def drop_plan(rng: random.Random, span: float) -> list[Drop]:
    """50 files over ``span`` s, some in subfolders, one duplicate, one name reused."""
    drops = []
    for i in range(50):
        folder = rng.choice(["", "", "", "sub/", "sub/deeper/"])
        data = wav(rng, rng.uniform(0.1, 2.0))
        drops.append(Drop(f"{folder}rec-{i:02d}.wav", data, rng.uniform(0, span)))
    drops.append(Drop("sub/memo.wav", wav(rng), rng.uniform(0, span)))
    # The same name again, once the first is done; and content identical to rec-03's.
    drops.append(Drop("sub/memo.wav", wav(rng), 0.0, "sub/memo.wav"))
    original = drops[3]
    drops.append(Drop("copy of rec-03.wav", original.data, span / 2, original.rel))
    return sorted(drops, key=lambda d: d.at)


@pytest.mark.slow
def test_random_kills_lose_nothing_and_pay_nearly_once(tmp_path: Path, fake_api: FakeAPI) -> None:
    """SIGKILL at random moments while files arrive: all end in done/ once, intact, transcribed."""
    seed = int(os.environ.get("SFWATCH_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    print(f"seed={seed} (rerun: SFWATCH_CRASH_SEED={seed})")
    rng = random.Random(seed)
    faults, lock = random.Random(rng.random()), threading.Lock()

    def respond(_upload: Upload) -> Reply:
        with lock:  # the fake answers on many threads
            roll, delay = faults.random(), faults.uniform(0.05, 0.2)
        if roll < 0.05:
            return R500
        if roll < 0.08:
            return RESET
        return Reply(delay=delay)

    fake_api.responder = respond
    config = write_config(tmp_path, fake_api.url, api={"concurrency": CONCURRENCY})
    inbox, state_dir = tmp_path / "inbox", tmp_path / "state"
    drops = drop_plan(rng, span=6.0)
    pending = list(drops)
    kills: list[float] = []
    started = time.monotonic()
    deadline = started + 60
    with contextlib.ExitStack() as stack:
        daemon: DaemonProcess | None = stack.enter_context(daemon_process(config))
        kill_at = time.monotonic() + rng.uniform(0.4, 1.8)
        restart_at = 0.0
        while pending or len(kills) < KILLS or daemon is None:
            now = time.monotonic()
            assert now < deadline, f"kill phase took too long; pending={[d.rel for d in pending]}"
            for drop in list(pending):
                if now - started >= drop.at and (
                    drop.after is None or (inbox / "done" / drop.after).exists()
                ):
                    path = inbox / drop.rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    drop.dropped_at = time.monotonic()
                    path.write_bytes(drop.data)
                    pending.remove(drop)
            if daemon is not None and len(kills) < KILLS and now >= kill_at:
                if not risky_to_kill(state_dir):
                    daemon.kill()  # SIGKILL
                    kills.append(now - started)
                    daemon, restart_at = None, now + rng.uniform(0.0, 0.4)
            elif daemon is None and now >= restart_at:
                daemon = stack.enter_context(daemon_process(config))
                kill_at = time.monotonic() + rng.uniform(0.4, 1.8)
            time.sleep(0.01)
        print("kills at", [round(k, 2) for k in kills])
        try:
            wait_until(lambda: all_done(inbox, len(drops)), 60, "every file done")
        except BaseException:
            print_logs(tmp_path, ("error", "warning", "job_finished"))
            raise
        daemon.wait_event("sfwatch.daemon_started")  # (its SIGTERM handler is in place)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0

    names: dict[str, list[str]] = {}
    for drop in drops:
        names.setdefault(sha(drop.data), []).append(drop.rel)
    paid = upload_table(fake_api.uploads, names)
    assert_delivered(tmp_path, inbox, [d.data for d in drops])
    # Names as they arrived: only the reused one is numbered (no " (1)" from a resume).
    arrived = sorted(d.rel for d in drops if d.after != "sub/memo.wav")
    done = inbox / "done"
    placed = sorted(p.relative_to(done).as_posix() for p in done_files(inbox))
    assert placed == sorted([*arrived, "sub/memo (1).wav"])
    assert set(paid) <= set(names), "an upload of something never dropped"
    assert all(paid[digest] >= 1 for digest in names)
    assert max(paid.values()) <= 1 + KILLS
    extra = sum(paid.values()) - len(names)
    assert extra <= KILLS * CONCURRENCY, f"{extra} uploads paid twice"
    # The copy arrived when its twin's transcript was known: no upload of it at all.
    copy = next(d for d in drops if d.rel.startswith("copy of"))
    assert copy.dropped_at is not None
    late = [u for u in fake_api.uploads_of(sha(copy.data)) if u.started >= copy.dropped_at]
    assert late == [], "content with a known transcript was uploaded again"


# -- deterministic crash points ------------------------------------------------------


def chattr(flag: str, path: Path) -> None:
    """Set or clear the immutable flag (root on ext4/xfs/btrfs); skip the test if we cannot."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    result = subprocess.run(
        ["chattr", flag, str(path)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.skip(f"chattr {flag} failed here: {result.stderr.strip()}")


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """``path`` is immutable (nothing can be created in it) for the block."""
    chattr("+i", path)
    try:
        yield
    finally:
        chattr("-i", path)


@pytest.fixture
def can_chattr(tmp_path: Path) -> None:
    """Skip unless chattr +i works on tmp_path's file system."""
    probe = tmp_path / "chattr-probe"
    probe.mkdir()
    with immutable(probe):
        with contextlib.suppress(OSError):
            (probe / "x").touch()
        if (probe / "x").exists():
            pytest.skip("chattr +i does not stop file creation here")
    probe.rmdir()


def in_work_area(inbox: Path, name: str) -> list[Path]:
    """Claimed files called ``name``."""
    return [p for p in tree(inbox / ".sfwatch") if p.name == name]


@pytest.mark.slow
@pytest.mark.usefixtures("can_chattr")
@pytest.mark.parametrize("blocked", ["transcript", "done"])
def test_killed_after_the_upload_resumes_without_paying_again(
    tmp_path: Path, fake_api: FakeAPI, blocked: str
) -> None:
    """Killed after the upload (before the transcript, or before the move): no second upload."""
    gate = threading.Event()

    def respond(_upload: Upload) -> None:
        gate.wait(30)  # the answer waits until the test has set the trap

    fake_api.responder = respond
    config = write_config(tmp_path, fake_api.url)
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir()
    (inbox / "done").mkdir()
    data = wav(random.Random())
    trap = inbox / "sub" if blocked == "transcript" else inbox / "done"
    try:
        with daemon_process(config) as first:
            (inbox / "sub" / "a.wav").write_bytes(data)
            wait_until(lambda: fake_api.in_flight == 1, 15, "the upload reached the API")
            with immutable(trap):
                gate.set()
                first.wait_event("sfwatch.finish_failed")
                first.kill()
                assert (inbox / "sub" / "a.txt").exists() == (blocked == "done")
                assert len(in_work_area(inbox, "a.wav")) == 1
    finally:
        gate.set()
    assert [u.status for u in fake_api.uploads] == [200]

    with daemon_process(config) as second:
        wait_until(lambda: all_done(inbox, 1), 15, "a.wav done")
        second.signal(signal.SIGTERM)
        assert second.wait(20) == 0
    assert [u.status for u in fake_api.uploads] == [200], "paid twice"
    assert_delivered(tmp_path, inbox, [data])
    assert (inbox / "done" / "sub" / "a.wav").exists()
    assert not (inbox / "sub" / "a (1).txt").exists()
    resumed = second.events("sfwatch.job_resumed")
    assert [e["transcript_known"] for e in resumed] == [True]
    (finished,) = second.events("sfwatch.job_finished")
    assert finished["outcome"] == "done"
    assert finished["trace_id"] == fake_api.uploads[0].trace_id


@pytest.mark.slow
def stage_of(state: Path, name: str) -> tuple[str | None, int]:
    """The ledger's (stage, crashes) of the open job for file ``name``."""
    path = state / "ledger.sqlite3"
    if not path.exists():
        return None, 0
    with contextlib.closing(sqlite3.connect(path, timeout=5)) as db:
        try:
            row = db.execute(
                "SELECT stage, crashes FROM jobs WHERE rel = ? AND status = 'claimed'", (name,)
            ).fetchone()
        except sqlite3.OperationalError:
            return None, 0  # the daemon is still creating the schema
    return (row[0], int(row[1])) if row else (None, 0)


def test_a_file_killing_the_daemon_while_prepared_fails_as_poison(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """A job found mid-prepare at POISON_AFTER restarts goes to failed/ as poison; others finish."""
    config = write_config(
        tmp_path, fake_api.url, api={"concurrency": 2}, extra={"prepare": {"transcode": "always"}}
    )
    inbox = tmp_path / "inbox"
    rng = random.Random()
    bad = wav(rng, seconds=900)  # 15 minutes to re-encode: seconds of PyAV work to kill into
    good: list[bytes] = []

    def drop_good(n: int) -> None:
        good.append(wav(rng))
        (inbox / f"good-{n}.wav").write_bytes(good[-1])

    def prepared(kills: int) -> bool:
        return stage_of(tmp_path / "state", "bad.wav") == ("prepare", kills)

    (inbox / "bad.wav").write_bytes(bad)
    drop_good(0)
    for crash in range(POISON_AFTER):
        with daemon_process(config) as daemon:
            # Only bad.wav is being prepared at the kill: good-0 is done by then.
            wait_until((inbox / "done" / "good-0.wav").exists, 20, "good-0 done")
            # (the restart counts the last kill first, then prepares again)
            wait_until(partial(prepared, crash), 20, f"prepare #{crash + 1}")
            daemon.kill()
    with daemon_process(config) as daemon:
        (poisoned,) = daemon.wait_event("sfwatch.job_poisoned")
        assert poisoned["crashes"] == POISON_AFTER
        wait_until(lambda: all_done(inbox, len(good)), 30, "good files done")
        wait_until((inbox / "failed" / "bad.wav.error.json").exists, 10, "error file")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
    assert fake_api.uploads_of(sha(bad)) == [], "no upload of the poison file"
    assert (inbox / "failed" / "bad.wav").read_bytes() == bad
    record = json.loads((inbox / "failed" / "bad.wav.error.json").read_text())
    assert record["reason"] == "poison"
    assert sorted(f.name for f in (inbox / "failed").iterdir()) == [
        "bad.wav",
        "bad.wav.error.json",
    ]


def test_kills_during_uploads_are_not_the_files_fault(tmp_path: Path, fake_api: FakeAPI) -> None:
    """Killed mid-upload POISON_AFTER times (a host fault, not the file's): no poison, done."""
    stalled: list[Upload] = []

    def respond(upload: Upload) -> Reply | None:
        if len(stalled) < POISON_AFTER:
            stalled.append(upload)
            return stall(60)
        return None

    def uploads_more_than(n: int) -> bool:
        return len(stalled) > n

    fake_api.responder = respond
    config = write_config(tmp_path, fake_api.url, api={"concurrency": 1})
    inbox = tmp_path / "inbox"
    data = wav(random.Random())
    (inbox / "a.wav").write_bytes(data)
    for crash in range(POISON_AFTER):
        with daemon_process(config) as daemon:
            wait_until(partial(uploads_more_than, crash), 20, f"upload #{crash + 1}")
            daemon.kill()
    with daemon_process(config) as daemon:
        wait_until(lambda: all_done(inbox, 1), 20, "a.wav done")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
        assert not daemon.events("sfwatch.job_poisoned")
    assert not (inbox / "failed").exists()
    assert (inbox / "done" / "a.wav").read_bytes() == data


def ready_since(state: Path, since: float, count: int) -> bool:
    """Are ``count`` open jobs at stage ``ready`` (waiting to upload), written after ``since``?"""
    path = state / "ledger.sqlite3"
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=5)) as db:
            (n,) = db.execute(
                "SELECT count(*) FROM jobs WHERE status = 'claimed' AND stage = 'ready'"
                " AND updated > ?",
                (since,),
            ).fetchone()
    except sqlite3.Error:
        return False
    return int(n) == count


def test_kills_while_files_wait_for_a_turn_are_not_their_fault(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """Killed POISON_AFTER times while files wait, prepared, for a turn: no poison, all done."""
    fake_api.responder = lambda _upload: stall(60)  # the upload hangs; the others wait their turn
    config = write_config(tmp_path, fake_api.url, api={"concurrency": 1})
    inbox, rng, ahead = tmp_path / "inbox", random.Random(), prepared_ahead(1)
    files = {f"w{i}.wav": wav(rng) for i in range(1 + ahead)}
    for name, data in files.items():
        (inbox / name).write_bytes(data)
    for crash in range(POISON_AFTER):
        waiting = partial(ready_since, tmp_path / "state", time.time(), ahead)
        with daemon_process(config) as daemon:
            wait_until(waiting, 20, f"files waiting for a turn, run {crash + 1}")
            daemon.kill()
    fake_api.responder = None
    with daemon_process(config) as daemon:
        wait_until(lambda: all_done(inbox, len(files)), 30, "all done")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
        assert not daemon.events("sfwatch.job_poisoned")
    assert not (inbox / "failed").exists()
    assert sorted(p.name for p in (inbox / "done").iterdir() if p.suffix == ".wav") == sorted(files)


# -- crash points inside finish, set up exactly ----------------------------------------

FINISH_CRASH_POINTS = [
    "planned",  # the name is in the ledger, nothing written yet
    "temp_left",  # killed while writing the transcript's temporary file
    "written",  # the transcript stands, the original is still claimed
    "written_temp_left",  # killed between link() and unlink() of the temporary file
    "linked_to_done",  # the original has its done/ name too, not yet unlinked from work
    "name_taken",  # planned, not written; another file with that name finished meanwhile
]


@pytest.mark.slow
@pytest.mark.parametrize("point", FINISH_CRASH_POINTS)
def test_restart_completes_an_interrupted_finish(
    tmp_path: Path, fake_api: FakeAPI, point: str
) -> None:
    """A kill at each step of finish: the restart completes it, no copy, no upload, no litter."""
    config_path = write_config(tmp_path, fake_api.url)
    config = load_config(config_path)
    watch, instance = config.watch[0], instance_name(config.state_dir)
    inbox, rng = watch.path, random.Random()
    data = wav(rng)
    source = inbox / "sub" / "a.wav"
    source.parent.mkdir()
    source.write_bytes(data)
    signature = signature_of(source)
    assert signature is not None
    claimed = claim(SettledFile(source, inbox, signature), watch.work_dir, instance)
    assert claimed is not None
    job = identify(claimed).evolve(attempts=1, text=FakeAPI.text_for(sha(data)))
    transcript = inbox / "sub" / "a.txt"
    # What a worker had recorded when the daemon died (the ledger's orderings 1-3).
    ledger = Ledger.in_state_dir(config.state_dir)
    try:
        ledger.claimed(job, instance)
        ledger.transcribed(job, config.api.model, "ti_before_the_crash")
        ledger.planned(job, Plan("done", original=inbox / "done/sub/a.wav", transcript=transcript))
        ledger.set_stage(job.job_id, "finish")
    finally:
        ledger.close()
    body = transcript_bytes(job.text or "")
    temp = temp_name(transcript, job.job_id)
    contents = [data]
    if point == "temp_left":
        temp.write_bytes(body[:7])
    if point in ("written", "written_temp_left", "linked_to_done"):
        transcript.write_bytes(body)
    if point == "written_temp_left":
        os.link(transcript, temp)
    if point == "linked_to_done":
        (inbox / "done" / "sub").mkdir(parents=True)
        os.link(job.path, inbox / "done" / "sub" / "a.wav")
    if point == "name_taken":
        other = wav(rng)
        contents.append(other)
        (inbox / "done" / "sub").mkdir(parents=True)
        (inbox / "done" / "sub" / "a.wav").write_bytes(other)
        transcript.write_bytes(transcript_bytes(FakeAPI.text_for(sha(other))))
    kept = transcript.stat().st_ino if transcript.exists() else None

    with running_daemon(config_path):
        wait_until(lambda: all_done(inbox, len(contents)), 15, "the job finished")
    assert fake_api.uploads == [], "the transcript was known: nothing to pay for"
    assert_delivered(tmp_path, inbox, contents)
    assert transcript.exists()
    if kept is not None:
        assert transcript.stat().st_ino == kept, "the transcript that stood was kept as it was"
    numbered = inbox / "sub" / "a (1).txt"
    assert numbered.exists() == (point == "name_taken")
    if point == "name_taken":
        assert (inbox / "done" / "sub" / "a (1).wav").read_bytes() == data
        assert numbered.read_bytes() == body
