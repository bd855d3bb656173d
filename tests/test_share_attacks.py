"""A shared folder is hostile ground: promise P7 (docs/design.md §11), attack by attack.

Each test builds a share as the README recommends (a group for the share, a
setgid inbox writable by the group), runs the real daemon as its own user (a
systemd-style credential for the key), and plays a second member of the group
(another uid, made by the test) who plants symlinks, folders and races. Each
asserts that nothing outside the share was read, moved or written, that the
attack was refused with a log line, that nothing secret became readable by the
attacker, and that the daemon kept working for honest files.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from sfwatch.daemon import instance_name
from tests.conftest import API_KEY, DaemonProcess, daemon_process, wait_until
from tests.fakeapi import FakeAPI
from tests.test_crash import sha, wav

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("system-users"),  # useradd fails while another holds its lock
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make the share's users"),
    pytest.mark.skipif(shutil.which("useradd") is None, reason="needs useradd"),
]


@dataclass
class Share:
    """A share, its users, and the daemon's private places outside it."""

    base: Path
    inbox: Path
    private: Path  # the daemon's own folder outside the share (a private recording)
    creds: Path  # the systemd credential folder (api_key)
    state: Path
    config: Path
    daemon_user: str
    attacker: str
    secret: bytes

    def as_attacker(self, *command: str) -> subprocess.CompletedProcess[str]:
        """Run ``command`` as the attacker (a member of the share's group)."""
        entry = pwd.getpwnam(self.attacker)
        return subprocess.run(
            [
                *("setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}"),
                "--clear-groups",
                *command,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def attacker_python(self, code: str) -> subprocess.CompletedProcess[str]:
        """Run Python ``code`` as the attacker (cwd: the inbox)."""
        prelude = f"import os\nos.umask(0o007)\nos.chdir({str(self.inbox)!r})\n"
        return self.as_attacker(sys.executable, "-c", prelude + code)

    def run(self) -> contextlib.AbstractContextManager[DaemonProcess]:
        """The daemon, as its own user, the key from its credential folder."""
        return daemon_process(
            self.config,
            user=self.daemon_user,
            SILICONFLOW_API_KEY="",
            CREDENTIALS_DIRECTORY=str(self.creds),
        )

    def work_instance(self) -> str:
        """The daemon's instance name (its work folder in the share)."""
        return instance_name(self.state)


def _sh(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True)


@pytest.fixture
def share(fake_api: FakeAPI) -> Iterator[Share]:
    """A group share with a daemon user and an attacker in the group; removed afterwards."""
    tag = f"{os.getpid() % 10000}{random.randrange(1000)}"
    group, daemon_user, attacker = f"sfwg{tag}", f"sfwd{tag}", f"sfwa{tag}"
    _sh("groupadd", group)
    _sh("useradd", "--system", "--no-create-home", "-g", group, daemon_user)
    _sh("useradd", "--system", "--no-create-home", "-g", group, attacker)
    base = Path(tempfile.mkdtemp(prefix="sfwatch-share-"))
    try:
        base.chmod(0o755)
        duid, gid = pwd.getpwnam(daemon_user).pw_uid, grp.getgrnam(group).gr_gid
        inbox, private, creds, state = (base / n for n in ("inbox", "private", "creds", "state"))
        inbox.mkdir()
        os.chown(inbox, duid, gid)
        inbox.chmod(0o2770 | stat.S_ISGID)
        secret = wav(random.Random(), seconds=0.4)
        for folder in (private, state):
            folder.mkdir(mode=0o700)
            os.chown(folder, duid, gid)
        (private / "secret.wav").write_bytes(secret)
        os.chown(private / "secret.wav", duid, gid)
        (private / "secret.wav").chmod(0o600)
        creds.mkdir()
        (creds / "api_key").write_text(API_KEY + "\n")
        os.chown(creds / "api_key", duid, gid)
        (creds / "api_key").chmod(0o400)
        os.chown(creds, duid, gid)
        creds.chmod(0o500)
        config = base / "sfwatch.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "api": {"base_url": fake_api.url, "concurrency": 2, "timeout_seconds": 10},
                    "state_dir": str(state),
                    "log": {"format": "json", "level": "debug"},
                    "watch": [{"path": str(inbox), "settle_seconds": 0.3, "rescan_seconds": 2}],
                }
            )
        )
        config.chmod(0o644)
        yield Share(base, inbox, private, creds, state, config, daemon_user, attacker, secret)
    finally:
        if not os.environ.get("KEEPSHARE"):
            shutil.rmtree(base, ignore_errors=True)
        for user in (daemon_user, attacker):
            subprocess.run(["userdel", user], capture_output=True, check=False)
        subprocess.run(["groupdel", group], capture_output=True, check=False)


