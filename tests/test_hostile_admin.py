"""``status`` and ``retry`` on hostile ground: a shared folder and an API we do not control.

Issue 10, items 4 and 10: names and server messages are printed escaped, never
raw; ``retry`` run as root for a daemon that is not root is refused; ``retry``
walks from the watched folder down without following links, and moves only what
the ledger recorded as failed. The commands run as real subprocesses; users the
tests need are created here (as root) and removed afterwards.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from sfwatch.admin import format_status
from sfwatch.config import load_config
from tests.audiogen import wav_bytes
from tests.conftest import daemon_env, files_under, run_cli, running_daemon, wait_until
from tests.fakeapi import FakeAPI, Reply
from tests.test_admin import Setup

# useradd fails while another process holds its lock: the tests that add users share one
pytestmark = pytest.mark.xdist_group("system-users")

#: a name built to forge a line and drive a terminal: colour, window title, bell, newline
EVIL_NAME = "rec\x1b[31m\x1b]0;owned\x07\nsfwatch: all good\r.mp3"
EVIL_SHOWN = "rec\\x1b[31m\\x1b]0;owned\\x07\\nsfwatch: all good\\r.mp3"
#: what a hostile (or broken) server may say about a file
EVIL_MESSAGE = "\x1b[2J\x1b[1;32mOK\x1b[0m\x07\r\nretry: done \u202eevil"
#: what the ledger keeps of it: transcribe.py makes control characters U+FFFD at
#: the boundary (line breaks stay), and status escapes what is left
EVIL_MESSAGE_KEPT = "\ufffd[2J\ufffd[1;32mOK\ufffd[0m\ufffd\ufffd\nretry: done \u202eevil"
EVIL_MESSAGE_SHOWN = "\ufffd[2J\ufffd[1;32mOK\ufffd[0m\ufffd\ufffd\\nretry: done \\u202eevil"
#: a file dropped by an attacker: not audio, and no job of the daemon's
PAYLOAD = b"#!/bin/sh\necho owned > /etc/motd\n"


def _clean(text: str) -> bool:
    """Does ``text`` hold no control character except the newlines between lines?"""
    return (
        not any(unicodedata.category(c) in {"Cc", "Cf"} for c in text.replace("\n", ""))
        and "\r" not in text
    )


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    """A config watching tmp_path/inbox (retry and status never call the API)."""
    made = Setup(tmp_path, "http://127.0.0.1:9/v1")
    try:
        yield made
    finally:
        made.ledger.close()


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (to create users and run commands as them)")
    for tool in ("useradd", "userdel", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


@pytest.fixture
def new_user() -> Iterator[Callable[[str], pwd.struct_passwd]]:
    """``new_user(role)``: a fresh system user (no home), removed after the test."""
    _needs_root()
    made: list[str] = []

    def make(role: str) -> pwd.struct_passwd:
        name = f"sfw-{role}-{secrets.token_hex(3)}"
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
        made.append(name)
        return pwd.getpwnam(name)

    try:
        yield make
    finally:
        for name in made:
            subprocess.run(["userdel", name], check=False, capture_output=True)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder other users may enter (pytest's own temp folders are root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="sfwatch-hostile-"))
    folder.chmod(0o755)
    try:
        yield folder.resolve()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _as_user(user: pwd.struct_passwd, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``sfwatch ARGS`` as ``user`` (its own group only)."""
    return subprocess.run(
        [
            *("setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"),
            *(sys.executable, "-m", "sfwatch", *args),
        ],
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=60,
        check=False,
    )


def _chown_tree(top: Path, user: pwd.struct_passwd) -> None:
    """``chown -hR user: top``."""
    os.lchown(top, user.pw_uid, user.pw_gid)
    for path in top.rglob("*"):
        os.lchown(path, user.pw_uid, user.pw_gid)


# --- status: every field escaped -------------------------------------------------------


