"""claim: one atomic rename into the work area; leftovers are found again (promises 1, 4)."""

from __future__ import annotations

import threading
from pathlib import Path, PurePosixPath

import pytest

import sfwatch.claim
from sfwatch.claim import claim, claimed_files, instance_dir, release
from sfwatch.config import WatchConfig
from sfwatch.job import FileSignature, Job
from sfwatch.settle import SettledFile, signature_of
from tests.conftest import files_under


@pytest.fixture
def watch(tmp_path: Path) -> WatchConfig:
    """A watched folder tmp_path/inbox."""
    folder = tmp_path / "inbox"
    folder.mkdir()
    return WatchConfig(path=folder)


def settled_file(watch: WatchConfig, rel: str, data: bytes = b"audio") -> SettledFile:
    """Create ``rel`` in the inbox and return it as settle would hand it out."""
    path = watch.path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    signature = signature_of(path)
    assert signature is not None
    return SettledFile(path, watch.path, signature)


def job_dirs(watch: WatchConfig) -> list[Path]:
    """Every job folder in every instance folder of the work area."""
    work = watch.work_dir / "work"
    if not work.is_dir():
        return []
    return sorted(job for inst in work.iterdir() for job in inst.iterdir())


def test_claim_renames_into_instance_job_folder(watch: WatchConfig) -> None:
    """The file moves (same inode) to .sfwatch/work/<instance>/<job_id>/<rel>."""
    settled = settled_file(watch, "sub/deeper/a.mp3", b"audio bytes")
    job = claim(settled, watch.work_dir, "host-a")
    assert job is not None
    assert job.path == watch.path / ".sfwatch/work/host-a" / job.job_id / "sub/deeper/a.mp3"
    assert job.path.read_bytes() == b"audio bytes"
    assert job.path.stat().st_ino == settled.signature.inode
    assert not settled.path.exists()
    assert job.rel == PurePosixPath("sub/deeper/a.mp3")
    assert job.root == watch.path
    assert job.source == settled.path
    assert job.name == "a.mp3"
    assert job.signature == settled.signature
    assert job_dirs(watch) == [instance_dir(watch.work_dir, "host-a") / job.job_id]


def test_claim_job_ids_are_unique(watch: WatchConfig) -> None:
    """Each claim gets its own job folder, even for files of the same name."""
    first = claim(settled_file(watch, "a.mp3"), watch.work_dir, "i")
    second = claim(settled_file(watch, "a.mp3"), watch.work_dir, "i")
    assert first is not None
    assert second is not None
    assert first.job_id != second.job_id
    assert first.path.is_file()
    assert second.path.is_file()


def test_claim_refuses_a_file_changed_since_it_settled(watch: WatchConfig) -> None:
    """A file written to after settling is left where it is; nothing is created."""
    settled = settled_file(watch, "a.mp3", b"first part")
    with settled.path.open("ab") as f:
        f.write(b" and more")
    assert claim(settled, watch.work_dir, "i") is None
    assert settled.path.read_bytes() == b"first part and more"
    assert job_dirs(watch) == []


def test_claim_refuses_a_replaced_file(watch: WatchConfig) -> None:
    """A file replaced by another of the same name is not the one that settled."""
    settled = settled_file(watch, "a.mp3", b"old")
    other = watch.path / ".a.mp3.new"
    other.write_bytes(b"new")
    other.replace(settled.path)
    assert claim(settled, watch.work_dir, "i") is None
    assert settled.path.read_bytes() == b"new"
    assert job_dirs(watch) == []


def test_claim_of_a_vanished_file_is_a_lost_race(watch: WatchConfig) -> None:
    """A file already gone gives None and leaves no job folder behind."""
    settled = settled_file(watch, "sub/a.mp3")
    settled.path.unlink()
    assert claim(settled, watch.work_dir, "i") is None
    assert job_dirs(watch) == []


