"""The bad-input catalogue: every bad input ends in a specific, logged outcome.

Each case runs a real daemon (in a thread, or as a subprocess where it must run
as another user) against the fake API on loopback. After each case a normal file
is dropped and must be processed: the daemon never crashes or stalls on bad
input, and no original is ever lost (promises P1-P3 of docs/design.md).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from sfwatch.fsutil import NAME_MAX, free_stems, numbered
from tests.audiogen import wav_bytes
from tests.conftest import (
    API_KEY,
    daemon_process,
    files_under,
    running_daemon,
    wait_until,
    write_config,
)
from tests.fakeapi import R400_DATA_STRING, FakeAPI, Reply, Upload

FAST = {"backoff_base": 0.05}
Logs = list[MutableMapping[str, Any]]


def _events(logs: Logs, name: str) -> Logs:
    return [e for e in logs if e["event"] == name]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _still_works(inbox: Path, name: str = "after.wav") -> None:
    """A normal file dropped now is transcribed and finished: nothing crashed or stalled."""
    data = wav_bytes(1234)
    (inbox / name).write_bytes(data)
    done = inbox / "done" / name
    wait_until(done.exists, 15, f"{name} processed after the bad input")
    transcript = (inbox / name).with_suffix(".txt")
    wait_until(transcript.exists, 5, f"{transcript.name}")
    assert done.read_bytes() == data
    assert transcript.read_text(encoding="utf-8") == FakeAPI.text_for(_sha(data)) + "\n"


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.sfwatch-tmp"))


def _claimed(inbox: Path, name: str) -> list[Path]:
    """The copies of ``name`` in the work area."""
    return list((inbox / ".sfwatch").rglob(name))


def _utf8_len(name: str) -> int:
    return len(os.fsencode(name))


# --- 1, 2: content the API cannot take ----------------------------------------------


def test_empty_file_fails_as_empty_without_upload(tmp_path: Path, fake_api: FakeAPI) -> None:
    """A zero-byte file goes to failed/ with reason "empty"; nothing is uploaded."""
    config = write_config(tmp_path, fake_api.url)
    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        (daemon.inbox / "empty.mp3").write_bytes(b"")
        error_file = daemon.inbox / "failed" / "empty.mp3.error.json"
        wait_until(error_file.exists, 10, "error file")
        _still_works(daemon.inbox)
    record = json.loads(error_file.read_text(encoding="utf-8"))
    assert record["reason"] == "empty"
    assert record["attempts"] == 0
    assert (daemon.inbox / "failed" / "empty.mp3").read_bytes() == b""
    assert [u.filename for u in fake_api.uploads] == ["after.wav"]
    assert not (daemon.inbox / "empty.txt").exists()
    (finished,) = [e for e in _events(logs, "sfwatch.job_finished") if e["outcome"] == "failed"]
    assert finished["reason"] == "empty"
    assert finished["file"] == str(daemon.inbox / "empty.mp3")


def test_random_bytes_rejected_by_api_fail_as_api_rejected(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """Random bytes named .mp3, answered 400: failed/ with reason "api_rejected", one upload."""
    fake_api.responder = lambda u: R400_DATA_STRING if u.filename == "noise.mp3" else None
    config = write_config(tmp_path, fake_api.url)
    data = wav_bytes(5000)
    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        (daemon.inbox / "noise.mp3").write_bytes(data)
        error_file = daemon.inbox / "failed" / "noise.mp3.error.json"
        wait_until(error_file.exists, 10, "error file")
        _still_works(daemon.inbox)
    record = json.loads(error_file.read_text(encoding="utf-8"))
    assert record["reason"] == "api_rejected"
    assert record["http_status"] == 400
    assert record["trace_id"] == fake_api.uploads[0].trace_id
    assert (daemon.inbox / "failed" / "noise.mp3").read_bytes() == data
    assert [u.filename for u in fake_api.uploads] == ["noise.mp3", "after.wav"]
    (finished,) = [e for e in _events(logs, "sfwatch.job_finished") if e["outcome"] == "failed"]
    assert finished["reason"] == "api_rejected"
    assert finished["http_status"] == 400


# --- 3, 4: things that are not regular files ----------------------------------------


@pytest.mark.parametrize("how", ["made-in-inbox", "moved-in"])
def test_folder_named_like_audio_is_a_folder(how: str, tmp_path: Path, fake_api: FakeAPI) -> None:
    """A folder called x.mp3 is looked into, not taken: its inner.wav is processed normally."""
    config = write_config(tmp_path, fake_api.url)
    data = wav_bytes(2000)
    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        folder = daemon.inbox / "x.mp3"
        if how == "moved-in":
            outside = tmp_path / "outside" / "x.mp3"
            outside.mkdir(parents=True)
            (outside / "inner.wav").write_bytes(data)
            outside.rename(folder)
        else:
            folder.mkdir()
            (folder / "inner.wav").write_bytes(data)
        done = daemon.inbox / "done" / "x.mp3" / "inner.wav"
        wait_until(done.exists, 10, "done/x.mp3/inner.wav")
        _still_works(daemon.inbox)
    assert done.read_bytes() == data
    assert (folder / "inner.txt").read_text(encoding="utf-8") == FakeAPI.text_for(_sha(data)) + "\n"
    assert folder.is_dir(), "the folder itself stays where it is"
    assert not (daemon.inbox / "failed").exists()
    assert sorted(u.filename for u in fake_api.uploads) == ["after.wav", "inner.wav"]
    assert not _events(logs, "sfwatch.file_skipped")


@pytest.mark.parametrize("poll", [False, True], ids=["inotify", "polling"])
def test_symlinks_and_pipes_are_left_alone(poll: bool, tmp_path: Path, fake_api: FakeAPI) -> None:
    """A symlink to a file (or folder) outside, a FIFO: left alone, each logged once."""
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    target = outside / "target.mp3"
    target_data = wav_bytes(3000)
    target.write_bytes(target_data)
    inner = outside / "folder" / "inner.mp3"
    inner.write_bytes(b"inside a linked folder")
    config = write_config(tmp_path, fake_api.url, watch={"poll": poll})
    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        link = daemon.inbox / "link.mp3"
        link.symlink_to(target)
        folder_link = daemon.inbox / "linked"  # a linked folder is not descended into
        folder_link.symlink_to(outside / "folder", target_is_directory=True)
        pipe = daemon.inbox / "pipe.mp3"
        os.mkfifo(pipe)  # opening it would block: it must never be opened
        wait_until(lambda: len(_events(logs, "sfwatch.file_skipped")) == 2, 10, "skips logged")
        _still_works(daemon.inbox, "first.wav")
        # Later events and rescans for the same paths do not log them again.
        daemon.daemon.notes.note(str(link))
        daemon.daemon.notes.note(str(pipe))
        daemon.daemon.notes.rescan_requested.set()
        _still_works(daemon.inbox, "second.wav")
    skipped = {e["file"]: e["reason"] for e in _events(logs, "sfwatch.file_skipped")}
    assert len(_events(logs, "sfwatch.file_skipped")) == 2
    assert skipped == {str(link): "symlink", str(pipe): "not_a_regular_file"}
    assert pipe.is_fifo()
    assert link.is_symlink() and link.readlink() == target
    assert target.read_bytes() == target_data
    assert inner.read_bytes() == b"inside a linked folder"
    assert sorted(u.filename for u in fake_api.uploads) == ["first.wav", "second.wav"]
    assert files_under(daemon.inbox / "done") == ["first.wav", "second.wav"]
    assert not (daemon.inbox / "failed").exists()
    assert not (daemon.inbox / "link.txt").exists()


def test_path_that_cannot_be_looked_at_does_not_stop_the_loop(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """A noted path whose stat() fails: skipped and logged; the work loop carries on.

    In a folder closed after its file's event, stat() fails with EACCES (see the
    unreadable case); root cannot be refused, so ENAMETOOLONG stands in for it here.
    """
    config = write_config(tmp_path, fake_api.url)
    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        bad = daemon.inbox / f"{'a' * 300}.mp3"
        daemon.daemon.notes.note(str(bad))
        wait_until(lambda: _events(logs, "sfwatch.file_skipped"), 5, "skip logged")
        _still_works(daemon.inbox)
        assert daemon.thread.is_alive()
    skipped = {e["file"]: e["reason"] for e in _events(logs, "sfwatch.file_skipped")}
    assert skipped == {str(bad): "os_error"}


# --- 5: names -------------------------------------------------------------------------


def _long_name(unit: str, suffix: str) -> str:
    """A name of exactly NAME_MAX bytes made of ``unit`` characters (padded with ASCII)."""
    stem = unit * ((NAME_MAX - _utf8_len(suffix)) // _utf8_len(unit))
    stem += "x" * (NAME_MAX - _utf8_len(stem + suffix))
    name = stem + suffix
    assert _utf8_len(name) == NAME_MAX
    return name


LONG_ASCII = _long_name("a", ".mp3")
LONG_CJK = _long_name("語", ".wav")
LONG_EMOJI = _long_name("🎤", ".m4a")  # 4 bytes a character: cuts must not split one
NAMES = {
    "spaces": "meeting  notes 2026 .mp3",
    "cjk-emoji": "会议记录 🎤📼 第二部分.m4a",
    "newline": "line\nbreak.wav",
    "leading-dash": "-rf.mp3",
    "255-ascii": LONG_ASCII,
    "255-cjk": LONG_CJK,
    "255-emoji": LONG_EMOJI,
}


def test_awkward_names_are_transcribed(tmp_path: Path, fake_api: FakeAPI) -> None:
    """Spaces, CJK and emoji, a newline, a leading dash, 255 bytes: each finishes normally."""
    config = write_config(tmp_path, fake_api.url)
    written = {name: wav_bytes(1500 + i) for i, name in enumerate(NAMES.values())}
    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        for name, data in written.items():
            (daemon.inbox / name).write_bytes(data)
        wait_until(lambda: len(files_under(daemon.inbox / "done")) == len(NAMES), 15, "all done")
        _still_works(daemon.inbox)
    for name, data in written.items():
        assert (daemon.inbox / "done" / name).read_bytes() == data, name
        transcript = daemon.inbox / f"{Path(name).stem}.txt"
        assert transcript.read_text(encoding="utf-8") == FakeAPI.text_for(_sha(data)) + "\n"
        assert not (daemon.inbox / name).exists()
    assert sorted(u.sha256 for u in fake_api.uploads if u.filename != "after.wav") == sorted(
        _sha(data) for data in written.values()
    )
    assert not (daemon.inbox / "failed").exists()
    assert not _events(logs, "sfwatch.finish_failed")
    assert _temp_files(daemon.inbox) == []


def test_name_not_utf8_is_left_in_place_and_logged(tmp_path: Path, fake_api: FakeAPI) -> None:
    """Latin-1 bytes in a name (an old SMB share): left in the inbox, logged once as skipped."""
    config = write_config(tmp_path, fake_api.url)
    inbox = os.fsencode(tmp_path / "inbox")
    data = wav_bytes(1000)
    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        Path(os.fsdecode(inbox + b"/caf\xe9.mp3")).write_bytes(data)
        Path(os.fsdecode(inbox + b"/d\xfcr")).mkdir()
        Path(os.fsdecode(inbox + b"/d\xfcr/in.mp3")).write_bytes(data)
        wait_until(lambda: len(_events(logs, "sfwatch.file_skipped")) == 2, 10, "skips logged")
        _still_works(daemon.inbox)
        assert daemon.thread.is_alive()
    skipped = {e["file"]: e["reason"] for e in _events(logs, "sfwatch.file_skipped")}
    shown = str(tmp_path / "inbox")
    assert skipped == {
        f"{shown}/caf\\xe9.mp3": "name_not_utf8",
        f"{shown}/d\\xfcr/in.mp3": "name_not_utf8",
    }
    assert Path(os.fsdecode(inbox + b"/caf\xe9.mp3")).read_bytes() == data
    assert Path(os.fsdecode(inbox + b"/d\xfcr/in.mp3")).read_bytes() == data
    assert [u.filename for u in fake_api.uploads] == ["after.wav"]


def test_derived_names_are_cut_to_fit(tmp_path: Path) -> None:
    """A stem too long for a derived name is cut between characters, never inside one."""
    mics = "🎤" * 63  # 252 bytes
    assert numbered(mics, 1, ".mp3") == "🎤" * 61 + " (1).mp3"  # 244 + 4 + 4 bytes
    assert numbered(mics, 0, ".txt") == "🎤" * 62 + ".txt"
    assert numbered("a" * 251, 12, ".mp3") == "a" * 246 + " (12).mp3"
    stems = free_stems("a" * 251, [(tmp_path, ".mp3"), (tmp_path, ".mp3.error.json")])
    assert next(stems) == "a" * 240  # fits the longer suffix, so both names share it
    latin1 = os.fsdecode(b"\xe9" * 251)  # bytes that are not UTF-8 count one each
    assert os.fsencode(numbered(latin1, 1, ".mp3")) == b"\xe9" * 247 + b" (1).mp3"
    assert numbered("short", 3, ".mp3") == "short (3).mp3"


def _cut_ok(cut: str, whole: str) -> None:
    """``cut`` is a prefix of ``whole`` ending on a character boundary, shorter in bytes."""
    assert whole.startswith(cut)
    assert 0 < _utf8_len(cut) < _utf8_len(whole)
    cut.encode("utf-8")  # valid UTF-8: no half characters


@pytest.mark.parametrize("name", [LONG_ASCII, LONG_CJK, LONG_EMOJI], ids=["ascii", "cjk", "emoji"])
def test_255_byte_name_collisions_and_failures_fit(
    name: str, tmp_path: Path, fake_api: FakeAPI
) -> None:
    """A taken 255-byte name: " (1)" fits by cutting the stem; so does a failed .error.json."""
    stem, suffix = Path(name).stem, Path(name).suffix
    rejected = f"z{name[1:]}"  # another 255-byte name, not audio: it fails
    config = write_config(tmp_path, fake_api.url)
    inbox = tmp_path / "inbox"
    (inbox / "done").mkdir()
    (inbox / "done" / name).write_bytes(b"an older recording")
    (inbox / f"{stem}.txt").write_text("an older transcript\n")
    data = wav_bytes(1700)
    with capture_logs() as logs, running_daemon(config, **FAST):
        (inbox / name).write_bytes(data)
        (inbox / rejected).write_bytes(b"bad" * 300)
        wait_until(lambda: len(files_under(inbox / "done")) == 2, 10, "collision finished")
        wait_until(lambda: len(files_under(inbox / "failed")) == 2, 10, "failure finished")
        _still_works(inbox)
    assert not _events(logs, "sfwatch.finish_failed")
    # The collision: transcript and original share one cut stem with " (1)".
    (moved,) = [p for p in (inbox / "done").iterdir() if p.name not in (name, "after.wav")]
    new_stem = moved.name.removesuffix(suffix)
    assert new_stem.endswith(" (1)")
    _cut_ok(new_stem.removesuffix(" (1)"), stem)
    assert _utf8_len(moved.name) <= NAME_MAX
    assert moved.read_bytes() == data
    transcript = inbox / f"{new_stem}.txt"
    assert transcript.read_text(encoding="utf-8") == FakeAPI.text_for(_sha(data)) + "\n"
    assert (inbox / "done" / name).read_bytes() == b"an older recording"
    assert (inbox / f"{stem}.txt").read_text() == "an older transcript\n"
    # The failure: original and <name>.error.json share a cut stem.
    (error_file,) = (inbox / "failed").glob("*.error.json")
    original = error_file.with_name(error_file.name.removesuffix(".error.json"))
    assert _utf8_len(error_file.name) <= NAME_MAX
    assert original.read_bytes() == b"bad" * 300
    _cut_ok(original.name.removesuffix(suffix), Path(rejected).stem)
    assert json.loads(error_file.read_text(encoding="utf-8"))["reason"] == "not_audio"
    assert _temp_files(inbox) == []


# --- 6, 7: files that change under us ------------------------------------------------


def test_file_deleted_while_settling_is_dropped_quietly(tmp_path: Path, fake_api: FakeAPI) -> None:
    """Deleted before it settled: no upload, no error, nothing logged about it."""
    config = write_config(tmp_path, fake_api.url, watch={"settle_seconds": 1.0})
    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        gone = daemon.inbox / "gone.mp3"
        gone.write_bytes(wav_bytes(4000))
        wait_until(lambda: gone in daemon.daemon.settler, 5, "settling")
        gone.unlink()
        _still_works(daemon.inbox)
        wait_until(lambda: len(daemon.daemon.settler) == 0, 5, "forgotten")
    assert [u.filename for u in fake_api.uploads] == ["after.wav"]
    about_it = [e for e in logs if e.get("file") == str(gone)]
    assert about_it == [], "a file that went away is nobody's business"
    assert not any(e["log_level"] in ("warning", "error", "critical") for e in logs)


def test_file_truncated_while_settling_waits_again(tmp_path: Path, fake_api: FakeAPI) -> None:
    """Truncated before it settled: the wait restarts, one upload of the final content."""
    settle = 1.0
    config = write_config(tmp_path, fake_api.url, watch={"settle_seconds": settle})
    data = wav_bytes(200_000)
    with running_daemon(config, **FAST) as daemon:
        path = daemon.inbox / "cut.mp3"
        path.write_bytes(data)
        wait_until(lambda: path in daemon.daemon.settler, 5, "settling")
        os.truncate(path, 50_000)
        truncated_at = time.monotonic()
        done = daemon.inbox / "done" / "cut.mp3"
        wait_until(done.exists, 10, "done")
        _still_works(daemon.inbox)
    (upload, _after) = fake_api.uploads
    assert upload.sha256 == _sha(data[:50_000])
    assert upload.started - truncated_at >= settle * 0.9, "it waited a full settle again"
    assert done.read_bytes() == data[:50_000]


def test_file_growing_after_claim_is_uploaded_again(tmp_path: Path) -> None:
    """Appended to through an open handle during its upload: noticed, settled, sent again."""
    first, more = wav_bytes(30_000), os.urandom(20_000)
    with FakeAPI(api_key=API_KEY, latency=0.2) as api:
        config = write_config(tmp_path, api.url)
        with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
            path = daemon.inbox / "growing.wav"
            writer = path.open("wb")  # kept open across the claim's rename
            try:

                def append_once(upload: Upload) -> Reply | None:
                    if not writer.closed:  # the first upload: the writer carries on
                        writer.write(more)
                        writer.close()
                    return None

                api.responder = append_once
                writer.write(first)
                writer.flush()
                done = daemon.inbox / "done" / "growing.wav"
                wait_until(done.exists, 15, "done after the second upload")
            finally:
                writer.close()
            _still_works(daemon.inbox)
        uploads = [u for u in api.uploads if u.filename == "growing.wav"]
    assert [u.sha256 for u in uploads] == [_sha(first), _sha(first + more)]
    assert done.read_bytes() == first + more
    transcript = daemon.inbox / "growing.txt"
    assert transcript.read_text(encoding="utf-8") == FakeAPI.text_for(_sha(first + more)) + "\n"
    (changed,) = _events(logs, "sfwatch.file_changed")
    assert changed["file"] == str(path)
    finished = [e for e in _events(logs, "sfwatch.job_finished") if e["file"] == str(path)]
    assert [e["outcome"] for e in finished] == ["done"]


# --- 8: a file the daemon may not read ------------------------------------------------


def _unprivileged_user() -> str:
    """``nobody``, if this root can run the daemon as nobody; else skip."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("there is no user 'nobody'")
    entry = pwd.getpwnam("nobody")
    probe = subprocess.run(
        [
            *("setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"),
            *(sys.executable, "-c", "import sfwatch.daemon"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"nobody cannot run sfwatch here: {probe.stderr.strip()[-300:]}")
    return "nobody"


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder under the system temp dir that an unprivileged user may use."""
    folder = Path(tempfile.mkdtemp(prefix="sfwatch-bad-input-"))
    folder.chmod(0o777)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_unreadable_file_fails_as_unreadable(shared_tmp: Path, fake_api: FakeAPI) -> None:
    """A file the daemon's user may not read: failed/ with reason "unreadable", no upload.

    Folders it may not enter or change are left alone, logged. Root reads anything,
    so as root the daemon runs as ``nobody`` (a subprocess).
    """
    user = _unprivileged_user() if os.geteuid() == 0 else None
    config = write_config(shared_tmp, fake_api.url)
    inbox = shared_tmp / "inbox"
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in (shared_tmp, inbox):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    data = wav_bytes(2500)
    private, closing, locked = inbox / "private", inbox / "closing", inbox / "locked"
    outside = shared_tmp / "outside"
    outside.mkdir()
    (outside / "a.mp3").write_bytes(data)
    outside.chmod(0)
    try:
        with daemon_process(config, user=user) as daemon:
            daemon.wait_event("sfwatch.daemon_started")
            secret = inbox / "secret.mp3"
            secret.write_bytes(data)
            secret.chmod(0)
            outside.rename(private)  # a folder it may not enter
            closing.mkdir()  # a folder closed while its file's event is on the way
            (closing / "b.mp3").write_bytes(data)
            closing.chmod(0)
            locked.mkdir()  # a folder it may read but not take files out of
            (locked / "c.mp3").write_bytes(data)
            locked.chmod(0o555)
            error_file = inbox / "failed" / "secret.mp3.error.json"
            wait_until(error_file.exists, 10, "error file")
            daemon.wait_event("sfwatch.file_skipped")
            daemon.wait_event("sfwatch.claim_failed")
            _still_works(inbox)
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0
    finally:
        for folder in (outside, private, closing, locked):
            with contextlib.suppress(OSError):
                folder.chmod(0o755)
    record = json.loads(error_file.read_text(encoding="utf-8"))
    assert record["reason"] == "unreadable"
    assert "Permission denied" in record["message"]
    failed = inbox / "failed" / "secret.mp3"
    assert failed.stat().st_mode & 0o777 == 0, "kept as it was, permissions included"
    failed.chmod(0o600)
    assert failed.read_bytes() == data
    assert [u.filename for u in fake_api.uploads] == ["after.wav"]
    finished = [e for e in daemon.events("sfwatch.job_finished") if e["outcome"] == "failed"]
    assert [e["reason"] for e in finished] == ["unreadable"]
    skipped = {e["file"]: e["reason"] for e in daemon.events("sfwatch.file_skipped")}
    assert skipped[str(private)] == "no_access"
    assert all(reason == "no_access" for reason in skipped.values())
    assert {e["file"] for e in daemon.events("sfwatch.claim_failed")} == {str(locked / "c.mp3")}
    for left in (private / "a.mp3", closing / "b.mp3", locked / "c.mp3"):
        assert left.read_bytes() == data, "left where it was"
    assert not daemon.events("sfwatch.worker_crashed")


# --- 9, 10: the daemon cannot finish ------------------------------------------------


@pytest.fixture
def chattr() -> Iterator[Callable[[Path, str], None]]:
    """``chattr(folder, "+i")`` (root, ext4 and friends; else skip); always undone after."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    touched: list[Path] = []

    def run(folder: Path, flag: str) -> None:
        touched.append(folder)
        done = subprocess.run(
            ["chattr", flag, str(folder)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            pytest.skip(f"chattr {flag} does not work here: {done.stderr.strip()}")

    try:
        yield run
    finally:
        for folder in touched:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True, check=False)


def test_done_not_writable_retries_finish_without_paying_again(
    tmp_path: Path, fake_api: FakeAPI, chattr: Callable[[Path, str], None]
) -> None:
    """done/ immutable: finish_failed, the original waits claimed; once writable, done, 1 upload."""
    config = write_config(tmp_path, fake_api.url)
    done_dir = tmp_path / "inbox" / "done"
    done_dir.mkdir()
    chattr(done_dir, "+i")
    data = wav_bytes(3300)
    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        (daemon.inbox / "x.mp3").write_bytes(data)
        wait_until(lambda: len(_events(logs, "sfwatch.finish_failed")) >= 2, 10, "failing")
        assert [u.sha256 for u in fake_api.uploads] == [_sha(data)]
        (claimed,) = _claimed(daemon.inbox, "x.mp3")
        assert claimed.read_bytes() == data, "the original waits in the work area"
        assert (daemon.inbox / "x.txt").exists(), "the transcript was written first"
        chattr(done_dir, "-i")
        wait_until((done_dir / "x.mp3").exists, 10, "finished once writable")
        _still_works(daemon.inbox)
    assert sum(u.filename == "x.mp3" for u in fake_api.uploads) == 1, "paid once"
    assert (done_dir / "x.mp3").read_bytes() == data
    assert (daemon.inbox / "x.txt").read_text(encoding="utf-8") == FakeAPI.text_for(
        _sha(data)
    ) + "\n"
    assert not (daemon.inbox / "x (1).txt").exists(), "no second transcript"
    assert not _claimed(daemon.inbox, "x.mp3")
    failed = _events(logs, "sfwatch.finish_failed")
    assert all(e["file"] == str(daemon.inbox / "x.mp3") for e in failed)
    assert "Operation not permitted" in str(failed[0]["error"])


def test_failed_not_writable_keeps_the_verdict(
    tmp_path: Path, fake_api: FakeAPI, chattr: Callable[[Path, str], None]
) -> None:
    """A 400 while failed/ is immutable: the move is retried, the file is not uploaded again."""
    fake_api.responder = lambda u: R400_DATA_STRING if u.filename == "bad.mp3" else None
    config = write_config(tmp_path, fake_api.url)
    failed_dir = tmp_path / "inbox" / "failed"
    failed_dir.mkdir()
    chattr(failed_dir, "+i")
    data = wav_bytes(2100)
    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        (daemon.inbox / "bad.mp3").write_bytes(data)
        wait_until(lambda: len(_events(logs, "sfwatch.finish_failed")) >= 3, 15, "retrying")
        chattr(failed_dir, "-i")
        wait_until((failed_dir / "bad.mp3.error.json").exists, 15, "failed once writable")
        _still_works(daemon.inbox)
    assert sum(u.filename == "bad.mp3" for u in fake_api.uploads) == 1, "judged once"
    assert json.loads((failed_dir / "bad.mp3.error.json").read_text())["reason"] == "api_rejected"


@pytest.fixture
def tiny_inbox(tmp_path: Path) -> Iterator[Path]:
    """tmp_path/inbox as a 512 KiB tmpfs (needs root); unmounted afterwards."""
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("mount/umount are not available")
    point = tmp_path / "inbox"
    point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield point
    finally:
        if subprocess.run(["umount", str(point)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)


def _fill(folder: Path) -> Path:
    """Write a filler file into ``folder`` until its file system is full."""
    filler = folder / ".filler"
    chunk = b"\0" * 65536
    with filler.open("ab", buffering=0) as out:
        try:
            while True:
                out.write(chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler


def test_disk_full_while_writing_transcript(
    tiny_inbox: Path, tmp_path: Path, fake_api: FakeAPI
) -> None:
    """The disk fills during the upload: finish_failed, nothing partial; freed → done, 1 upload."""
    config = write_config(tmp_path, fake_api.url)
    fillers: list[Path] = []

    def fill_once(_upload: Upload) -> Reply | None:
        if not fillers:  # the first upload: the disk fills while the API works
            fillers.append(_fill(tiny_inbox))
        return None

    fake_api.responder = fill_once
    data = wav_bytes(20_000)
    with capture_logs() as logs, running_daemon(config, **FAST):
        (tiny_inbox / "full.mp3").write_bytes(data)
        wait_until(lambda: _events(logs, "sfwatch.finish_failed"), 10, "finish failed")
        assert not list(tiny_inbox.glob("*.txt")), "no partial transcript is visible"
        wait_until(lambda: _temp_files(tiny_inbox) == [], 5, "temp files removed")
        (claimed,) = _claimed(tiny_inbox, "full.mp3")
        assert claimed.read_bytes() == data, "the original is safe in the work area"
        fillers[0].unlink()
        wait_until((tiny_inbox / "done" / "full.mp3").exists, 10, "finished once there is room")
        _still_works(tiny_inbox)
    assert sum(u.filename == "full.mp3" for u in fake_api.uploads) == 1, "paid once"
    assert (tiny_inbox / "done" / "full.mp3").read_bytes() == data
    assert (tiny_inbox / "full.txt").read_text(encoding="utf-8") == FakeAPI.text_for(
        _sha(data)
    ) + "\n"
    assert _temp_files(tiny_inbox) == []
    assert not _claimed(tiny_inbox, "full.mp3")
    assert "No space left" in str(_events(logs, "sfwatch.finish_failed")[0]["error"])