def test_status_escapes_names_and_server_messages(tmp_path: Path, fake_api: FakeAPI) -> None:
    """A real failure (ESC/BEL/newline name, ANSI server message) prints escaped, one line."""
    fake_api.responder = lambda _upload: Reply(400, {"code": 20015, "message": EVIL_MESSAGE})
    setup = Setup(tmp_path, fake_api.url)
    try:
        with running_daemon(setup.path):
            (setup.inbox / EVIL_NAME).write_bytes(wav_bytes(900))
            wait_until(lambda: setup.ledger.counts().get("failed") == 1, 20, "failed")
    finally:
        setup.ledger.close()
    result = run_cli("status", "-c", str(setup.path))
    assert result.returncode == 0, result.stderr
    assert _clean(result.stdout), repr(result.stdout)
    (line,) = [line for line in result.stdout.splitlines() if "api_rejected" in line]
    assert f"{setup.inbox}/{EVIL_SHOWN}  api_rejected HTTP 400: {EVIL_MESSAGE_SHOWN}" in line
    assert not any(line.startswith("sfwatch: all good") for line in result.stdout.splitlines())
    as_json = run_cli("status", "--json", "-c", str(setup.path))
    (failure,) = json.loads(as_json.stdout)["recent_failures"]
    assert failure["file"] == str(setup.inbox / EVIL_NAME), "JSON keeps the exact name"
    assert failure["message"] == EVIL_MESSAGE_KEPT


def test_every_status_field_is_escaped() -> None:
    """Daemon state, reasons and trace ids are escaped too, not only names and messages."""
    bad = "x\x1b[8m\ny"
    report = {
        "ledger": f"/state/{bad}",
        "daemons": [
            {
                "instance": bad,
                "pid": 1,
                "running": True,
                "age_seconds": 1,
                "paused": bad,
                "paused_for": 3,
                "limit": bad,
            }
        ],
        "counts": {bad: 1},
        "recent_failures": [
            {
                "time": bad,
                "file": bad,
                "reason": bad,
                "http_status": bad,
                "message": bad,
                "trace_id": bad,
            }
        ],
    }
    text = format_status(report)
    assert _clean(text)
    assert "x\\x1b[8m\\ny" in text
    assert len(text.splitlines()) == 7


# --- retry as root -----------------------------------------------------------------------


def test_retry_as_root_for_a_daemon_that_is_not_root_is_refused(
    shared_tmp: Path, new_user: Callable[[str], pwd.struct_passwd]
) -> None:
    """Daemon-owned state dir: root's retry exits 2 naming the user; as that user it works."""
    daemon_user = new_user("daemon")
    setup = Setup(shared_tmp, "http://127.0.0.1:9/v1")
    try:
        setup.fail_by_hand("x.mp3", b"x")
    finally:
        setup.ledger.close()
    _chown_tree(shared_tmp, daemon_user)
    code, out, err = setup.retry("--all")
    assert code == 2
    assert out == []
    assert "refusing to run as root" in err
    assert repr(daemon_user.pw_name) in err
    assert f"runuser -u {daemon_user.pw_name}" in err
    assert files_under(setup.failed) == ["x.mp3", "x.mp3.error.json"], "nothing moved"
    result = _as_user(daemon_user, "retry", "-c", str(setup.path), "--all")
    if result.returncode != 0 and "ModuleNotFoundError" in result.stderr:
        pytest.skip(f"the new user cannot run sfwatch here: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{setup.failed / 'x.mp3'} -> {setup.inbox / 'x.mp3'}"]
    assert (setup.inbox / "x.mp3").read_bytes() == b"x"


def test_retry_without_a_ledger_creates_none(setup: Setup, tmp_path: Path) -> None:
    """A config whose state_dir never held a ledger: exit 2, and no ledger is made."""
    other = tmp_path / "other"
    other.mkdir()
    text = setup.path.read_text(encoding="utf-8").replace(str(tmp_path / "state"), str(other))
    config = tmp_path / "other.yaml"
    config.write_text(text, encoding="utf-8")
    assert load_config(config).state_dir == other
    result = run_cli("retry", "-c", str(config), "--all")
    assert result.returncode == 2
    assert "no ledger at" in result.stderr
    assert list(other.iterdir()) == []


# --- retry never follows a link ----------------------------------------------------------


def _failed_dir_outside(setup: Setup, folder: Path) -> None:
    """Point the setup's watch at a failed_dir outside the inbox (config and attributes)."""
    data = yaml.safe_load(setup.path.read_text(encoding="utf-8"))
    data["watch"][0]["failed_dir"] = str(folder)
    setup.path.write_text(yaml.safe_dump(data), encoding="utf-8")
    setup.config = load_config(setup.path)
    setup.watch = setup.config.watch[0]
    setup.failed = setup.watch.failed_dir
    assert setup.failed == folder


