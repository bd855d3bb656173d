"""Any recording, any length: the daemon fits every file to the API's limits.

Real audio made by ``tests/audiogen.py``, a real daemon, and the fake API keeping
the bodies it receives, so each upload is probed with PyAV here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
from pathlib import Path

import av
import pytest
import yaml
from structlog.testing import capture_logs

from tests.audiogen import write_audio, write_video
from tests.conftest import daemon_process, running_daemon, wait_until, write_config
from tests.fakeapi import FakeAPI, stall

FAST = {"backoff_base": 0.05}


def _probe(data: bytes) -> tuple[str, float, list[str]]:
    """Container format, duration (s) and stream types of an uploaded body."""
    with av.open(io.BytesIO(data), mode="r") as container:
        duration = (container.duration or 0) / av.time_base
        return container.format.name, duration, [s.type for s in container.streams]


@pytest.fixture
def keeping_api(fake_api: FakeAPI) -> FakeAPI:
    """The fake API, keeping every upload's bytes."""
    fake_api.keep_bodies = True
    return fake_api


def test_big_wav_is_transcoded_to_fit(tmp_path: Path, keeping_api: FakeAPI) -> None:
    """A 7-minute 44.1 kHz stereo WAV (> 50 MB): one upload under the limit, original intact."""
    config = write_config(tmp_path, keeping_api.url)
    source = write_audio(tmp_path / "recorder.wav", 420, rate=44_100, channels=2)
    assert source.stat().st_size > 50_000_000
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        source.rename(daemon.inbox / "recorder.wav")
        wait_until((daemon.inbox / "done" / "recorder.wav").exists, 60, "done")
    (upload,) = keeping_api.uploads
    assert upload.size <= 50_000_000
    fmt, duration, streams = _probe(upload.data)
    assert fmt == "mp3"
    assert streams == ["audio"]
    assert abs(duration - 420) < 0.5
    assert upload.filename == "recorder.mp3"
    done = daemon.inbox / "done" / "recorder.wav"
    assert hashlib.sha256(done.read_bytes()).hexdigest() == digest
    text = (daemon.inbox / "recorder.txt").read_text(encoding="utf-8")
    assert text == FakeAPI.text_for(upload.sha256) + "\n"
    finished = next(e for e in logs if e["event"] == "sfwatch.job_finished")
    assert finished["audio_seconds"] == pytest.approx(420, abs=0.5)
    assert finished["bytes_sent"] == upload.size
    assert not list((daemon.inbox / ".sfwatch").rglob("*.mp3")), "scratch parts cleaned up"


@pytest.mark.slow
def test_seventy_minutes_split_at_a_silence(tmp_path: Path, keeping_api: FakeAPI) -> None:
    """A 70-minute file: parts of at most an hour, cut inside the pause near the limit."""
    config = write_config(tmp_path, keeping_api.url)
    source = write_audio(
        tmp_path / "meeting.wav", 4200, rate=8000, channels=1, silences=[(3490, 3496)]
    )
    with running_daemon(config, **FAST) as daemon:
        source.rename(daemon.inbox / "meeting.wav")
        wait_until((daemon.inbox / "done" / "meeting.wav").exists, 120, "done")
    uploads = keeping_api.uploads
    assert len(uploads) == 2
    durations = [_probe(u.data)[1] for u in uploads]
    assert all(d <= 3600 for d in durations)
    assert 3490 <= durations[0] <= 3496, "the cut falls inside the silence"
    assert sum(durations) == pytest.approx(4200, abs=1)
    assert [u.filename for u in uploads] == ["meeting.part001.mp3", "meeting.part002.mp3"]
    text = (daemon.inbox / "meeting.txt").read_text(encoding="utf-8")
    assert text == "\n".join(FakeAPI.text_for(u.sha256) for u in uploads) + "\n"


def test_short_limit_splits_in_order(tmp_path: Path, keeping_api: FakeAPI) -> None:
    """With api.max_audio_seconds 20, a 70 s file gives parts in order, joined in order."""
    config = write_config(tmp_path, keeping_api.url, api={"max_audio_seconds": 20})
    source = write_audio(tmp_path / "memo.wav", 70, silences=[(18, 19), (37, 38), (56, 57)])
    with running_daemon(config, **FAST) as daemon:
        source.rename(daemon.inbox / "memo.wav")
        wait_until((daemon.inbox / "done" / "memo.wav").exists, 30, "done")
    uploads = keeping_api.uploads
    assert len(uploads) == 4
    durations = [_probe(u.data)[1] for u in uploads]
    assert all(d <= 20 for d in durations)
    text = (daemon.inbox / "memo.txt").read_text(encoding="utf-8")
    assert text == "\n".join(FakeAPI.text_for(u.sha256) for u in uploads) + "\n"


