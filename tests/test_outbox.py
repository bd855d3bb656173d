"""Hooks, webhooks and Apprise notifications (docs/design.md §13), with real processes
and sockets: hook scripts that record what they get, fail, hang or print 10 MB; a
loopback webhook receiver that checks Standard-Webhooks signatures; Apprise's
``json://`` target against a loopback receiver; a daemon SIGKILLed between a file's
finish and its deliveries. The API key is looked for in everything sent.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import signal
import socket
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from sfwatch.config import Config, HooksConfig, NotifyConfig, WatchConfig, parse_config
from sfwatch.errors import TransientError
from sfwatch.ledger import Ledger
from sfwatch.outbox import Outbox, Routes, hook_env, retry_delay, run_hook, sign
from sfwatch.transcribe import WebhookPoster
from tests.audiogen import wav_bytes
from tests.conftest import (
    API_KEY,
    daemon_process,
    files_under,
    run_cli,
    running_daemon,
    wait_until,
    write_config,
)
from tests.fakeapi import R401, FakeAPI
from tests.hostile import echo_authorization

FAST = {"backoff_base": 0.05}
SECRET = base64.b64encode(b"sfwatch-test-webhook-secret-0123").decode()
REQUIRED_ENV = {
    "PATH",
    "LANG",
    "SFWATCH_EVENT",
    "SFWATCH_JOB_ID",
    "SFWATCH_FILE",
    "SFWATCH_OUTCOME",
    "SFWATCH_ORIGINAL",
    "SFWATCH_TRANSCRIPT",
    "SFWATCH_ERROR_FILE",
    "SFWATCH_REASON",
    "SFWATCH_TRACE_ID",
    "SFWATCH_MODEL",
    "SFWATCH_AUDIO_SECONDS",
    "SFWATCH_WATCH",
}

RECORDER = """\
import json, os, sys
record = {"argv": sys.argv[1:], "env": dict(os.environ), "stdin": sys.stdin.read(),
          "cwd": os.getcwd(), "pgid": os.getpgid(0), "pid": os.getpid()}
name = os.environ["SFWATCH_JOB_ID"] + "-" + os.environ["SFWATCH_EVENT"] + ".json"
with open(os.path.join(sys.argv[1], name), "w", encoding="utf-8") as out:
    json.dump(record, out)
print("recorded", os.environ["SFWATCH_EVENT"])
"""

BLOCKER = """\
import os, sys, time
marker = os.path.join(sys.argv[1], "started")
if not os.path.exists(marker):
    with open(marker, "w") as out:
        out.write(str(os.getpid()))
    time.sleep(600)
with open(os.path.join(sys.argv[1], "ran-" + str(os.getpid())), "w", encoding="utf-8") as out:
    out.write(sys.stdin.read())
"""

HANGER = """\
import os, subprocess, sys, time
child = subprocess.Popen(["sleep", "300"])
with open(sys.argv[1], "w") as out:
    out.write(f"{os.getpid()} {child.pid}")