@pytest.mark.parametrize(
    "linked", ["inbox/sub", "failed/sub", "failed/sub/evil.sh", "failed", "outside/sub"]
)
def test_retry_through_a_planted_symlink_moves_nothing(
    setup: Setup, tmp_path: Path, new_user: Callable[[str], pwd.struct_passwd], linked: str
) -> None:
    """An attacker swaps a folder (or the file) on retry's way for a link: skipped, warned.

    ``inbox/sub`` points into a root-only vault (retry would write into it);
    ``failed/sub``, ``failed`` and the file itself point at the vault's own
    ``evil.sh`` (retry would carry root's file into the share), also with a
    failed_dir outside the inbox. The attacker's uid owns the links and the
    failed file.
    """
    attacker = new_user("attacker")
    if linked == "outside/sub":
        _failed_dir_outside(setup, tmp_path / "failed-elsewhere")
    job = setup.fail_by_hand("sub/evil.sh", PAYLOAD)
    failed_file = setup.failed / "sub" / "evil.sh"
    os.chown(failed_file, attacker.pw_uid, attacker.pw_gid)
    vault = tmp_path / "vault"
    vault.mkdir(mode=0o700)
    secret = b"root's own evil.sh\n"
    (vault / "evil.sh").write_bytes(secret)
    (vault / "sub").mkdir()
    (vault / "sub" / "evil.sh").write_bytes(secret)
    if linked == "inbox/sub":
        shutil.rmtree(setup.inbox / "sub", ignore_errors=True)
        link, target = setup.inbox / "sub", vault
    elif linked in ("failed/sub", "outside/sub"):
        (setup.failed / "sub").rename(setup.failed / "sub.moved")
        link, target = setup.failed / "sub", vault
    elif linked == "failed":
        setup.failed.rename(setup.inbox / "failed.moved")
        link, target = setup.failed, vault
    else:
        failed_file.rename(setup.failed / "sub" / "moved.sh")
        link, target = failed_file, vault / "evil.sh"
    link.symlink_to(target)
    os.lchown(link, attacker.pw_uid, attacker.pw_gid)
    vault_before = {p: p.read_bytes() for p in vault.rglob("*") if p.is_file()}
    inbox_before = files_under(setup.inbox)
    failed_before = files_under(setup.failed)
    for args in (["--all"], [str(failed_file)]):
        code, out, err = setup.retry(*args)
        assert code == 0, err
        assert out == ["nothing retried"]
        assert "symlink" in err, err
        assert "skipped" in err
        assert _clean(err)
    assert {p: p.read_bytes() for p in vault.rglob("*") if p.is_file()} == vault_before
    assert files_under(setup.inbox) == inbox_before, "nothing moved anywhere in the share"
    assert files_under(setup.failed) == failed_before
    assert setup.status_of(job.job_id) == "failed", "still failed: a later retry may take it"


def test_planted_files_in_failed_are_left_alone(
    setup: Setup, tmp_path: Path, new_user: Callable[[str], pwd.struct_passwd]
) -> None:
    """A non-audio file, a fake error file and a link planted in failed/: never moved."""
    attacker = new_user("attacker")
    job = setup.fail_by_hand("real.mp3", b"real")
    (setup.failed / "sub").mkdir()
    planted = {
        setup.failed / "evil.sh": PAYLOAD,
        setup.failed / "sub" / "evil.sh": PAYLOAD,
        setup.failed / "sub" / "evil.sh.error.json": json.dumps({"job_id": job.job_id}).encode(),
    }
    for path, data in planted.items():
        path.write_bytes(data)
        os.chown(path, attacker.pw_uid, attacker.pw_gid)
    outside = tmp_path / "outside.mp3"
    outside.write_bytes(b"not in the share")
    (setup.failed / "link.mp3").symlink_to(outside)
    os.lchown(setup.failed / "link.mp3", attacker.pw_uid, attacker.pw_gid)
    code, out, err = setup.retry(str(setup.failed / "evil.sh"), str(setup.failed / "link.mp3"))
    assert (code, out) == (0, ["nothing retried"])
    assert "evil.sh: this ledger" in err
    assert "link.mp3: a symlink: never followed or moved" in err
    code, out, err = setup.retry("--all")
    assert code == 0, err
    assert out == [f"{setup.failed / 'real.mp3'} -> {setup.inbox / 'real.mp3'}"]
    assert f"skipped {setup.failed / 'sub' / 'evil.sh'}: the ledger has job {job.job_id}" in err
    assert f"skipped {setup.failed / 'evil.sh'}" in err
    for path, data in planted.items():
        assert path.read_bytes() == data, f"{path} untouched"
    assert (setup.failed / "link.mp3").is_symlink()
    assert outside.read_bytes() == b"not in the share"
    assert files_under(setup.inbox) == [
        "failed/evil.sh",
        "failed/link.mp3",
        "failed/sub/evil.sh",
        "failed/sub/evil.sh.error.json",
        "real.mp3",
    ]
    assert setup.ledger.counts() == {"retried": 1}
