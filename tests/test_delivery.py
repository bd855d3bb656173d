"""Every way real tools deliver a file: each is uploaded once, complete.

A real daemon (in a thread), a real inotify observer, real files, and the fake
API on loopback. Promise P2 of docs/design.md.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.audiogen import wav_bytes
from tests.conftest import files_under, running_daemon, wait_until, write_config
from tests.fakeapi import FakeAPI

Delivery = Callable[[Path, Path, bytes], Path]


def _cp(inbox: Path, outside: Path, data: bytes) -> Path:
    src = outside / "rec.mp3"
    src.write_bytes(data)
    subprocess.run(["cp", str(src), str(inbox / "rec.mp3")], check=True)
    return inbox / "rec.mp3"


def _slow_write(inbox: Path, _outside: Path, data: bytes) -> Path:
    # An SMB-like writer: chunks with pauses shorter than settle_seconds (1.0 s here).
    target = inbox / "rec.mp3"
    chunks = [data[i : i + len(data) // 8] for i in range(0, len(data), len(data) // 8)]
    with target.open("wb") as out:
        for chunk in chunks:
            out.write(chunk)
            out.flush()
            time.sleep(0.35)
    return target


def _reopen_slow_write(inbox: Path, _outside: Path, data: bytes) -> Path:
    # Some writers close and reopen between chunks: a close-write must not end the wait.
    target = inbox / "rec.mp3"
    step = len(data) // 5
    for i in range(0, len(data), step):
        with target.open("ab") as out:
            out.write(data[i : i + step])
        time.sleep(0.35)
    return target


def _temp_then_rename(inbox: Path, _outside: Path, data: bytes) -> Path:
    # rsync: write ".rec.mp3.Xa8Zq" in the folder, then rename it to its real name.
    temp = inbox / ".rec.mp3.Xa8Zq"
    with temp.open("wb") as out:
        out.write(data[: len(data) // 2])
        out.flush()
        time.sleep(0.4)
        out.write(data[len(data) // 2 :])
    temp.rename(inbox / "rec.mp3")
    return inbox / "rec.mp3"


def _mv_from_outside(inbox: Path, outside: Path, data: bytes) -> Path:
    src = outside / "rec.mp3"
    src.write_bytes(data)
    src.rename(inbox / "rec.mp3")
    return inbox / "rec.mp3"


def _hard_link(inbox: Path, outside: Path, data: bytes) -> Path:
    src = outside / "rec.mp3"
    src.write_bytes(data)
    os.link(src, inbox / "rec.mp3")
    return inbox / "rec.mp3"


def _cp_p_old_mtime(inbox: Path, outside: Path, data: bytes) -> Path:
    src = outside / "rec.mp3"
    src.write_bytes(data)
    old = time.time() - 400 * 86400
    os.utime(src, (old, old))
    subprocess.run(["cp", "-p", str(src), str(inbox / "rec.mp3")], check=True)
    assert (inbox / "rec.mp3").stat().st_mtime < time.time() - 86400
    return inbox / "rec.mp3"


def _new_subfolder(inbox: Path, _outside: Path, data: bytes) -> Path:
    folder = inbox / "2026" / "meetings"
    folder.mkdir(parents=True)
    (folder / "rec.mp3").write_bytes(data)
    return folder / "rec.mp3"


def _folder_moved_in(inbox: Path, outside: Path, data: bytes) -> Path:
    # mv of a whole folder: inotify reports only the folder, not the files in it.
    folder = outside / "export"
    folder.mkdir()
    (folder / "rec.mp3").write_bytes(data)
    folder.rename(inbox / "export")
    return inbox / "export" / "rec.mp3"


DELIVERIES: dict[str, Delivery] = {
    "cp": _cp,
    "slow-write": _slow_write,
    "close-reopen-write": _reopen_slow_write,
    "temp-name-then-rename": _temp_then_rename,
    "mv-from-outside": _mv_from_outside,
    "hard-link": _hard_link,
    "cp-p-old-mtime": _cp_p_old_mtime,
    "new-subfolder": _new_subfolder,
    "folder-moved-in": _folder_moved_in,
}


@pytest.mark.parametrize("how", list(DELIVERIES))
def test_delivered_file_is_uploaded_once_and_complete(
    how: str, tmp_path: Path, fake_api: FakeAPI
) -> None:
    """A file delivered this way is uploaded once, whole, and finished in place."""
    data = wav_bytes(300_000)
    digest = hashlib.sha256(data).hexdigest()
    outside = tmp_path / "outside"
    outside.mkdir()
    config = write_config(tmp_path, fake_api.url, watch={"settle_seconds": 1.0})
    with running_daemon(config) as daemon:
        arrived = DELIVERIES[how](daemon.inbox, outside, data)
        rel = arrived.relative_to(daemon.inbox)
        done = daemon.inbox / "done" / rel
        wait_until(done.exists, 15, f"{done}")
        transcript = arrived.with_suffix(".txt")
        wait_until(transcript.exists, 5, f"{transcript}")
    uploads = fake_api.uploads
    assert [u.sha256 for u in uploads] == [digest], "exactly one upload, of the whole file"
    assert uploads[0].filename == "rec.mp3"
    assert done.read_bytes() == data
    assert not arrived.exists()
    assert transcript.read_text(encoding="utf-8") == FakeAPI.text_for(digest) + "\n"
    assert not (daemon.inbox / "failed").exists()


def test_noise_files_are_left_alone(tmp_path: Path, fake_api: FakeAPI) -> None:
    """Temp and system names, and non-audio, are never touched or uploaded."""
    config = write_config(tmp_path, fake_api.url)
    noise = [
        ".DS_Store",
        "x.part",
        "._a.wav",
        "notes.pdf",
        "~$draft.mp3",
        "b.mp3.tmp",
        "c.mp3.crdownload",
        "Thumbs.db",
        "@eaDir/a.mp3",
        ".hidden/a.mp3",
    ]
    with running_daemon(config) as daemon:
        for name in noise:
            (daemon.inbox / name).parent.mkdir(parents=True, exist_ok=True)
            (daemon.inbox / name).write_bytes(b"noise " + name.encode())
        # A real file after the noise: once it is done, the noise has had its chance.
        (daemon.inbox / "real.wav").write_bytes(wav_bytes(1000))
        wait_until((daemon.inbox / "done" / "real.wav").exists, 10, "real.wav done")
    assert [u.filename for u in fake_api.uploads] == ["real.wav"]
    for name in noise:
        assert (daemon.inbox / name).read_bytes() == b"noise " + name.encode()


def test_files_present_at_start_are_processed(tmp_path: Path, fake_api: FakeAPI) -> None:
    """The start-up scan finds files that arrived while the daemon was down."""
    config = write_config(tmp_path, fake_api.url)
    inbox = tmp_path / "inbox"
    for i in range(20):
        (inbox / f"sub{i % 3}").mkdir(exist_ok=True)
        (inbox / f"sub{i % 3}" / f"f{i}.wav").write_bytes(wav_bytes(500 + i))
    with running_daemon(config, burst=True) as daemon:
        daemon.thread.join(20)
        assert not daemon.thread.is_alive(), "burst mode ends when the work is done"
    assert len(fake_api.uploads) == 20
    assert len(files_under(inbox / "done")) == 20
    assert sorted(p.name for p in inbox.rglob("*.txt")) == sorted(f"f{i}.txt" for i in range(20))


def test_bad_audio_goes_to_failed_with_reason(tmp_path: Path, fake_api: FakeAPI) -> None:
    """The API's 400 for random bytes: failed/bad.mp3 and bad.mp3.error.json."""
    from tests.fakeapi import R400_DATA_STRING  # noqa: PLC0415

    fake_api.responder = lambda upload: R400_DATA_STRING if upload.filename == "bad.mp3" else None
    config = write_config(tmp_path, fake_api.url)
    with running_daemon(config) as daemon:
        data = wav_bytes(4000)
        (daemon.inbox / "bad.mp3").write_bytes(data)
        error_file = daemon.inbox / "failed" / "bad.mp3.error.json"
        wait_until(error_file.exists, 10, "error file")
    import json  # noqa: PLC0415

    record = json.loads(error_file.read_text(encoding="utf-8"))
    assert (daemon.inbox / "failed" / "bad.mp3").read_bytes() == data
    assert record["reason"] == "api_rejected"
    assert record["http_status"] == 400
    assert record["trace_id"] == fake_api.uploads[0].trace_id
    assert record["attempts"] == 1
    assert "Invalid audio" in record["api_message"]
    assert not (daemon.inbox / "bad.txt").exists()