time.sleep(300)
"""


def _events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


def _script(folder: Path, name: str, text: str) -> list[str]:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return [sys.executable, str(path)]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _outbox(tmp_path: Path) -> list[Any]:
    ledger = Ledger.in_state_dir(tmp_path / "state")
    try:
        return ledger.outbox_rows()
    finally:
        ledger.close()


# -- a loopback webhook receiver ----------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """One request the receiver got, and what it answered."""

    headers: dict[str, str]
    body: bytes
    status: int
    signed: bool | None  # None: no secret to check against

    @property
    def json(self) -> Any:
        """The body, parsed."""
        return json.loads(self.body)


class Receiver:
    """An http.server on 127.0.0.1 in a thread: records POSTs, answers ``statuses`` in
    turn (then 200), checks ``webhook-signature`` against ``secret``, and can hold the
    first request unanswered until ``release`` is set."""

    def __init__(
        self, secret: bytes | None = None, statuses: Sequence[int] = (), *, stall: bool = False
    ) -> None:
        self.secret = secret
        self.statuses = list(statuses)
        self.requests: list[Received] = []
        self.stalled = threading.Event()
        self.release = threading.Event()
        self._stall = stall
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real receivers do

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.handle(self, body)

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Where to POST."""
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def handle(self, request: BaseHTTPRequestHandler, body: bytes) -> None:
        """Answer one POST (see the class docstring)."""
        headers = {k.lower(): v for k, v in request.headers.items()}
        headers["x-port"] = str(request.client_address[1])  # which connection it came on
        with self._lock:
            stall = self._stall
            self._stall = False
            status = self.statuses.pop(0) if self.statuses and not stall else 200
        if stall:
            self.stalled.set()
            self.release.wait(60)
            self.requests.append(Received(headers, body, 0, self._check(headers, body)))
            return  # the sender is gone by now
        self.requests.append(Received(headers, body, status, self._check(headers, body)))
        request.send_response(status)
        request.send_header("Content-Length", "2")
        request.end_headers()
        request.wfile.write(b"ok")

    def _check(self, headers: dict[str, str], body: bytes) -> bool | None:
        if self.secret is None:
            return None
        signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
        digest = base64.b64encode(hmac.new(self.secret, signed, hashlib.sha256).digest()).decode()
        offered = headers.get("webhook-signature", "").split()
        return any(hmac.compare_digest(f"v1,{digest}", sig) for sig in offered)

    def accepted(self) -> list[Received]:
        """The requests answered 2xx."""
        return [r for r in self.requests if 200 <= r.status < 300]


@contextmanager
def receiver(
    secret: bytes | None = None, statuses: Sequence[int] = (), *, stall: bool = False
) -> Iterator[Receiver]:
    """A started ``Receiver``, shut down after the block."""
    got = Receiver(secret, statuses, stall=stall)
    got.thread.start()
    try:
        yield got
    finally:
        got.release.set()
        got.server.shutdown()
        got.server.server_close()


# -- units ------------------------------------------------------------------------------------


def test_signature_matches_the_standard_webhooks_test_vector() -> None:
    """sign() gives the Standard Webhooks reference library's own test vector."""
    key = base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    got = sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert got == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_routes_follow_the_watch_and_the_defaults(tmp_path: Path) -> None:
    """A watch's own hook replaces hooks.on_done, [] turns it off; events pick webhooks."""
    true = ["/bin/true"]
    data = {
        "hooks": {"on_done": true, "on_failed": true},
        "webhooks": [
            {"url": "http://127.0.0.1:9/a", "events": ["failed", "paused"]},
            {"url": "http://127.0.0.1:9/b"},
        ],
        "notify": {"urls": ["json://127.0.0.1:9/n"], "on": ["failed"]},
        "watch": [
            {"path": "in1"},
            {"path": "in2", "on_done": ["/bin/echo", "x"], "on_failed": []},
        ],
    }
    config = parse_config(data, tmp_path, {"HOME": str(tmp_path)})
    routes = Routes(config)
    plain, own = config.watch
    fields = {"job_id": "j1", "file": "/x/a.mp3"}
    assert [r.sink for r in routes.for_job(plain, "done", fields)] == [
        "hook",
        "webhook:http://127.0.0.1:9/b",
    ]
    assert routes.for_job(own, "done", fields)[0].target["argv"] == ["/bin/echo", "x"]
    assert [r.sink for r in routes.for_job(own, "failed", fields)] == [
        "webhook:http://127.0.0.1:9/a",
        "webhook:http://127.0.0.1:9/b",
        "notify",
    ]
    assert {r.ordering for r in routes.for_account("paused", {})} == {"account"}
    assert [r.sink for r in routes.for_account("resumed", {})] == ["webhook:http://127.0.0.1:9/b"]
    assert all(1.0 <= retry_delay(1, 2.0) <= 2.0 for _ in range(50))