def drop_honest(share: Share, name: str) -> bytes:
    """An honest member drops a recording (as the attacker's uid: any member may)."""
    data = wav(random.Random(), seconds=0.3)
    staging = share.base / f"staging-{name.replace('/', '-')}"
    staging.write_bytes(data)
    staging.chmod(0o644)
    result = share.as_attacker("cp", str(staging), str(share.inbox / name))
    assert result.returncode == 0, result.stderr
    return data


def finished(share: Share, name: str) -> bool:
    """``name`` reached done/ with its transcript."""
    stem = Path(name).stem
    return (share.inbox / "done" / name).exists() and (share.inbox / f"{stem}.txt").exists()


def assert_secrets_safe(share: Share, fake_api: FakeAPI) -> None:
    """The private recording and the key stayed where they were, unread and unsent."""
    assert (share.private / "secret.wav").read_bytes() == share.secret
    assert fake_api.uploads_of(sha(share.secret)) == [], "the private recording was uploaded"
    for path in share.base.rglob("*"):
        if path.parent in (share.creds, share.private):
            continue  # where the secrets are meant to be
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            assert API_KEY.encode() not in data, f"the key is in {path}"
            assert data != share.secret, f"the private recording was copied to {path}"


def stop(daemon: DaemonProcess) -> None:
    """Warm-stop the daemon and check it exited cleanly."""
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0


def test_work_area_is_private_and_planting_fails(share: Share, fake_api: FakeAPI) -> None:
    """.sfwatch/ is 0700 and the daemon's: the attacker cannot plant links or a ghost sibling."""
    with share.run() as daemon:
        daemon.wait_event("sfwatch.daemon_started")
        data = drop_honest(share, "a.wav")
        wait_until(lambda: finished(share, "a.wav"), 20, "a.wav done")
        work = share.inbox / ".sfwatch"
        st = work.stat()
        assert st.st_mode & 0o777 == 0o700
        assert st.st_uid == pwd.getpwnam(share.daemon_user).pw_uid
        planted = share.attacker_python(
            textwrap.dedent(
                f"""
                os.makedirs(".sfwatch/work/ghost/j1", exist_ok=True)
                os.symlink({str(share.private / "secret.wav")!r}, ".sfwatch/work/ghost/j1/x.wav")
                """
            )
        )
        assert planted.returncode != 0
        assert "Permission denied" in planted.stderr
        stop(daemon)
    assert (share.inbox / "done" / "a.wav").read_bytes() == data
    assert_secrets_safe(share, fake_api)


