"""The command line, run as real subprocesses: exit codes, messages, signals."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import pytest

from tests.audiogen import wav_bytes, write_audio
from tests.conftest import (
    API_KEY,
    daemon_process,
    files_under,
    run_cli,
    wait_until,
    write_config,
)
from tests.fakeapi import R400_DATA_STRING, FakeAPI, Reply, stall


def test_version() -> None:
    """--version prints the version and exits 0."""
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("sfwatch ")


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("watch:\n  - path: in\n    settle_seconds: 0\n", "watch[0].settle_seconds: must be > 0"),
        ("api:\n  concurency: 4\nwatch:\n  - path: in\n", "api.concurency: unknown key"),
        (
            "api:\n  concurrency: four\nwatch:\n  - path: in\n",
            "api.concurrency: must be an integer",
        ),
        ("watch: []\n", "watch:"),
        ("log:\n  format: xml\nwatch:\n  - path: in\n", "log.format: must be one of"),
        ("watch:\n  - path: in\n    poll: sometimes\n", "watch[0].poll:"),
        ("watch: [\n", "invalid YAML"),
    ],
)
@pytest.mark.parametrize("command", ["check", "run"])
def test_config_errors_name_the_key(
    tmp_path: Path, yaml_text: str, message: str, command: str
) -> None:
    """A bad config exits 2 with a message naming the key, for check and run alike."""
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    result = run_cli(command, "-c", str(config))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_key_is_a_config_error(tmp_path: Path, fake_api: FakeAPI) -> None:
    """No key anywhere: exit 2, naming where a key may come from."""
    config = write_config(tmp_path, fake_api.url)
    result = run_cli("run", "-c", str(config), SILICONFLOW_API_KEY="")
    assert result.returncode == 2
    assert "api.api_key_file" in result.stderr
    assert "SILICONFLOW_API_KEY" in result.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    """-c naming a file that does not exist: exit 2."""
    result = run_cli("check", "-c", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr


def test_usage_error_exits_2() -> None:
    """An unknown command is a usage error."""
    assert run_cli("frobnicate").returncode == 2


def test_check_online(tmp_path: Path, fake_api: FakeAPI) -> None:
    """check --online: 0 with a good key (balance shown), 1 with a bad one; key never shown."""
    config = write_config(tmp_path, fake_api.url)
    good = run_cli("check", "--online", "-c", str(config))
    assert good.returncode == 0, good.stderr
    assert "0.88" in good.stdout
    bad = run_cli("check", "--online", "-c", str(config), SILICONFLOW_API_KEY="sk-wrong-key-123")
    assert bad.returncode == 1
    assert "401" in bad.stderr
    for output in (good.stdout, good.stderr, bad.stdout, bad.stderr):
        assert API_KEY not in output
        assert "sk-wrong-key-123" not in output


def test_check_online_wrong_base_url(tmp_path: Path, fake_api: FakeAPI) -> None:
    """A base URL without /v1 answers 404: the online check fails with exit 1."""
    config = write_config(tmp_path, fake_api.url.removesuffix("/v1"))
    result = run_cli("check", "--online", "-c", str(config))
    assert result.returncode == 1
    assert "404" in result.stderr


def test_check_warns_about_plain_http_to_another_host(tmp_path: Path) -> None:
    """check: http:// to a host that is not loopback passes, with one warning on stderr."""
    remote = run_cli("check", "-c", str(write_config(tmp_path, "http://192.0.2.7:8000/v1")))
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout.startswith("config ok: ")
    assert remote.stderr.splitlines() == [
        (
            "sfwatch: warning: api.base_url: plain http:// to 192.0.2.7, which is not this "
            "machine: the API key and every recording cross the network unencrypted; use https://"
        )
    ]
    local = run_cli("check", "-c", str(write_config(tmp_path, "http://127.0.0.1:8000/v1")))
    assert (local.returncode, local.stderr) == (0, "")