def test_hook_output_of_10_mb_is_counted_not_kept() -> None:
    """A hook printing 10 MB: 4 KiB of it kept, the rest counted, Python memory flat."""
    write = "import sys\nfor _ in range(100): sys.stdout.buffer.write(b'x' * 100_000)"
    argv = [sys.executable, "-c", write]
    tracemalloc.start()
    try:
        result = run_hook(argv, hook_env("done", {}), b"", 30.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.ok, result
    assert result.stdout_bytes == 10_000_000
    assert result.stdout == b"x" * 4096
    assert peak < 1_000_000, f"{peak} bytes held for 10 MB of output"


# -- hooks in a running daemon ----------------------------------------------------------------


def test_hooks_get_a_built_environment_and_the_transcript(
    tmp_path: Path, fake_api: FakeAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """on_done/on_failed get the SFWATCH_* fields, PATH and LANG only, the text on stdin."""
    monkeypatch.setenv("SILICONFLOW_API_KEY", API_KEY)  # the daemon's own environment has it
    records = tmp_path / "records"
    records.mkdir()
    recorder = _script(tmp_path, "recorder.py", RECORDER)
    printer = [sys.executable, "-c", "import sys; sys.stdout.write('y' * 10_000_000)"]
    config = write_config(
        tmp_path,
        fake_api.url,
        extra={"hooks": {"on_done": [*recorder, str(records)], "on_failed": printer}},
    )
    data = wav_bytes(2500)
    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        (daemon.inbox / "talk.wav").write_bytes(data)
        (daemon.inbox / "empty.wav").write_bytes(b"")
        wait_until(lambda: list(records.glob("*-done.json")), 15, "the on_done hook")
        wait_until(lambda: len(_events(logs, "sfwatch.hook_finished")) == 2, 15, "both hooks")
    (record_path,) = records.glob("*-done.json")
    record = json.loads(record_path.read_text(encoding="utf-8"))
    env = record["env"]
    assert set(env) == REQUIRED_ENV, "nothing inherited"
    assert env["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert env["SFWATCH_EVENT"] == "done"
    assert env["SFWATCH_OUTCOME"] == "done"
    assert env["SFWATCH_FILE"] == str(daemon.inbox / "talk.wav")
    assert env["SFWATCH_ORIGINAL"] == str(daemon.inbox / "done" / "talk.wav")
    assert env["SFWATCH_TRANSCRIPT"] == str(daemon.inbox / "talk.txt")
    assert env["SFWATCH_WATCH"] == str(daemon.inbox)
    assert env["SFWATCH_MODEL"] == "FunAudioLLM/SenseVoiceSmall"
    assert env["SFWATCH_TRACE_ID"].startswith("ti_")
    assert float(env["SFWATCH_AUDIO_SECONDS"]) > 0
    assert env["SFWATCH_ERROR_FILE"] == env["SFWATCH_REASON"] == ""
    assert record["stdin"] == FakeAPI.text_for(hashlib.sha256(data).hexdigest())
    assert record["stdin"] + "\n" == (daemon.inbox / "talk.txt").read_text(encoding="utf-8")
    assert record["cwd"] == "/"
    assert record["pgid"] == record["pid"], "a process group of its own"
    assert API_KEY not in json.dumps(record)
    finished = {e["job_id"]: e for e in _events(logs, "sfwatch.hook_finished")}
    done = finished[env["SFWATCH_JOB_ID"]]
    assert done["exit_status"] == 0
    assert done["stdout"] == "recorded done\n"
    (printed,) = (e for e in finished.values() if e["event_type"] == "failed")
    assert printed["stdout_bytes"] == 10_000_000
    assert printed["stdout"].startswith("y" * 4096 + "… [9995904 more bytes]")
    rows = _outbox(tmp_path)
    assert {(r.event, r.sink, r.status, r.attempts) for r in rows} == {
        ("done", "hook", "delivered", 1),
        ("failed", "hook", "delivered", 1),
    }


def test_a_failing_hook_is_retried_then_given_up_and_recorded(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """Exit status 3 each time: run max_attempts times with backoff, then gave_up."""
    count = tmp_path / "count"
    failing = ["sh", "-c", 'echo run >> "$1"; echo oops >&2; exit 3', "sh", str(count)]
    config = write_config(
        tmp_path, fake_api.url, extra={"hooks": {"on_done": failing, "max_attempts": 3}}
    )
    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        (daemon.inbox / "a.wav").write_bytes(wav_bytes(1500))
        wait_until(lambda: _events(logs, "sfwatch.delivery_gave_up"), 20, "given up")
    assert count.read_text().splitlines() == ["run"] * 3
    failed = _events(logs, "sfwatch.hook_failed")
    assert [e["exit_status"] for e in failed] == [3, 3, 3]
    assert [e["attempt"] for e in failed] == [1, 2, 3]
    assert all(e["stderr"] == "oops\n" for e in failed)
    assert [e["retry_in"] is None for e in failed] == [False, False, True]
    (row,) = _outbox(tmp_path)
    assert (row.status, row.attempts, row.last_error) == ("gave_up", 3, "exit status 3")
    assert (daemon.inbox / "done" / "a.wav").exists(), "the file itself is done"


def test_a_hook_past_its_timeout_is_killed_with_its_children(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """A hook that hangs: its whole process group is killed at the timeout, and logged."""
    pids = tmp_path / "pids"
    hanging = _script(tmp_path, "hang.py", HANGER)
    hooks = {"on_done": [*hanging, str(pids)], "timeout_seconds": 1, "max_attempts": 1}
    config = write_config(tmp_path, fake_api.url, extra={"hooks": hooks})
    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        (daemon.inbox / "a.wav").write_bytes(wav_bytes(1500))
        wait_until(lambda: _events(logs, "sfwatch.delivery_gave_up"), 20, "the timeout")
    (failed,) = _events(logs, "sfwatch.hook_failed")
    assert failed["timed_out"] is True
    assert "timed out" in failed["error"]
    assert 1000 <= failed["duration_ms"] < 5000
    hook, child = map(int, pids.read_text().split())
    wait_until(lambda: not _alive(hook) and not _alive(child), 5, "the hook and its child gone")


# -- webhooks -----------------------------------------------------------------------------------


def test_webhooks_are_signed_retried_and_in_order_per_file(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """500, 500, then 200: every event accepted once, signed, in order per file; pause and
    resume reach the receiver; no body or header carries the key."""
    (tmp_path / "secret").write_text(f"whsec_{SECRET}\n")
    with receiver(base64.b64decode(SECRET), [500, 500]) as hooks:
        config = write_config(
            tmp_path,
            fake_api.url,
            extra={"webhooks": [{"url": hooks.url, "secret_file": "secret"}]},
        )
        with running_daemon(config, **FAST) as daemon:
            inbox = daemon.inbox
            (inbox / "a.wav").write_bytes(wav_bytes(1500))
            wait_until((inbox / "done" / "a.wav").exists, 15)
            (inbox / "a.wav").write_bytes(wav_bytes(1500))  # the same name, new content
            wait_until((inbox / "done" / "a (1).wav").exists, 15)
            # A 400 that echoes the key: the file fails, the key reaches nobody.
            fake_api.script(echo_authorization(400))
            (inbox / "bad.wav").write_bytes(wav_bytes(1500))
            wait_until(lambda: files_under(inbox / "failed"), 15)
            fake_api.set_default(R401)
            fake_api.info_reply = R401
            (inbox / "c.wav").write_bytes(wav_bytes(1500))
            wait_until(lambda: any(r.json["type"] == "paused" for r in hooks.accepted()), 20)
            fake_api.set_default(None)
            fake_api.info_reply = None
            wait_until((inbox / "done" / "c.wav").exists, 20)
            wait_until(lambda: len(hooks.accepted()) == 6, 20, "six events accepted")
    accepted = hooks.accepted()
    assert len(hooks.requests) == 8, "two 500s, each retried"
    assert all(r.signed for r in hooks.requests)
    ids = [r.headers["webhook-id"] for r in accepted]
    assert len(set(ids)) == 6
    assert {r.headers["webhook-id"] for r in hooks.requests} == set(ids), "a retry keeps its id"
    by_type = [r.json["type"] for r in accepted]
    assert sorted(by_type) == ["done", "done", "done", "failed", "paused", "resumed"]
    assert by_type.index("paused") < by_type.index("resumed")
    data = [r.json["data"] for r in accepted]
    same_file = [d for d in data if d.get("file") == str(inbox / "a.wav")]
    assert [d["moved_to"] for d in same_file] == [
        str(inbox / "done" / "a.wav"),
        str(inbox / "done" / "a (1).wav"),
    ]
    done = same_file[0]
    assert done["text"] + "\n" == (inbox / "a.txt").read_text(encoding="utf-8")
    assert done["text_truncated"] is False
    assert {"job_id", "outcome", "attempts", "duration_ms", "trace_id", "transcript"} <= set(done)
    (failed,) = (r.json["data"] for r in accepted if r.json["type"] == "failed")
    assert failed["reason"] == "api_rejected"
    assert failed["http_status"] == 400
    assert failed["error_file"].endswith("bad.wav.error.json")
    paused = next(r.json["data"] for r in accepted if r.json["type"] == "paused")
    assert (paused["reason"], paused["http_status"]) == ("unauthorized", 401)
    for request in hooks.requests:
        assert API_KEY.encode() not in request.body
        assert API_KEY not in json.dumps(request.headers)
        assert "authorization" not in request.headers
    assert {r.status for r in _outbox(tmp_path)} == {"delivered"}


# -- crash between the finish and the deliveries ------------------------------------------------


@pytest.mark.slow
def test_deliveries_after_a_sigkill_between_finish_and_delivery(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """SIGKILL while the hook runs and the receiver sits on the POST: after the restart
    both are delivered (the same webhook-id), and the file is not uploaded again."""
    marks = tmp_path / "marks"
    marks.mkdir()
    blocker = _script(tmp_path, "block.py", BLOCKER)
    with receiver(stall=True) as hooks:
        config = write_config(
            tmp_path,
            fake_api.url,
            extra={
                "hooks": {"on_done": [*blocker, str(marks)]},
                "webhooks": [{"url": hooks.url, "events": ["done"], "timeout_seconds": 60}],
            },
        )
        data = wav_bytes(2000)
        try:
            with daemon_process(config) as first:
                (tmp_path / "inbox" / "a.wav").write_bytes(data)
                wait_until((marks / "started").exists, 20, "the hook running")
                wait_until(hooks.stalled.is_set, 20, "the POST waiting")
                first.wait_event("sfwatch.job_finished")
                first.kill()  # SIGKILL
            # The hook runs in a session of its own: it outlived the daemon. End it.
            os.killpg(int((marks / "started").read_text()), signal.SIGKILL)
            hooks.release.set()
            with daemon_process(config) as second:
                wait_until(lambda: list(marks.glob("ran-*")), 20, "the hook run again")
                wait_until(hooks.accepted, 20, "the POST again")
                wait_until(lambda: {r.status for r in _outbox(tmp_path)} == {"delivered"}, 10)
                second.signal()
                assert second.wait() == 0
        finally:
            with contextlib.suppress(OSError, ValueError):
                os.killpg(int((marks / "started").read_text()), signal.SIGKILL)
    (ran,) = marks.glob("ran-*")
    assert ran.read_text(encoding="utf-8") == FakeAPI.text_for(hashlib.sha256(data).hexdigest())
    stalled, accepted = hooks.requests
    assert stalled.headers["webhook-id"] == accepted.headers["webhook-id"]
    assert accepted.json["data"]["moved_to"] == str(tmp_path / "inbox" / "done" / "a.wav")
    assert len(fake_api.uploads) == 1


# -- notifications through Apprise -----------------------------------------------------------


def test_apprise_gathers_a_burst_of_failures_into_one_message(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """Twelve files failing together: one json:// message naming them, without the key."""
    with receiver() as sink:
        url = sink.url.replace("http://", "json://")
        notify = {"urls": [url], "gather_seconds": 2, "min_interval_seconds": 30}
        config = write_config(tmp_path, fake_api.url, extra={"notify": notify})
        with running_daemon(config, **FAST) as daemon:
            for index in range(12):
                (daemon.inbox / f"empty{index:02}.wav").write_bytes(b"")
            wait_until(lambda: len(files_under(daemon.inbox / "failed")) == 24, 20)
            wait_until(lambda: sink.requests, 20, "a message")
            wait_until(lambda: {r.status for r in _outbox(tmp_path)} == {"delivered"}, 10)
    (message,) = sink.requests
    body = message.json
    assert body["type"] == "failure"
    assert body["title"].endswith(": 12 files failed")
    assert "12 files failed (empty: 12)" in body["message"]
    assert "… and 2 more" in body["message"]
    assert API_KEY not in json.dumps(body)


def test_500_failures_and_a_pause_are_one_summary(tmp_path: Path) -> None:
    """500 failed events and a pause in the outbox: Apprise sends one summary for all."""
    with receiver() as sink:
        notify = NotifyConfig(urls=(sink.url.replace("http://", "json://"),), gather_seconds=0.2)
        watch = WatchConfig(path=tmp_path / "inbox")
        config = Config(
            api=parse_config({"watch": [{"path": "inbox"}]}, tmp_path).api,
            state_dir=tmp_path / "state",
            log=parse_config({"watch": [{"path": "inbox"}]}, tmp_path).log,
            watch=(watch,),
            hooks=HooksConfig(),
            notify=notify,
        )
        ledger = Ledger.in_state_dir(config.state_dir)
        outbox = Outbox(config, ledger)
        routes = outbox.routes
        for index in range(500):
            fields = {"job_id": f"j{index}", "file": f"/in/{index}.wav", "reason": "not_audio"}
            ledger.outbox_add(routes.for_job(watch, "failed", fields))
        outbox.account_event("paused", {"reason": "unauthorized", "http_status": 401})
        outbox.start()
        try:
            wait_until(lambda: ledger.outbox_counts() == {"delivered": 501}, 20)
            wait_until(outbox.idle, 5, "the outbox idle")
        finally:
            outbox.stop(1.0)
            ledger.close()
    (message,) = sink.requests
    body = message.json
    assert body["title"].endswith(": 500 files failed, uploads paused")
    assert "500 files failed (not_audio: 500)" in body["message"]
    assert "… and 490 more" in body["message"]
    assert "Uploads paused: unauthorized (HTTP 401)" in body["message"]


def test_check_names_an_unreadable_secret_and_an_unknown_apprise_url(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """`sfwatch check` exits 2 naming the key; an Apprise URL's token is never shown."""
    hook = {"url": "http://127.0.0.1:9/x", "secret_file": "missing"}
    config = write_config(tmp_path, fake_api.url, extra={"webhooks": [hook]})
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 2
    assert "webhooks[0].secret_file: cannot read" in result.stderr
    notify = {"urls": ["nosuchservice://tok3n-s3cret@example.org/x"]}
    config = write_config(tmp_path, fake_api.url, extra={"notify": notify})
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 2
    assert "notify.urls[0]: Apprise does not understand this nosuchservice:// URL" in result.stderr
    assert "tok3n" not in result.stdout + result.stderr


def test_a_webhook_post_is_bounded_as_a_whole_and_keeps_its_connection() -> None:
    """A receiver trickling its headers is cut at the timeout; the poster then goes on,
    and POSTs to a good receiver share one kept-alive connection."""
    trickler = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = trickler.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
                if stop.wait(0.05):
                    return
                with contextlib.suppress(OSError):
                    conn.sendall(bytes([byte]))

    threading.Thread(target=trickle, daemon=True).start()
    poster = WebhookPoster()
    try:
        began = time.monotonic()
        with pytest.raises(TransientError) as info:
            poster.post(f"http://127.0.0.1:{trickler.getsockname()[1]}/", b"{}", {}, 1.0)
        assert info.value.reason == "timeout"
        assert time.monotonic() - began < 3
        with receiver() as sink:
            for _ in range(3):
                assert poster.post(sink.url, b"{}", {"X-Test": "1"}, 5.0).status == 200
            assert len({r.headers["x-port"] for r in sink.requests}) == 1
    finally:
        stop.set()
        trickler.close()
        poster.close()