def test_planted_links_in_an_old_group_writable_work_area(share: Share, fake_api: FakeAPI) -> None:
    """An old 2770 .sfwatch with planted links and a ghost sibling: narrowed, nothing taken."""
    duid = pwd.getpwnam(share.daemon_user).pw_uid
    instance = share.work_instance()
    work = share.inbox / ".sfwatch"
    for folder in (work, work / "work", work / "work" / instance):
        folder.mkdir()
        os.chown(folder, duid, share.inbox.stat().st_gid)
        folder.chmod(0o2770)
    planted = share.attacker_python(
        textwrap.dedent(
            f"""
            for where, target in [
                (".sfwatch/work/{instance}/a1b2c3d4e5f6", {str(share.private / "secret.wav")!r}),
                (".sfwatch/work/ghost/0a0b0c0d0e0f", {str(share.creds / "api_key")!r}),
            ]:
                os.makedirs(where)
                os.symlink(target, where + "/x.wav")
            os.utime(".sfwatch/work/ghost", (0, 0))
            """
        )
    )
    assert planted.returncode == 0, planted.stderr
    with share.run() as daemon:
        daemon.wait_event("sfwatch.work_area_narrowed")
        drop_honest(share, "honest.wav")
        wait_until(lambda: finished(share, "honest.wav"), 20, "honest.wav done")
        stop(daemon)
    assert work.stat().st_mode & 0o777 == 0o700
    assert not (share.inbox / "done" / "x.wav").exists()
    assert not (share.inbox / "failed").exists(), "no planted link was taken (or failed)"
    assert_secrets_safe(share, fake_api)


def test_a_work_area_made_by_the_attacker_is_refused(share: Share, fake_api: FakeAPI) -> None:
    """.sfwatch made first by another uid, links inside: refused with one error, nothing read."""
    instance = share.work_instance()
    planted = share.attacker_python(
        textwrap.dedent(
            f"""
            where = ".sfwatch/work/{instance}/a1b2c3d4e5f6"
            os.makedirs(where)
            os.symlink({str(share.private / "secret.wav")!r}, where + "/x.wav")
            """
        )
    )
    assert planted.returncode == 0, planted.stderr
    with share.run() as daemon:
        daemon.wait_event("sfwatch.work_area_refused")
        waiting = drop_honest(share, "waiting.wav")
        wait_until(lambda: len(daemon.events("sfwatch.claim_failed")) >= 1, 15, "claims refused")
        assert len(daemon.events("sfwatch.work_area_refused")) == 1, "one error per folder"
        assert daemon.proc.poll() is None, "the daemon keeps running"
        stop(daemon)
    assert (share.inbox / "waiting.wav").read_bytes() == waiting, "left in the inbox, safe"
    assert_secrets_safe(share, fake_api)


@pytest.mark.parametrize("squatted", ["done", "done/sub"])
def test_done_folder_replaced_by_a_symlink(share: Share, fake_api: FakeAPI, squatted: str) -> None:
    """done/ (or done/sub) a symlink to the state dir: nothing written there; others go on."""
    result = share.attacker_python(
        textwrap.dedent(
            f"""
            os.makedirs(os.path.dirname({squatted!r}) or ".", exist_ok=True)
            os.symlink({str(share.state)!r}, {squatted!r})
            os.makedirs("sub", exist_ok=True)
            """
        )
    )
    assert result.returncode == 0, result.stderr
    before = sorted(p.name for p in share.state.iterdir())
    with share.run() as daemon:
        daemon.wait_event("sfwatch.daemon_started")
        data = drop_honest(share, "sub/a.wav")
        failed = daemon.wait_event("sfwatch.finish_failed")
        # (O_NOFOLLOW|O_DIRECTORY on a symlink: ELOOP or ENOTDIR, by kernel)
        assert "is a symlink (links in a watched tree are never followed)" in str(
            failed[0]["error"]
        )
        if squatted == "done/sub":
            drop_honest(share, "top.wav")
            wait_until(lambda: finished(share, "top.wav"), 20, "an honest file elsewhere")
        stop(daemon)
    after = {p.name for p in share.state.iterdir()}
    ours = {"ledger.sqlite3", "ledger.sqlite3-wal", "ledger.sqlite3-shm", "daemon.lock"}
    assert after - set(before) <= ours
    assert not list(share.state.glob("*.wav"))
    assert not list(share.state.glob("*.txt"))
    claimed = list((share.inbox / ".sfwatch").rglob("a.wav"))
    assert claimed, "the original waits in the work area"
    assert claimed[0].read_bytes() == data
    assert_secrets_safe(share, fake_api)


RENAME_EXCHANGE = 2