def test_claim_race_lost_at_the_rename(watch: WatchConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two claimers both past the signature check: one rename wins, the loser cleans up."""
    settled = settled_file(watch, "sub/a.mp3", b"contested")
    both_checked = threading.Barrier(2, timeout=5)
    seen = threading.local()
    signature_at = sfwatch.claim._signature_at

    def check_then_wait(dfd: int, name: str) -> FileSignature | None:
        signature = signature_at(dfd, name)
        if not getattr(seen, "checked", False):  # (the second call checks what was taken)
            seen.checked = True
            both_checked.wait()  # neither renames before both saw the file
        return signature

    monkeypatch.setattr(sfwatch.claim, "_signature_at", check_then_wait)
    results: dict[str, Job | None] = {}

    def claimer(instance: str) -> None:
        results[instance] = claim(settled, watch.work_dir, instance)

    threads = [threading.Thread(target=claimer, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    winners = [job for job in results.values() if job is not None]
    assert len(results) == 2
    assert len(winners) == 1
    assert winners[0].path.read_bytes() == b"contested"
    assert job_dirs(watch) == [winners[0].path.parents[1]]
    assert files_under(watch.path) == [winners[0].path.relative_to(watch.path).as_posix()]


def test_claim_free_race_many_files(watch: WatchConfig) -> None:
    """Two threads claiming the same 100 files: each file is claimed exactly once."""
    content = {f"sub/f{i:03}.wav": f"file {i}".encode() for i in range(100)}
    files = [settled_file(watch, rel, data) for rel, data in content.items()]
    start = threading.Barrier(2, timeout=5)
    won: dict[str, list[Job]] = {"a": [], "b": []}

    def claimer(instance: str) -> None:
        start.wait()
        for settled in files:
            job = claim(settled, watch.work_dir, instance)
            if job is not None:
                won[instance].append(job)

    threads = [threading.Thread(target=claimer, args=(name,)) for name in won]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    jobs = won["a"] + won["b"]
    assert sorted(str(job.rel) for job in jobs) == sorted(content)
    for job in jobs:
        assert job.path.read_bytes() == content[str(job.rel)]
    assert sorted(job_dirs(watch)) == sorted(job.path.parents[1] for job in jobs)
    assert not list((watch.path / "sub").iterdir())


def test_claimed_files_round_trip(watch: WatchConfig) -> None:
    """What claim left behind comes back as the same job after a restart."""
    job = claim(settled_file(watch, "sub/Meeting 2024 - Zürich 会议.m4a"), watch.work_dir, "i")
    assert job is not None
    found = list(claimed_files(watch.work_dir, "i", watch.path))
    assert found == [job]


def test_claimed_files_recovers_leftovers_and_cleans_up(watch: WatchConfig) -> None:
    """Leftover claims are found (subfolders, spaces, unicode); empty jobs and temps go."""
    base = instance_dir(watch.work_dir, "mine")
    layout = {
        "job1/sub/deep/a b ü 语音.mp3": b"one",
        "job2/x.wav": b"two",
        "job5/c.flac": b"five",
        "job5/.c.txt.0a1b2c3d.sfwatch-tmp": b"half a transcript",
        "job6/.y.mp3.0a1b2c3d.sfwatch-tmp": b"half a copy",
    }
    for rel, data in layout.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(data)
    (base / "job3").mkdir()  # claimed nothing: the rename never happened
    (base / "job4" / "sub" / "deeper").mkdir(parents=True)
    other = instance_dir(watch.work_dir, "other") / "job9" / "y.mp3"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"not mine")

    found = sorted(claimed_files(watch.work_dir, "mine", watch.path), key=lambda j: j.job_id)

    assert [(j.job_id, str(j.rel)) for j in found] == [
        ("job1", "sub/deep/a b ü 语音.mp3"),
        ("job2", "x.wav"),
        ("job5", "c.flac"),
    ]
    for job in found:
        assert job.root == watch.path
        assert job.path == base / job.job_id / job.rel
        assert job.signature == signature_of(job.path)
        assert job.path.read_bytes() == layout[f"{job.job_id}/{job.rel}"]
    assert not (base / "job3").exists()
    assert not (base / "job4").exists()
    assert files_under(base) == ["job1/sub/deep/a b ü 语音.mp3", "job2/x.wav", "job5/c.flac"]
    assert other.read_bytes() == b"not mine"


def test_claimed_files_without_work_area(watch: WatchConfig) -> None:
    """No work area yet: nothing to recover, and nothing is created."""
    assert list(claimed_files(watch.work_dir, "i", watch.path)) == []
    assert not watch.work_dir.exists()


def test_release_removes_job_folders_up_to_instance(watch: WatchConfig) -> None:
    """After finish moved the file out, release leaves only the instance folder."""
    job = claim(settled_file(watch, "sub/deeper/a.mp3"), watch.work_dir, "i")
    assert job is not None
    job.path.rename(watch.path / "moved-out.mp3")
    release(job)
    assert instance_dir(watch.work_dir, "i").is_dir()
    assert list(instance_dir(watch.work_dir, "i").iterdir()) == []