def test_name_collisions_share_one_stem(tmp_path: Path, fake_api: FakeAPI) -> None:
    """A taken transcript or done/ name gives both files the same ' (n)' stem."""
    config = write_config(tmp_path, fake_api.url)
    inbox = tmp_path / "inbox"
    (inbox / "done").mkdir()
    (inbox / "done" / "a.mp3").write_bytes(b"older recording")
    (inbox / "a.txt").write_text("older transcript\n")
    (inbox / "b (1).txt").write_text("somebody's notes\n")
    with running_daemon(config) as daemon:
        (inbox / "a.mp3").write_bytes(wav_bytes(900))
        (inbox / "b.mp3").write_bytes(wav_bytes(901))
        (inbox / "b.txt").write_text("taken too\n")
        wait_until(lambda: len(fake_api.uploads) == 2, 10, "two uploads")
        wait_until(lambda: len(list((inbox / "done").glob("*.mp3"))) == 3, 10, "moves")
        daemon.stop()
    assert (inbox / "done" / "a.mp3").read_bytes() == b"older recording"
    assert (inbox / "a.txt").read_text() == "older transcript\n"
    assert (inbox / "a (1).txt").exists() and (inbox / "done" / "a (1).mp3").exists()
    assert (inbox / "b (2).txt").exists() and (inbox / "done" / "b (2).mp3").exists()
    assert (inbox / "b (1).txt").read_text() == "somebody's notes\n"


def test_done_dir_on_another_filesystem(tmp_path: Path, fake_api: FakeAPI) -> None:
    """done_dir on a tmpfs: the original is copied, verified, then removed."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system at /dev/shm")
    done_dir = Path(shm / f"sfwatch-test-{os.getpid()}-{time.monotonic_ns()}")
    try:
        config = write_config(tmp_path, fake_api.url, watch={"done_dir": str(done_dir)})
        data = wav_bytes(50_000)
        with running_daemon(config) as daemon:
            (daemon.inbox / "x.m4a").write_bytes(data)
            wait_until((done_dir / "x.m4a").exists, 10, "moved across file systems")
            wait_until(lambda: not list((daemon.inbox / ".sfwatch").rglob("x.m4a")), 5)
        assert (done_dir / "x.m4a").read_bytes() == data
        assert [p.name for p in done_dir.iterdir()] == ["x.m4a"], "no temp files left"
        assert (daemon.inbox / "x.txt").exists()
    finally:
        shutil.rmtree(done_dir, ignore_errors=True)