def test_config_errors_are_printed_escaped(tmp_path: Path) -> None:
    """A path with ESC and a newline in a config error prints escaped, on one line."""
    (tmp_path / "in\x1b[2J\nx").write_text("a file, not a folder")
    config = tmp_path / "bad.yaml"
    config.write_text('watch:\n  - path: "in\\e[2J\\nx"\n')
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 2
    assert (
        result.stderr == f"sfwatch: watch[0].path: {tmp_path}/in\\x1b[2J\\nx is not a directory\n"
    )


def test_transcribe_output_is_escaped(tmp_path: Path, fake_api: FakeAPI) -> None:
    """transcribe prints names and the server's message escaped: no ESC, BEL or CR gets out."""
    evil = "\x1b[2J\x1b[31mrejected\x07\r\nsfwatch: ok"
    fake_api.responder = lambda u: Reply(400, {"message": evil}) if u.filename == "b.wav" else None
    config = write_config(tmp_path, fake_api.url)
    good = tmp_path / "a\x1b]0;t\x07\n.wav"
    bad = tmp_path / "b.wav"
    good.write_bytes(wav_bytes(800))
    bad.write_bytes(wav_bytes(900))
    result = run_cli("transcribe", "-c", str(config), str(good), str(bad))
    assert result.returncode == 1
    assert result.stdout == f"{tmp_path}/a\\x1b]0;t\\x07\\n.txt\n"
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"sfwatch: {bad}: ")
    # (transcribe.py made the server's controls U+FFFD; the line break left is escaped)
    assert "\ufffd[2J\ufffd[31mrejected\ufffd\ufffd\\nsfwatch: ok" in line
    assert "\x1b" not in result.stderr
    assert "\r" not in result.stderr
    assert (tmp_path / "a\x1b]0;t\x07\n.txt").exists()


def test_transcribe_one_shot(tmp_path: Path, fake_api: FakeAPI) -> None:
    """transcribe: a sibling .txt per file, nothing moved, exit 1 if any failed."""
    fake_api.responder = lambda u: R400_DATA_STRING if u.filename == "bad.mp3" else None
    config = write_config(tmp_path, fake_api.url)
    good, bad = tmp_path / "good.wav", tmp_path / "bad.mp3"
    good.write_bytes(wav_bytes(800))
    bad.write_bytes(wav_bytes(800))
    (tmp_path / "good.txt").write_text("already here\n")
    result = run_cli("transcribe", "-c", str(config), str(good), str(bad))
    assert result.returncode == 1
    assert "bad.mp3" in result.stderr
    assert "400" in result.stderr
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    assert (tmp_path / "good (1).txt").read_text() == FakeAPI.text_for(digest) + "\n"
    assert (tmp_path / "good.txt").read_text() == "already here\n"
    assert good.exists()
    assert bad.exists()
    assert not (tmp_path / "bad.txt").exists()
    only_good = run_cli("transcribe", "-c", str(config), str(good))
    assert only_good.returncode == 0


def test_transcribe_fits_files_like_the_daemon(tmp_path: Path, fake_api: FakeAPI) -> None:
    """transcribe probes and transcodes too: AMR goes up as MP3, random bytes fail unsent."""
    fake_api.keep_bodies = True
    config = write_config(tmp_path, fake_api.url)
    amr = write_audio(tmp_path / "phone.amr", 2)
    noise = tmp_path / "noise.mp3"
    noise.write_bytes(os.urandom(3000))
    result = run_cli("transcribe", "-c", str(config), str(amr), str(noise))
    assert result.returncode == 1
    assert "not decodable" in result.stderr
    (upload,) = fake_api.uploads
    assert upload.filename == "phone.mp3"
    assert (tmp_path / "phone.txt").read_text() == FakeAPI.text_for(upload.sha256) + "\n"
    assert amr.exists()
    assert not (tmp_path / "noise.txt").exists()


