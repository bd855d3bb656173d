"""``sfwatch retry``: the ledger decides what is retried; no orphan error files, no `` (1)``.

Failed files are made the way the daemon makes them: by a running daemon against
the fake API (400 replies), or by the daemon's own claim, ``finish_failed`` and
ledger calls where a test needs a state between them. ``retry`` always runs as
the real command, in a subprocess.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sfwatch.claim import claim
from sfwatch.config import Config, WatchConfig, load_config
from sfwatch.finish import finish_failed
from sfwatch.job import Job
from sfwatch.ledger import Ledger
from sfwatch.settle import SettledFile, signature_of
from tests.audiogen import wav_bytes
from tests.conftest import files_under, run_cli, running_daemon, wait_until, write_config
from tests.fakeapi import R400_DATA_STRING, FakeAPI

ERROR = {"reason": "api_rejected", "message": "the API rejected the file", "http_status": 400}


class Setup:
    """A config file, its watched folder and its ledger (open for the test's duration)."""

    def __init__(self, folder: Path, api_url: str) -> None:
        self.path = write_config(folder, api_url)
        self.config: Config = load_config(self.path)
        self.watch: WatchConfig = self.config.watch[0]
        self.inbox = self.watch.path
        self.failed = self.watch.failed_dir
        self.ledger = Ledger.in_state_dir(self.config.state_dir)

    def fail_by_hand(
        self, rel: str, data: bytes, *, record: bool = True, ledger: Ledger | None = None
    ) -> Job:
        """Claim and fail ``rel`` as the daemon does (``record=False``: not yet in the ledger)."""
        ledger = ledger or self.ledger
        path = self.inbox / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        signature = signature_of(path)
        assert signature is not None
        job = claim(SettledFile(path, self.inbox, signature), self.watch.work_dir, "test")
        assert job is not None
        ledger.claimed(job, "test")
        placed = finish_failed(job, ERROR, self.watch)
        if record:
            self.record_failed(job, ledger)
        assert placed.original == self.failed / rel
        return job

    def record_failed(self, job: Job, ledger: Ledger | None = None) -> None:
        """What the daemon does last after failing a job: the ledger says ``failed``."""
        final = self.failed / job.rel
        (ledger or self.ledger).finished(job, "failed", final_path=final, error=ERROR)

    def retry(self, *args: str) -> tuple[int, list[str], str]:
        """Run ``sfwatch retry ARGS``: exit status, stdout lines, stderr."""
        result = run_cli("retry", "-c", str(self.path), *args)
        return result.returncode, result.stdout.splitlines(), result.stderr

    def status_of(self, job_id: str) -> str:
        """The ledger status of a job."""
        row = self.ledger.job(job_id)
        assert row is not None
        return row.status


@pytest.fixture
def setup(tmp_path: Path, fake_api: FakeAPI) -> Iterator[Setup]:
    """A config watching tmp_path/inbox, against the fake API."""
    made = Setup(tmp_path, fake_api.url)
    try:
        yield made
    finally:
        made.ledger.close()


def _user_files(folder: Path) -> list[str]:
    """``files_under`` without the daemon's own work area (``.sfwatch/``)."""
    return [f for f in files_under(folder) if not f.startswith(".sfwatch/")]


def _counts_become(ledger: Ledger, **expected: int) -> Callable[[], bool]:
    """A condition for ``wait_until``: the ledger's counts are exactly ``expected``."""
    return lambda: ledger.counts() == expected


def _failing_api(fake_api: FakeAPI) -> None:
    """Every upload is rejected with a 400 (the file fails at once)."""
    fake_api.responder = lambda _upload: R400_DATA_STRING


def test_file_not_yet_failed_in_the_ledger_is_refused(setup: Setup) -> None:
    """A file in failed/ whose row is still claimed stays put, with its error file."""
    job = setup.fail_by_hand("x.mp3", b"x", record=False)
    code, out, err = setup.retry(str(setup.failed / "x.mp3"))
    assert code == 0
    assert out == ["nothing retried"]
    assert "skipped" in err
    assert "x.mp3" in err
    assert "still being finished" in err
    code, out, err = setup.retry("--all")
    assert (code, out) == (0, ["nothing retried"])
    assert "x.mp3" in err
    assert files_under(setup.failed) == ["x.mp3", "x.mp3.error.json"]
    assert setup.status_of(job.job_id) == "claimed"
    setup.record_failed(job)
    code, out, err = setup.retry(str(setup.failed / "x.mp3"))
    assert code == 0, err
    assert out == [f"{setup.failed / 'x.mp3'} -> {setup.inbox / 'x.mp3'}"]
    assert files_under(setup.failed) == []
    assert setup.status_of(job.job_id) == "retried"


def test_another_daemons_failed_file_is_left_alone(setup: Setup, tmp_path: Path) -> None:
    """--all retries only this ledger's failed jobs; another ledger's file is named, kept."""
    mine = setup.fail_by_hand("mine.mp3", b"mine")
    other = Ledger(tmp_path / "other-state" / "ledger.sqlite3")
    try:
        setup.fail_by_hand("theirs.mp3", b"theirs", ledger=other)
    finally:
        other.close()
    code, out, err = setup.retry("--all")
    assert code == 0, err
    assert out == [f"{setup.failed / 'mine.mp3'} -> {setup.inbox / 'mine.mp3'}"]
    assert "skipped" in err
    assert "theirs.mp3" in err
    assert "shows no failed job" in err
    assert files_under(setup.failed) == ["theirs.mp3", "theirs.mp3.error.json"]
    assert setup.status_of(mine.job_id) == "retried"


def test_deleted_failed_file_is_skipped_and_the_others_retried(
    setup: Setup, fake_api: FakeAPI
) -> None:
    """One failed file deleted by hand: a warning names it; --all and FILEs retry the rest."""
    _failing_api(fake_api)
    with running_daemon(setup.path):
        for name in ("a.mp3", "b.mp3", "c.mp3", "d.mp3"):
            (setup.inbox / name).write_bytes(wav_bytes(700 + len(name) + ord(name[0])))
        wait_until(lambda: setup.ledger.counts().get("failed") == 4, 20, "four failed")
    (setup.failed / "b.mp3").unlink()
    code, out, err = setup.retry(str(setup.failed / "a.mp3"), str(setup.failed / "b.mp3"))
    assert code == 0, err
    assert out == [f"{setup.failed / 'a.mp3'} -> {setup.inbox / 'a.mp3'}"]
    assert "b.mp3" in err
    assert "gone from failed/" in err
    code, out, err = setup.retry("--all")
    assert code == 0, err
    assert sorted(out) == [
        f"{setup.failed / name} -> {setup.inbox / name}" for name in ("c.mp3", "d.mp3")
    ]
    assert "b.mp3" in err
    assert "a.mp3" not in err
    assert _user_files(setup.inbox) == ["a.mp3", "c.mp3", "d.mp3", "failed/b.mp3.error.json"]
    assert setup.ledger.counts() == {"retried": 3, "failed": 1}


def test_kill_after_error_file_removed_is_completed_by_a_second_retry(setup: Setup) -> None:
    """Error file gone, original still in failed/, job still failed: retry finishes it."""
    job = setup.fail_by_hand("sub/x.mp3", b"x")
    (setup.failed / "sub" / "x.mp3.error.json").unlink()  # where the kill struck
    code, out, err = setup.retry("--all")
    assert code == 0, err
    assert out == [f"{setup.failed / 'sub/x.mp3'} -> {setup.inbox / 'sub/x.mp3'}"]
    assert err == ""
    assert _user_files(setup.inbox) == ["sub/x.mp3"]
    assert setup.status_of(job.job_id) == "retried"


def test_kill_mid_move_is_completed_without_a_second_copy(setup: Setup) -> None:
    """The move linked the inbox name but was killed before unlinking failed/: retry ends it."""
    job = setup.fail_by_hand("x.mp3", b"x")
    (setup.failed / "x.mp3.error.json").unlink()
    os.link(setup.failed / "x.mp3", setup.inbox / "x.mp3")  # where the kill struck
    code, out, err = setup.retry(str(setup.failed / "x.mp3"))
    assert code == 0, err
    assert out == [f"{setup.failed / 'x.mp3'} -> {setup.inbox / 'x.mp3'}"]
    assert _user_files(setup.inbox) == ["x.mp3"]
    assert setup.status_of(job.job_id) == "retried"


def test_error_file_of_another_job_is_kept(setup: Setup) -> None:
    """Only this job's error file is removed: a foreign or unreadable one stays."""
    setup.fail_by_hand("x.mp3", b"x")
    error_file = setup.failed / "x.mp3.error.json"
    error_file.write_text(json.dumps({"job_id": "someoneelse"}), encoding="utf-8")
    code, _out, err = setup.retry("--all")
    assert code == 0, err
    assert files_under(setup.failed) == ["x.mp3.error.json"]
    assert (setup.inbox / "x.mp3").read_bytes() == b"x"


def test_retry_and_refailure_give_no_numbered_name(setup: Setup, fake_api: FakeAPI) -> None:
    """A retried file that fails again is failed/bad.mp3 again, not bad (1).mp3."""
    _failing_api(fake_api)
    with running_daemon(setup.path):
        (setup.inbox / "bad.mp3").write_bytes(wav_bytes(800))
        wait_until(lambda: setup.ledger.counts().get("failed") == 1, 15, "failed once")
        first = setup.ledger.failed_jobs()[0]
        for round_ in (1, 2):
            code, out, err = setup.retry(str(setup.failed / "bad.mp3"))
            assert code == 0, err
            assert out == [f"{setup.failed / 'bad.mp3'} -> {setup.inbox / 'bad.mp3'}"]
            wait_until(_counts_become(setup.ledger, retried=round_, failed=1), 15, "failed again")
            assert files_under(setup.failed) == ["bad.mp3", "bad.mp3.error.json"]
        record = json.loads((setup.failed / "bad.mp3.error.json").read_text(encoding="utf-8"))
        assert record["job_id"] == setup.ledger.failed_jobs()[0].job_id != first.job_id


def test_retried_file_is_a_new_job_for_the_running_daemon(setup: Setup, fake_api: FakeAPI) -> None:
    """The daemon picks the retried file up as a new job with no attempts spent, and is done."""
    _failing_api(fake_api)
    with running_daemon(setup.path):
        (setup.inbox / "x.mp3").write_bytes(wav_bytes(900))
        wait_until(lambda: setup.ledger.counts().get("failed") == 1, 15, "failed")
        old = setup.ledger.failed_jobs()[0]
        fake_api.responder = None  # the service takes it now
        code, out, err = setup.retry("--all")
        assert code == 0, err
        assert out == [f"{setup.failed / 'x.mp3'} -> {setup.inbox / 'x.mp3'}"]
        wait_until((setup.inbox / "done" / "x.mp3").exists, 15, "retried file done")
        wait_until(lambda: setup.ledger.counts() == {"retried": 1, "done": 1}, 10, "recorded")
    assert setup.status_of(old.job_id) == "retried"
    assert len(fake_api.uploads) == 2
    assert _user_files(setup.inbox) == ["done/x.mp3", "x.txt"]


def test_named_files_collisions_and_exit_status(setup: Setup, tmp_path: Path) -> None:
    """A taken inbox name gets `` (1)``; a FILE that is no failed file exits 1, the rest go."""
    setup.fail_by_hand("sub/a.mp3", b"a")
    (setup.inbox / "sub" / "a.mp3").write_bytes(b"a newer a")
    code, out, err = setup.retry(
        str(tmp_path / "elsewhere.mp3"),
        str(setup.failed / "sub" / "a.mp3.error.json"),
        str(setup.failed / "typo.mp3"),
    )
    assert code == 1
    assert out == [f"{setup.failed / 'sub/a.mp3'} -> {setup.inbox / 'sub/a (1).mp3'}"]
    assert "elsewhere.mp3: not in any watched folder's failed_dir" in err
    assert "typo.mp3: no such file" in err
    assert (setup.inbox / "sub" / "a (1).mp3").read_bytes() == b"a"
    assert (setup.inbox / "sub" / "a.mp3").read_bytes() == b"a newer a"
    assert files_under(setup.failed) == []


def test_control_characters_in_names_are_escaped(setup: Setup) -> None:
    """A name with a newline and an escape prints as one line, the characters escaped."""
    setup.fail_by_hand("a\nb\x1b[31m.mp3", b"a")
    code, out, err = setup.retry("--all")
    assert code == 0, err
    assert out == [
        f"{setup.failed}/a\\nb\\x1b[31m.mp3 -> {setup.inbox}/a\\nb\\x1b[31m.mp3",
    ]
    assert (setup.inbox / "a\nb\x1b[31m.mp3").read_bytes() == b"a"
