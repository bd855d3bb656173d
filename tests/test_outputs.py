"""Backend options and output formats, end to end: a real daemon, the fake API, real files.

Request fields reach the server exactly as configured; subtitles of a split recording
line up with the original; all outputs of a file share one stem; a field the server
refuses holds uploads until a reload, failing no file; a kill mid-finish converges;
``check --online`` names a refused field's key.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import signal
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from sfwatch.config import load_config
from sfwatch.finish import output_files
from sfwatch.fsutil import temp_name
from sfwatch.ledger import Ledger
from sfwatch.subtitles import parse_cues
from tests.audiogen import write_audio
from tests.conftest import (
    daemon_process,
    files_under,
    run_cli,
    running_daemon,
    wait_until,
    write_config,
)
from tests.fakeapi import R404, FakeAPI, Reply, Upload
from tests.test_crash import can_chattr, immutable, tree, wav

__all__ = ["can_chattr"]  # (a fixture of test_crash.py, used here too)

FAST = {"backoff_base": 0.05}
ALL = ["txt", "srt", "vtt", "json"]


def visible(inbox: Path) -> list[str]:
    """The files a user sees below ``inbox`` (the daemon's own .sfwatch/ left out)."""
    return [name for name in files_under(inbox) if not name.startswith(".sfwatch/")]


def daemon_state(state_dir: Path) -> dict[str, Any]:
    """What the running daemon last published for ``sfwatch status`` ({} before that)."""
    path = state_dir / "ledger.sqlite3"
    if not path.exists():
        return {}
    with contextlib.closing(sqlite3.connect(path, timeout=5)) as db:
        try:
            row = db.execute("SELECT state FROM daemon").fetchone()
        except sqlite3.OperationalError:
            return {}
    return json.loads(row[0] or "{}") if row else {}


def test_uploads_carry_exactly_the_configured_fields(tmp_path: Path, fake_api: FakeAPI) -> None:
    """watch[0] sends api's fields with its own language over them; a plain watch sends none."""
    config = write_config(
        tmp_path,
        fake_api.url,
        api={"request": {"prompt": "Names: Zoë", "temperature": 0.2}},
        watch={"request": {"language": "de", "extra_fields": {"vad_filter": True}}},
        extra_watches=[{"path": "plain", "settle_seconds": 0.3}],
    )
    plain_config = tmp_path / "plain.yaml"
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    data["api"].pop("request")
    data["watch"] = data["watch"][1:]
    plain_config.write_text(yaml.safe_dump(data), encoding="utf-8")
    (tmp_path / "plain").mkdir()
    with running_daemon(config, **FAST) as daemon:
        (daemon.inbox / "a.wav").write_bytes(wav(random.Random(1)))
        wait_until((daemon.inbox / "done" / "a.wav").exists, 15, "a.wav done")
    (upload,) = fake_api.uploads
    assert upload.extra_fields == {
        "language": "de",
        "prompt": "Names: Zoë",
        "temperature": "0.2",
        "vad_filter": "true",
    }
    with running_daemon(plain_config, **FAST):
        (tmp_path / "plain" / "b.wav").write_bytes(wav(random.Random(2)))
        wait_until((tmp_path / "plain" / "done" / "b.wav").exists, 15, "b.wav done")
    assert fake_api.uploads[1].extra_fields == {}, "SiliconFlow's default: file and model only"


def test_split_recording_subtitles_line_up_with_the_original(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """A 70 s file split in 20 s parts: srt/vtt/json segments run on the original's timeline."""
    config = write_config(
        tmp_path, fake_api.url, api={"max_audio_seconds": 20}, watch={"outputs": ALL}
    )
    source = write_audio(tmp_path / "memo.wav", 70, silences=[(18, 19), (37, 38), (56, 57)])
    with running_daemon(config, **FAST) as daemon:
        source.rename(daemon.inbox / "memo.wav")
        wait_until((daemon.inbox / "done" / "memo.wav").exists, 60, "done")
    uploads = fake_api.uploads
    assert len(uploads) == 4, "split in four parts"
    for upload in uploads:
        assert upload.extra_fields == {
            "response_format": "verbose_json",
            "timestamp_granularities[]": "segment",
        }
    inbox = tmp_path / "inbox"
    assert visible(inbox) == ["done/memo.wav", "memo.json", "memo.srt", "memo.txt", "memo.vtt"]
    document = json.loads((inbox / "memo.json").read_text(encoding="utf-8"))
    times = [(s["start"], s["end"]) for s in document["segments"]]
    assert len(times) >= 70 / 5, "a segment for every 5 s (the fake's longest)"
    starts = [a for a, _ in times]
    assert starts == sorted(starts) and len(set(starts)) == len(starts), "monotonic"
    assert all(a <= b for a, b in times)
    for (_, end), (start, _) in itertools.pairwise(times):
        assert start >= end - 0.25, f"a part's segments overlap the next part's: {end} > {start}"
    assert times[0][0] == pytest.approx(0.0, abs=0.01)
    assert times[-1][1] == pytest.approx(70.0, abs=1.0), "the timeline covers the original"
    assert document["duration"] == pytest.approx(70.0, abs=1.0)
    text = (inbox / "memo.txt").read_text(encoding="utf-8")
    assert text == "\n".join(FakeAPI.text_for(u.sha256) for u in uploads) + "\n"
    for fmt in ("srt", "vtt"):
        cues = parse_cues((inbox / f"memo.{fmt}").read_text(encoding="utf-8"))
        assert cues is not None
        assert len(cues) == len(times)
        for cue, (start, end) in zip(cues, times, strict=True):
            assert cue.start == pytest.approx(start)
            assert cue.end == pytest.approx(end)


def test_a_taken_srt_moves_every_output_to_the_next_stem(tmp_path: Path, fake_api: FakeAPI) -> None:
    """Only a.srt exists beforehand: the daemon writes a (1).txt, a (1).srt, done/a (1).wav."""
    config = write_config(tmp_path, fake_api.url, watch={"outputs": ["txt", "srt"]})
    inbox = tmp_path / "inbox"
    (inbox / "a.srt").write_text("someone's subtitles\n", encoding="utf-8")
    with running_daemon(config, **FAST):
        (inbox / "a.wav").write_bytes(wav(random.Random(3)))
        wait_until((inbox / "done" / "a (1).wav").exists, 15, "a.wav done")
    assert visible(inbox) == ["a (1).srt", "a (1).txt", "a.srt", "done/a (1).wav"]
    assert (inbox / "a.srt").read_text(encoding="utf-8") == "someone's subtitles\n"
    assert parse_cues((inbox / "a (1).srt").read_text(encoding="utf-8")) is not None


def test_a_rejected_field_holds_uploads_until_a_reload(tmp_path: Path, fake_api: FakeAPI) -> None:
    """One error line names the key; no file fails; uploads wait; SIGHUP without it finishes."""
    fake_api.reject_field("language")
    config = write_config(tmp_path, fake_api.url, watch={"request": {"language": "xx"}})
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    rng = random.Random(4)
    with daemon_process(config) as daemon:
        (inbox / "a.wav").write_bytes(wav(rng))
        daemon.wait_event("sfwatch.field_rejected")
        (inbox / "b.wav").write_bytes(wav(rng))
        held = wait_until(
            lambda: (
                (s := daemon_state(state)).get("paused_reason") == "field_rejected"
                and s.get("queued", 0) + s.get("waiting", 0) >= 2
                and s
            ),
            20,
            "both files waiting while uploads are held",
        )
        assert "watch[0].request.language" in held["paused"]
        status = run_cli("status", "-c", str(config))
        assert "paused: watch[0].request.language: refused by the server" in status.stdout
        assert [u.status for u in fake_api.uploads] == [400], "held: nothing more was sent"
        naming = [e for e in daemon.lines() if "watch[0].request.language" in json.dumps(e)]
        assert [(e["event"], e["level"]) for e in naming] == [("sfwatch.field_rejected", "error")]
        (line,) = naming
        assert "'language'" in line["api_message"]
        assert not (inbox / "failed").exists(), "not the file's fault"

        data = yaml.safe_load(config.read_text(encoding="utf-8"))
        del data["watch"][0]["request"]
        config.write_text(yaml.safe_dump(data), encoding="utf-8")
        daemon.signal(signal.SIGHUP)
        wait_until(
            lambda: (inbox / "done" / "a.wav").exists() and (inbox / "done" / "b.wav").exists(),
            20,
            "both files done after the reload",
        )
        daemon.wait_event("sfwatch.uploads_resumed")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
    uploads = fake_api.uploads
    assert uploads[0].extra_fields == {"language": "xx"}
    assert [u.extra_fields for u in uploads[1:]] == [{}, {}]
    assert [u.status for u in uploads] == [400, 200, 200]
    assert not (inbox / "failed").exists()
    finished = daemon.events("sfwatch.job_finished")
    assert sorted(e["outcome"] for e in finished) == ["done", "done"]
    assert all(e["attempts"] == 1 for e in finished), "the refusal was not charged"


@pytest.mark.slow
@pytest.mark.usefixtures("can_chattr")
def test_a_kill_between_outputs_converges_on_restart(tmp_path: Path, fake_api: FakeAPI) -> None:
    """SIGKILLed with the txt linked and the srt/json temps half-written: all once, one upload."""
    config = write_config(tmp_path, fake_api.url, watch={"outputs": ["txt", "srt", "json"]})
    inbox = tmp_path / "inbox"
    gate = threading.Event()

    def respond(_upload: Upload) -> Reply | None:
        gate.wait(30)  # the answer waits until the test has set the trap
        return None

    fake_api.responder = respond
    try:
        with daemon_process(config) as first:
            (inbox / "a.wav").write_bytes(wav(random.Random(5)))
            wait_until(lambda: fake_api.in_flight == 1, 15, "the upload reached the API")
            with immutable(inbox):  # paid and planned; no output can be made yet
                gate.set()
                first.wait_event("sfwatch.finish_failed")
                first.kill()
    finally:
        gate.set()
    assert [u.status for u in fake_api.uploads] == [200]
    ledger = Ledger.in_state_dir(load_config(config).state_dir)
    try:
        (row,) = ledger.open_jobs()
    finally:
        ledger.close()
    plan = row.plan
    assert plan is not None and row.timing is not None, "the plan and the paid segments"
    assert [p.name for p in plan.written()] == ["a.txt", "a.srt", "a.json"]
    # What a kill after the first link leaves: the txt in place, the others' temps cut short.
    files = output_files(plan, row.text or "", row.timing)
    files[0][0].write_bytes(files[0][1])
    for path, data in files[1:]:
        temp_name(path, row.job_id).write_bytes(data[: len(data) // 2])

    with daemon_process(config) as second:
        wait_until((inbox / "done" / "a.wav").exists, 15, "a.wav done")
        second.signal(signal.SIGTERM)
        assert second.wait(20) == 0
    assert [u.status for u in fake_api.uploads] == [200], "paid once"
    assert visible(inbox) == ["a.json", "a.srt", "a.txt", "done/a.wav"]
    for path, data in files:
        assert path.read_bytes() == data
    assert not [p for p in tree(inbox) if p.name.endswith(".sfwatch-tmp")], "no temps left"
    (finished,) = second.events("sfwatch.job_finished")
    assert finished["outputs"] == [str(inbox / "a.srt"), str(inbox / "a.json")]


def test_check_online_names_a_refused_field(tmp_path: Path, fake_api: FakeAPI) -> None:
    """check --online probes once per distinct request: exit 1, the refused key named."""
    fake_api.reject_field("temperature")
    config = write_config(
        tmp_path,
        fake_api.url,
        api={"request": {"temperature": 0.3}},
        watch={"request": {"language": "en"}, "outputs": ["txt", "vtt"]},
        extra_watches=[{"path": "other", "request": {"language": "en"}, "outputs": ["vtt", "txt"]}],
    )
    result = run_cli("check", "--online", "-c", str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "rejected (watch[0], watch[1]): api.request.temperature:" in result.stdout
    assert len(fake_api.uploads) == 1, "one probe for the two watches' identical request"
    assert fake_api.uploads[0].extra_fields == {
        "language": "en",
        "temperature": "0.3",
        "response_format": "verbose_json",
        "timestamp_granularities[]": "segment",
    }

    fake_api.reject_field()
    result = run_cli("check", "--online", "-c", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "accepted (watch[0], watch[1]): language (watch[0].request.language)" in result.stdout


def test_check_online_sends_no_probe_by_default(tmp_path: Path, fake_api: FakeAPI) -> None:
    """The default config sends no fields: check --online only asks GET /user/info."""
    config = write_config(tmp_path, fake_api.url)
    result = run_cli("check", "--online", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert fake_api.uploads == []
    assert fake_api.info_requests == 1


def test_check_online_without_user_info_lets_the_probe_decide(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """OpenAI-like servers have no /user/info (404): with fields configured, the probe tells."""
    fake_api.info_reply = R404
    config = write_config(tmp_path, fake_api.url, watch={"request": {"language": "en"}})
    result = run_cli("check", "--online", "-c", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no /user/info here" in result.stdout
    assert "accepted (watch[0]): language (watch[0].request.language)" in result.stdout
    assert len(fake_api.uploads) == 1


@pytest.mark.slow
def test_a_kill_mid_split_keeps_the_paid_parts_segments(tmp_path: Path, fake_api: FakeAPI) -> None:
    """Killed while part 3 of 4 uploads: parts 1-2 are not paid again, their segments are kept."""
    config = write_config(
        tmp_path, fake_api.url, api={"max_audio_seconds": 20}, watch={"outputs": ["txt", "json"]}
    )
    inbox = tmp_path / "inbox"
    gate = threading.Event()

    def respond(upload: Upload) -> Reply | None:
        if len(fake_api.uploads) >= 2:
            gate.wait(30)  # the third part hangs until the daemon is killed
        return None

    fake_api.responder = respond
    source = write_audio(tmp_path / "memo.wav", 70, silences=[(18, 19), (37, 38), (56, 57)])
    try:
        with daemon_process(config) as first:
            source.rename(inbox / "memo.wav")
            wait_until(
                lambda: len(fake_api.uploads) == 2 and fake_api.in_flight == 1,
                30,
                "two parts paid, the third in flight",
            )
            first.kill()
    finally:
        gate.set()
    paid = [u.sha256 for u in fake_api.uploads if u.status == 200]
    assert len(paid) == 2
    with daemon_process(config) as second:
        wait_until((inbox / "done" / "memo.wav").exists, 60, "memo.wav done")
        second.signal(signal.SIGTERM)
        assert second.wait(20) == 0
    # (the killed third upload is answered into the void once the gate opens)
    sent = [u.sha256 for u in fake_api.uploads]
    assert [sent.count(sha) for sha in paid] == [1, 1], "the paid parts were not uploaded again"
    ok = list(dict.fromkeys(u.sha256 for u in fake_api.uploads if u.status == 200))
    assert len(ok) == 4
    document = json.loads((inbox / "memo.json").read_text(encoding="utf-8"))
    times = [(s["start"], s["end"]) for s in document["segments"]]
    starts = [a for a, _ in times]
    assert starts == sorted(starts)
    assert times[0][0] == pytest.approx(0.0, abs=0.01)
    assert times[-1][1] == pytest.approx(70.0, abs=1.0)
    texts = [s["text"] for s in document["segments"]]
    assert any(paid[0][:8] in t for t in texts) and any(ok[3][:8] in t for t in texts)