def test_run_processes_files_and_stops_on_sigterm(tmp_path: Path, fake_api: FakeAPI) -> None:
    """sfwatch run: transcripts appear, JSON logs carry the fields, SIGTERM exits 0."""
    config = write_config(tmp_path, fake_api.url)
    inbox = tmp_path / "inbox"
    (inbox / "early.mp3").write_bytes(wav_bytes(3000))
    with daemon_process(config) as daemon:
        daemon.wait_event("sfwatch.daemon_started")
        (inbox / "sub").mkdir()
        (inbox / "sub" / "late.ogg").write_bytes(wav_bytes(5000))
        finished = daemon.wait_event("sfwatch.job_finished", 2)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
        lines = daemon.lines()
    assert (inbox / "early.txt").exists()
    assert (inbox / "sub" / "late.txt").exists()
    assert files_under(inbox / "done") == ["early.mp3", "sub/late.ogg"]
    assert {f["outcome"] for f in finished} == {"done"}
    traces = {u.trace_id for u in fake_api.uploads}
    for line in finished:
        assert line["trace_id"] in traces
        assert line["job_id"]
        assert line["file"].startswith(str(inbox))
        assert line["level"] == "info"
        assert line["timestamp"].endswith("Z")
        assert line["duration_ms"] >= 0
    assert all("raw" not in line for line in lines), "every line is JSON"
    assert API_KEY not in daemon.log_path.read_text()
    assert any(line["event"] == "sfwatch.daemon_stopped" for line in lines)


def test_second_signal_is_a_cold_stop_and_work_resumes(tmp_path: Path, fake_api: FakeAPI) -> None:
    """SIGTERM waits for a stalled upload; a second SIGTERM leaves; a restart finishes it."""
    fake_api.script(stall(60))
    config = write_config(tmp_path, fake_api.url, api={"timeout_seconds": 120})
    inbox = tmp_path / "inbox"
    data = wav_bytes(4000)
    (inbox / "stuck.mp3").write_bytes(data)
    with daemon_process(config) as daemon:
        daemon.wait_event("sfwatch.upload_started")
        wait_until(lambda: fake_api.in_flight == 1, 10, "upload in flight")
        daemon.signal(signal.SIGTERM)
        daemon.wait_event("sfwatch.daemon_stopping")
        assert daemon.proc.poll() is None, "a warm stop waits for the upload in flight"
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(10) == 0
    claimed = list((inbox / ".sfwatch" / "work").rglob("stuck.mp3"))
    assert len(claimed) == 1, "the claimed file stays in the work area"
    assert claimed[0].read_bytes() == data
    with daemon_process(config) as daemon:
        daemon.wait_event("sfwatch.job_resumed")
        wait_until((inbox / "done" / "stuck.mp3").exists, 20, "resumed job done")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
    assert (inbox / "stuck.txt").read_text() == FakeAPI.text_for(
        hashlib.sha256(data).hexdigest()
    ) + "\n"
    assert not list((inbox / ".sfwatch" / "work").rglob("*.mp3"))


def test_second_daemon_on_one_state_dir_is_refused(tmp_path: Path, fake_api: FakeAPI) -> None:
    """Two daemons must not share a state_dir: the second exits 2, naming the key."""
    config = write_config(tmp_path, fake_api.url)
    with daemon_process(config) as first:
        first.wait_event("sfwatch.daemon_started")
        second = run_cli("run", "-c", str(config))
        assert second.returncode == 2
        assert "state_dir:" in second.stderr
        assert "in use" in second.stderr
        first.signal(signal.SIGTERM)
        assert first.wait() == 0


def test_transcribe_does_not_ignore_a_broken_config(tmp_path: Path) -> None:
    """A ./sfwatch.yaml with a bad value is an error for transcribe too, not skipped."""
    (tmp_path / "sfwatch.yaml").write_text("api:\n  concurrency: 0\nwatch:\n  - path: in\n")
    (tmp_path / "a.wav").write_bytes(wav_bytes(800))
    result = run_cli("transcribe", str(tmp_path / "a.wav"), cwd=tmp_path)
    assert result.returncode == 2
    assert "api.concurrency" in result.stderr