def test_video_uploads_only_its_audio(tmp_path: Path, keeping_api: FakeAPI) -> None:
    """An mp4 with a video and an audio stream: an audio-only MP3 is uploaded."""
    config = write_config(tmp_path, keeping_api.url)
    source = write_video(tmp_path / "clip.mp4", 4)
    with running_daemon(config, **FAST) as daemon:
        source.rename(daemon.inbox / "clip.mp4")
        wait_until((daemon.inbox / "done" / "clip.mp4").exists, 30, "done")
    (upload,) = keeping_api.uploads
    fmt, duration, streams = _probe(upload.data)
    assert (fmt, streams) == ("mp3", ["audio"])
    assert duration == pytest.approx(4, abs=0.3)


@pytest.mark.parametrize("suffix", [".amr", ".wma"])
def test_formats_outside_the_list_are_transcoded(
    tmp_path: Path, keeping_api: FakeAPI, suffix: str
) -> None:
    """AMR and WMA (outside the accepted list) are not sent as they are: they become MP3."""
    config = write_config(tmp_path, keeping_api.url)
    source = write_audio(tmp_path / f"phone{suffix}", 3)
    with running_daemon(config, **FAST) as daemon:
        source.rename(daemon.inbox / source.name)
        wait_until((daemon.inbox / "done" / source.name).exists, 30, "done")
    (upload,) = keeping_api.uploads
    assert _probe(upload.data)[0] == "mp3"
    assert upload.filename == "phone.mp3"


def test_accepted_formats_go_as_they_are(tmp_path: Path, keeping_api: FakeAPI) -> None:
    """An mp3 or m4a within the limits is uploaded byte for byte."""
    config = write_config(tmp_path, keeping_api.url)
    sources = [write_audio(tmp_path / n, 2) for n in ("a.mp3", "b.m4a", "c.flac", "d.ogg")]
    with running_daemon(config, **FAST) as daemon:
        for source in sources:
            source.rename(daemon.inbox / source.name)
        wait_until(lambda: all((daemon.inbox / "done" / s.name).exists() for s in sources), 30)
    digests = {
        hashlib.sha256((daemon.inbox / "done" / s.name).read_bytes()).hexdigest() for s in sources
    }
    assert {u.sha256 for u in keeping_api.uploads} == digests


def test_transcode_always(tmp_path: Path, keeping_api: FakeAPI) -> None:
    """prepare.transcode: always re-encodes even a file the API would take."""
    config = write_config(tmp_path, keeping_api.url)
    data = yaml.safe_load(config.read_text())
    data["prepare"] = {"transcode": "always"}
    config.write_text(yaml.safe_dump(data))
    source = write_audio(tmp_path / "a.wav", 2)
    with running_daemon(config, **FAST) as daemon:
        source.rename(daemon.inbox / "a.wav")
        wait_until((daemon.inbox / "done" / "a.wav").exists, 30, "done")
    assert _probe(keeping_api.uploads[0].data)[0] == "mp3"


@pytest.mark.parametrize("kind", ["random", "truncated", "text"])
def test_not_audio_fails_without_an_upload(tmp_path: Path, keeping_api: FakeAPI, kind: str) -> None:
    """Random bytes, a WAV cut to its header, a text file: not_audio, nothing uploaded."""
    config = write_config(tmp_path, keeping_api.url)
    wav = write_audio(tmp_path / "src.wav", 1).read_bytes()
    data = {"random": os.urandom(5000), "truncated": wav[:44], "text": b"hello\n" * 100}[kind]
    with running_daemon(config, **FAST) as daemon:
        (daemon.inbox / "bad.mp3").write_bytes(data)
        error_file = daemon.inbox / "failed" / "bad.mp3.error.json"
        wait_until(error_file.exists, 10, "failed")
    record = json.loads(error_file.read_text())
    assert record["reason"] == "not_audio"
    assert keeping_api.uploads == []
    assert (daemon.inbox / "failed" / "bad.mp3").read_bytes() == data


@pytest.mark.slow
def test_kill_during_parts_does_not_upload_finished_parts_again(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """kill -9 while part 3 of 4 is uploading: after a restart, parts 1-2 are not sent again."""
    config = write_config(tmp_path, fake_api.url, api={"max_audio_seconds": 20})
    source = write_audio(tmp_path / "long.wav", 70, silences=[(18, 19), (37, 38), (56, 57)])
    responses = iter([None, None])
    fake_api.responder = lambda _u: next(responses, stall(60))
    with daemon_process(config) as daemon:
        daemon.wait_event("sfwatch.daemon_started")
        source.rename(tmp_path / "inbox" / "long.wav")
        wait_until(lambda: len(fake_api.uploads) == 2 and fake_api.in_flight == 1, 30, "part 3")
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.wait(10)
    first_two = [u.sha256 for u in fake_api.uploads[:2]]
    fake_api.responder = None
    with daemon_process(config) as daemon:
        wait_until((tmp_path / "inbox" / "done" / "long.wav").exists, 60, "done after restart")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
    later = [u.sha256 for u in fake_api.uploads[2:] if u.status == 200]
    assert not set(first_two) & set(later), "finished parts were not uploaded again"
    assert len(later) == 2
    text = (tmp_path / "inbox" / "long.txt").read_text(encoding="utf-8")
    assert text == "\n".join(FakeAPI.text_for(s) for s in [*first_two, *later]) + "\n"