def test_claim_race_with_a_swapped_symlink(share: Share, fake_api: FakeAPI) -> None:
    """sub/ swapped with a link to a private folder around the claim: the private file stays."""
    secret_dir = share.private
    (secret_dir / "a.wav").write_bytes(share.secret)
    duid = pwd.getpwnam(share.daemon_user).pw_uid
    os.chown(secret_dir / "a.wav", duid, -1)
    (secret_dir / "a.wav").chmod(0o600)
    swapper = textwrap.dedent(
        f"""
        import ctypes, time
        libc = ctypes.CDLL(None, use_errno=True)
        os.makedirs("sub")
        with open("sub/a.wav", "wb") as f:
            f.write(os.urandom(64))
        os.symlink({str(secret_dir)!r}, "sublink")
        deadline = time.monotonic() + 8
        swaps = 0
        while time.monotonic() < deadline:
            libc.renameat2(-100, b"sub", -100, b"sublink", {RENAME_EXCHANGE})
            swaps += 1
        print(swaps)
        """
    )
    with share.run() as daemon:
        daemon.wait_event("sfwatch.daemon_started")
        result = share.attacker_python(swapper)
        assert result.returncode == 0, result.stderr
        assert int(result.stdout.strip()) > 1000, "the swapper ran"
        drop_honest(share, "honest.wav")
        wait_until(lambda: finished(share, "honest.wav"), 20, "honest.wav done")
        stop(daemon)
    assert (secret_dir / "a.wav").read_bytes() == share.secret
    assert fake_api.uploads_of(sha(share.secret)) == []
    for path in share.inbox.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert path.read_bytes() != share.secret, f"the private file reached {path}"
    assert_secrets_safe(share, fake_api)


def test_modes_never_widen(share: Share, fake_api: FakeAPI, shm_dir: Path) -> None:
    """Copies keep the recording's mode; transcripts and error files get no more than it."""
    config = yaml.safe_load(share.config.read_text())
    shm_dir.chmod(0o755)
    done = shm_dir / "done"  # another file system: the original is copied
    done.mkdir()
    duid = pwd.getpwnam(share.daemon_user).pw_uid
    os.chown(done, duid, -1)
    config["watch"][0]["done_dir"] = str(done)
    share.config.write_text(yaml.safe_dump(config))
    mine = wav(random.Random(), seconds=0.3)
    with share.run() as daemon:
        daemon.wait_event("sfwatch.daemon_started")
        drop_honest(share, "theirs.wav")  # the attacker's, 0640 after chmod
        staging = share.base / "staging-bad"
        staging.write_bytes(b"not audio at all")
        staging.chmod(0o644)
        assert share.as_attacker("cp", str(staging), str(share.inbox / "bad.wav")).returncode == 0
        for name in ("theirs.wav", "bad.wav"):
            assert share.as_attacker("chmod", "640", str(share.inbox / name)).returncode == 0
        private = share.base / "mine.wav"  # the daemon user's own 0600 recording
        private.write_bytes(mine)
        os.chown(private, duid, -1)
        private.chmod(0o600)
        shutil.move(private, share.inbox / "mine.wav")
        for name in ("theirs.wav", "mine.wav"):
            wait_until((done / name).exists, 20, f"{name} done")
        wait_until((share.inbox / "failed" / "bad.wav.error.json").exists, 20, "bad.wav failed")
        stop(daemon)

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(done / "mine.wav") == 0o600
    assert mode(done / "theirs.wav") == 0o640
    assert mode(share.inbox / "mine.txt") & ~0o600 == 0
    assert mode(share.inbox / "theirs.txt") & ~0o640 == 0
    assert mode(share.inbox / "failed" / "bad.wav.error.json") & ~0o640 == 0
    assert mode(share.state) & 0o777 == 0o700
    assert mode(share.state / "ledger.sqlite3") == 0o600
    denied = share.as_attacker("cat", str(share.inbox / "mine.txt"))
    assert denied.returncode != 0, "the attacker cannot read the transcript of a 0600 file"
    assert_secrets_safe(share, fake_api)
