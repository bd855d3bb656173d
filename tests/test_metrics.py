"""Metrics and health over HTTP (issue 11, part 4): real daemons, real sockets on loopback.

Daemons run against the fake API, in a thread of the test process (with
``backoff_base=0.05``) or as ``sfwatch run`` subprocesses; every request is a
real HTTP request to the listener, every scrape is parsed with prometheus-client's
own parser.
"""

from __future__ import annotations

import http.client
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from sfwatch import __version__, endpoint, intake
from sfwatch.config import config_warnings, parse_config
from sfwatch.endpoint import Endpoint, Response
from sfwatch.errors import ConfigError
from sfwatch.events import Events
from sfwatch.metrics import FAILED_REASONS, OUTCOMES, PAUSE_REASONS, STATUS_CLASSES, Metrics
from tests.audiogen import wav_bytes
from tests.conftest import (
    API_KEY,
    REPO,
    Running,
    daemon_process,
    run_cli,
    running_daemon,
    wait_until,
    write_config,
)
from tests.fakeapi import R401, FakeAPI, Reply
from tests.hostile import echo_authorization

FAST = {"backoff_base": 0.05}
LOOPBACK_ANY_PORT = {"metrics": {"listen": "127.0.0.1:0"}}

Sample = tuple[str, frozenset[tuple[str, str]]]


def request(
    port: int, path: str, method: str = "GET", host: str = "127.0.0.1"
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request to the listener: (status, headers, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def scrape(port: int) -> dict[Sample, float]:
    """GET /metrics, parsed: {(sample name, labels): value}."""
    status, headers, body = request(port, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: Mapping[Sample, float], name: str, **labels: str) -> float:
    """One sample's value (KeyError if the series does not exist)."""
    return samples[(name, frozenset(labels.items()))]


def _events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


def port_of(daemon: Running) -> int:
    """The port the daemon's listener got (``listen: 127.0.0.1:0``)."""
    listener = wait_until(lambda: daemon.daemon.endpoint, 10, "the listener")
    return int(listener.port)


def probe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    """GET /healthz or /readyz: (status, JSON body)."""
    status, headers, body = request(port, path)
    assert headers["Content-Type"] == "application/json"
    return status, yaml.safe_load(body)


def listening_ports(pid: int) -> list[int]:
    """TCP ports process ``pid`` listens on, from /proc (its socket inodes)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(ports)


def free_port() -> int:
    """A TCP port free on every address right now."""
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


# --- /metrics ---------------------------------------------------------------------


def test_counters_equal_what_happened(tmp_path: Path, fake_api: FakeAPI) -> None:
    """After done, failed (400) and paused (401, then recovered) files, the counters match."""
    config = write_config(tmp_path, fake_api.url, extra=LOOPBACK_ANY_PORT)
    inbox = tmp_path / "inbox"
    bodies: list[bytes] = []
    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        port = port_of(daemon)
        wait_until(lambda: probe(port, "/readyz")[0] == 200, 10, "ready")
        before = scrape(port)
        assert value(before, "sfwatch_files_total", outcome="done", reason="") == 0
        assert value(before, "sfwatch_uploads_total", status_class="2xx") == 0
        assert value(before, "sfwatch_last_success_timestamp_seconds") == 0

        (inbox / "a.wav").write_bytes(wav_bytes(3000))
        wait_until((inbox / "done" / "a.wav").exists, 10, "a done")
        fake_api.script(echo_authorization(400))  # rejected, and the answer holds the key
        (inbox / "b.wav").write_bytes(wav_bytes(5000))
        wait_until((inbox / "failed" / "b.wav").exists, 10, "b failed")
        fake_api.info_reply = R401  # the key stops working, and the probe says so
        fake_api.script(R401)
        (inbox / "c.wav").write_bytes(wav_bytes(7000))
        paused = wait_until(
            lambda: (
                (s := scrape(port)) and value(s, "sfwatch_paused", reason="unauthorized") == 1 and s
            ),
            10,
            "paused gauge",
        )
        assert sum(v for (n, _), v in paused.items() if n == "sfwatch_paused") == 1
        assert value(paused, "sfwatch_queue_files") == 1  # c waits for the account
        fake_api.info_reply = None  # fixed: the next probe resumes uploads
        wait_until((inbox / "done" / "c.wav").exists, 20, "c done after the pause")
        after = wait_until(
            lambda: (
                (s := scrape(port))
                and value(s, "sfwatch_paused", reason="unauthorized") == 0
                and value(s, "sfwatch_queue_files") == 0
                and s
            ),
            10,
            "gauges settle",
        )
        paths = ("/metrics", "/healthz", "/readyz", "/nothing", "/metrics?x=1")
        bodies.extend(request(port, path)[2] for path in paths)
    uploads = fake_api.uploads
    assert [u.status for u in uploads] == [200, 400, 401, 200]
    finished = _events(logs, "sfwatch.job_finished")
    assert sorted(e["outcome"] for e in finished) == ["done", "done", "failed"]

    assert value(after, "sfwatch_files_total", outcome="done", reason="") == 2
    assert value(after, "sfwatch_files_total", outcome="failed", reason="api_rejected") == 1
    files = {labels: v for (n, labels), v in after.items() if n == "sfwatch_files_total"}
    assert sum(files.values()) == 3
    assert value(after, "sfwatch_uploads_total", status_class="2xx") == 2
    assert value(after, "sfwatch_uploads_total", status_class="4xx") == 2
    assert value(after, "sfwatch_uploads_total", status_class="5xx") == 0
    assert value(after, "sfwatch_uploads_total", status_class="error") == 0
    assert value(after, "sfwatch_upload_seconds_count") == 4
    assert value(after, "sfwatch_upload_seconds_bucket", le="+Inf") == 4
    assert 0 < value(after, "sfwatch_upload_seconds_sum") < 20
    assert value(after, "sfwatch_bytes_uploaded_total") == sum(u.size for u in uploads)
    audio = sum(e["audio_seconds"] for e in finished if e["outcome"] == "done")
    assert value(after, "sfwatch_audio_seconds_total") == pytest.approx(audio)
    assert audio == pytest.approx((3000 + 7000 - 2 * 44) / 2 / 8000, abs=0.01)
    assert time.time() - 60 < value(after, "sfwatch_last_success_timestamp_seconds") <= time.time()
    assert value(after, "sfwatch_in_flight") == 0
    assert value(after, "sfwatch_uploading") == 0
    assert value(after, "sfwatch_concurrency_limit") == 4
    assert value(after, "sfwatch_build_info", version=__version__) == 1
    # No label names a file: every label value is from a fixed set.
    labels = {v for (_, ls) in after for (k, v) in ls if k != "le"}
    fixed = {"", __version__, *OUTCOMES, *FAILED_REASONS, *STATUS_CLASSES, *PAUSE_REASONS}
    assert labels <= fixed, labels - fixed
    for body in bodies:
        assert API_KEY.encode() not in body
    assert API_KEY not in str(finished)  # the 400 echoed it; the metrics never took text


def test_openmetrics_on_request(tmp_path: Path, fake_api: FakeAPI) -> None:
    """A scraper asking for OpenMetrics gets it; HEAD gets the headers only."""
    config = write_config(tmp_path, fake_api.url, extra=LOOPBACK_ANY_PORT)
    with running_daemon(config, **FAST) as daemon:
        port = port_of(daemon)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/metrics", headers={"Accept": "application/openmetrics-text"})
        response = conn.getresponse()
        body = response.read().decode()
        conn.close()
        assert response.status == 200
        assert response.getheader("Content-Type", "").startswith("application/openmetrics-text")
        assert body.endswith("# EOF\n")
        assert "sfwatch_files_total" in body
        status, headers, head_body = request(port, "/healthz", method="HEAD")
        assert (status, head_body) == (200, b"")
        assert int(headers["Content-Length"]) > 0


# --- /healthz and /readyz ---------------------------------------------------------


def test_healthz_turns_503_when_an_observer_dies_and_200_after(
    tmp_path: Path, fake_api: FakeAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The inbox replaced by a file: its observer cannot restart, 503; the folder back: 200."""
    monkeypatch.setattr(intake, "WATCH_RETRY", 0.3)  # the next restart attempt comes soon
    config = write_config(tmp_path, fake_api.url, extra=LOOPBACK_ANY_PORT)
    inbox = tmp_path / "inbox"
    with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
        port = port_of(daemon)
        wait_until(lambda: probe(port, "/readyz")[0] == 200, 10, "ready")
        assert probe(port, "/healthz") == (200, {"status": "ok"})
        shutil.rmtree(inbox)
        inbox.write_text("not a folder any more")
        _, body = wait_until(
            lambda: (answer := probe(port, "/healthz"))[0] == 503 and answer, 10, "503"
        )
        assert body["status"] == "unhealthy"
        assert body["reason"] == "observer_down"
        assert body["detail"].startswith("watch[0]: ")
        assert str(tmp_path) not in body["detail"]
        assert not daemon.daemon.healthy(), "the same health as systemd's watchdog"
        assert probe(port, "/readyz")[1]["reason"] == "observer_down"
        inbox.unlink()
        inbox.mkdir()
        wait_until(lambda: probe(port, "/healthz")[0] == 200, 10, "healthy again")
        assert daemon.daemon.healthy()
        (inbox / "after.wav").write_bytes(wav_bytes(2000))
        wait_until((inbox / "done" / "after.wav").exists, 10, "files flow again")
    assert _events(logs, "sfwatch.watch_restart_failed")


def test_healthz_notices_the_state_dir(tmp_path: Path, fake_api: FakeAPI) -> None:
    """state_dir moved away: 503 ``state_dir``; moved back: 200."""
    config = write_config(tmp_path, fake_api.url, extra=LOOPBACK_ANY_PORT)
    state = tmp_path / "state"
    with running_daemon(config, **FAST) as daemon:
        port = port_of(daemon)
        wait_until(lambda: probe(port, "/healthz")[0] == 200, 10, "healthy")
        state.rename(tmp_path / "state-moved")
        _, body = wait_until(
            lambda: (answer := probe(port, "/healthz"))[0] == 503 and answer, 10, "503"
        )
        assert body["reason"] == "state_dir"
        (tmp_path / "state-moved").rename(state)
        wait_until(lambda: probe(port, "/healthz")[0] == 200, 10, "healthy again")


def test_readyz_says_stopping_while_uploads_finish(tmp_path: Path, fake_api: FakeAPI) -> None:
    """During a warm stop /readyz is 503 ``stopping`` and /healthz 200; then the port closes."""
    config = write_config(tmp_path, fake_api.url, extra=LOOPBACK_ANY_PORT)
    fake_api.script(Reply(delay=1.5))
    with running_daemon(config, **FAST) as daemon:
        port = port_of(daemon)
        wait_until(lambda: probe(port, "/readyz")[0] == 200, 10, "ready")
        (daemon.inbox / "slow.wav").write_bytes(wav_bytes(2000))
        wait_until(lambda: fake_api.in_flight == 1, 10, "an upload in flight")
        assert probe(port, "/readyz") == (200, {"status": "ready"})
        daemon.daemon.request_stop()
        status, body = probe(port, "/readyz")
        assert (status, body["status"], body["reason"]) == (503, "not_ready", "stopping")
        assert probe(port, "/healthz") == (200, {"status": "ok"})
        daemon.thread.join(15)
        assert not daemon.thread.is_alive()
    assert (daemon.inbox / "done" / "slow.wav").exists()
    with pytest.raises(ConnectionRefusedError):
        request(port, "/healthz")


# --- what the listener serves, and to whom ---------------------------------------------


def test_nothing_else_is_served(tmp_path: Path, fake_api: FakeAPI) -> None:
    """Unknown paths are 404, other methods 405, garbage 400, an oversized head 431."""
    config = write_config(tmp_path, fake_api.url, extra=LOOPBACK_ANY_PORT)
    with running_daemon(config, **FAST) as daemon:
        port = port_of(daemon)
        for path in ("/", "/metrics/", "/favicon.ico", "/healthz/x", "//metrics", "/debug"):
            status, _, body = request(port, path)
            assert (status, body) == (404, b"not found\n"), path
        status, headers, _ = request(port, "/metrics", method="POST")
        assert (status, headers["Allow"]) == (405, "GET, HEAD")
        assert raw(port, b"hello\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert raw(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000).startswith(b"HTTP/1.1 431 ")
        assert request(port, "/healthz")[0] == 200


def raw(port: int, data: bytes) -> bytes:
    """Send ``data`` as is; return everything the listener answers before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def test_slow_clients_do_not_stall_it(
    tmp_path: Path, fake_api: FakeAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle and trickling clients are cut at the deadline; scrapes and files go on meanwhile."""
    monkeypatch.setattr(endpoint, "DEADLINE", 1.0)
    config = write_config(tmp_path, fake_api.url, extra=LOOPBACK_ANY_PORT)
    with running_daemon(config, **FAST) as daemon:
        port = port_of(daemon)
        idle = [
            socket.create_connection(("127.0.0.1", port), timeout=10)
            for _ in range(2 * endpoint.WORKERS)
        ]
        trickler = socket.create_connection(("127.0.0.1", port), timeout=10)
        stop = threading.Event()

        def trickle() -> None:
            trickler.sendall(b"GET /metrics HTTP/1.1\r\n")
            while not stop.wait(0.2):
                try:
                    trickler.sendall(b"X")
                except OSError:
                    return

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        started = time.monotonic()
        (daemon.inbox / "a.wav").write_bytes(wav_bytes(2000))
        wait_until((daemon.inbox / "done" / "a.wav").exists, 10, "work goes on")
        assert daemon.daemon.healthy()
        for sock in [*idle, trickler]:
            assert cut(sock), "closed without an answer"
        cut_after = time.monotonic() - started
        assert cut_after < 6.0, cut_after  # each batch of WORKERS is cut after 1 s
        stop.set()
        thread.join(5)
        assert probe(port, "/healthz") == (200, {"status": "ok"})
        for sock in [*idle, trickler]:
            sock.close()


def cut(sock: socket.socket) -> bool:
    """The listener closed ``sock`` without answering (a RST if our bytes were left unread)."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def test_non_loopback_listen_warns(tmp_path: Path, fake_api: FakeAPI) -> None:
    """0.0.0.0 is served (reachable on 127.0.0.1) and warned about, by run and by check."""
    port = free_port()
    config = write_config(tmp_path, fake_api.url, extra={"metrics": {"listen": f"0.0.0.0:{port}"}})
    with daemon_process(config) as daemon:
        started = daemon.wait_event("sfwatch.metrics_started")
        assert started[0]["listen"] == f"0.0.0.0:{port}"
        warnings = daemon.wait_event("sfwatch.config_warning")
        assert warnings[0]["message"].startswith("metrics.listen: 0.0.0.0:")
        assert "not a loopback address" in warnings[0]["message"]
        assert warnings[0]["level"] == "warning"
        assert request(port, "/healthz")[0] == 200
        assert listening_ports(daemon.proc.pid) == [port]
    check = run_cli("check", "-c", str(config))
    assert check.returncode == 0
    assert "metrics.listen: 0.0.0.0:" in check.stderr


def test_listener_is_off_by_default(tmp_path: Path, fake_api: FakeAPI) -> None:
    """Without ``metrics``, no port is opened and nothing is counted."""
    config = write_config(tmp_path, fake_api.url)
    with daemon_process(config) as daemon:
        daemon.wait_event("sfwatch.daemon_started")
        (tmp_path / "inbox" / "a.wav").write_bytes(wav_bytes(2000))
        daemon.wait_event("sfwatch.job_finished")
        assert listening_ports(daemon.proc.pid) == []
        assert not daemon.events("sfwatch.metrics_started")
    with running_daemon(config, **FAST) as running:
        assert running.daemon.metrics is None
        assert running.daemon.endpoint is None


def test_a_port_in_use_is_logged_and_work_goes_on(tmp_path: Path, fake_api: FakeAPI) -> None:
    """A listen address already taken: one error line, and files are still transcribed."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        extra = {"metrics": {"listen": f"127.0.0.1:{port}"}}
        config = write_config(tmp_path, fake_api.url, extra=extra)
        with capture_logs() as logs, running_daemon(config, **FAST) as daemon:
            (daemon.inbox / "a.wav").write_bytes(wav_bytes(2000))
            wait_until((daemon.inbox / "done" / "a.wav").exists, 10, "work goes on")
            failed = _events(logs, "sfwatch.metrics_failed")
            assert len(failed) == 1
            assert failed[0]["listen"] == f"127.0.0.1:{port}"
            assert daemon.daemon.endpoint is None


def test_ipv6_loopback(tmp_path: Path) -> None:
    """An Endpoint on [::1] answers its routes and 404s the rest."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    listener = Endpoint("::1", 0, {"/healthz": lambda _h: Response(200, b"ok\n")})
    try:
        listener.start()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        assert request(listener.port, "/healthz", host="::1")[::2] == (200, b"ok\n")
        assert request(listener.port, "/metrics", host="::1")[0] == 404
    finally:
        listener.close()
    assert tmp_path.exists()


# --- the config key -----------------------------------------------------------------


def _metrics_config(tmp_path: Path, metrics: object) -> tuple[str, int] | None:
    data = {"watch": [{"path": "inbox"}], "state_dir": "state", "metrics": metrics}
    return parse_config(data, tmp_path, {"HOME": str(tmp_path)}).metrics.listen


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9790", ("127.0.0.1", 9790)),
        ("[::1]:9790", ("::1", 9790)),
        ("localhost:9790", ("127.0.0.1", 9790)),
        (" 0.0.0.0:0 ", ("0.0.0.0", 0)),
        ("[::]:65535", ("::", 65535)),
        (None, None),
    ],
)
def test_listen_values(tmp_path: Path, listen: str | None, expected: object) -> None:
    """``metrics.listen`` takes IPv4, bracketed IPv6 and localhost; null is off."""
    assert _metrics_config(tmp_path, {"listen": listen}) == expected


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({"listen": 9790}, "metrics.listen: must be HOST:PORT"),
        ({"listen": "127.0.0.1"}, "metrics.listen: must be HOST:PORT"),
        ({"listen": ":9790"}, "metrics.listen: must be HOST:PORT"),
        ({"listen": "::1:9790"}, "metrics.listen: an IPv6 address goes in brackets"),
        ({"listen": "[::1]9790"}, "metrics.listen: must be [IPv6]:PORT"),
        ({"listen": "[nope]:9790"}, "metrics.listen: 'nope' is not an IP address"),
        ({"listen": "metrics.example:9790"}, "metrics.listen: 'metrics.example' is not an IP"),
        ({"listen": "127.0.0.1:65536"}, "metrics.listen: the port must be a number from 0"),
        ({"listen": "127.0.0.1:http"}, "metrics.listen: the port must be a number from 0"),
        ({"listen": "127.0.0.1:-1"}, "metrics.listen: the port must be a number from 0"),
        ({"port": 9790}, "metrics.port: unknown key"),
        ("127.0.0.1:9790", "metrics: must be a mapping"),
    ],
)
def test_bad_listen_values_name_the_key(tmp_path: Path, metrics: object, message: str) -> None:
    """Every wrong ``metrics`` value is refused up front, naming its key path."""
    with pytest.raises(ConfigError) as caught:
        _metrics_config(tmp_path, metrics)
    assert str(caught.value).startswith(message), str(caught.value)


@pytest.mark.parametrize(
    ("listen", "warns"),
    [
        ("127.0.0.1:1", False),
        ("127.8.0.1:1", False),
        ("[::1]:1", False),
        ("localhost:1", False),
        ("0.0.0.0:1", True),
        ("[::]:1", True),
        ("192.168.1.5:1", True),
    ],
)
def test_only_loopback_is_quiet(tmp_path: Path, listen: str, warns: bool) -> None:
    """A listen address other than loopback is a config warning (check prints, run logs)."""
    data = {"watch": [{"path": "inbox"}], "state_dir": "state", "metrics": {"listen": listen}}
    config = parse_config(data, tmp_path, {"HOME": str(tmp_path)})
    found = [w for w in config_warnings(config) if w.startswith("metrics.listen:")]
    assert bool(found) is warns


# --- the README -------------------------------------------------------------------------


def test_readme_names_only_real_metrics() -> None:
    """The README's table, scrape config and alert rules name exactly the metrics served."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### Metrics and health", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.DOTALL)
    rules = [yaml.safe_load(block) for block in blocks]
    assert rules[-1]["groups"][0]["rules"][0]["for"] == "10m"
    status = {"settling": 0, "queued": 0, "waiting": 0, "in_flight": 0, "limit": 4}
    body, _ = Metrics(lambda: {**status, "paused": None}).render(None)
    families = {f.name for f in text_string_to_metric_families(body.decode())}
    served = {s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    table = set(re.findall(r"^\| `(sfwatch_\w+)` \|", section, re.MULTILINE))
    assert table == {f"{name}_total" if name in COUNTERS else name for name in families}
    for block in blocks:
        for name in re.findall(r"\bsfwatch_\w+", block):
            assert name in served, name


COUNTERS = {"sfwatch_files", "sfwatch_uploads", "sfwatch_audio_seconds", "sfwatch_bytes_uploaded"}


# --- events ---------------------------------------------------------------------------


def test_a_failing_listener_is_logged_and_others_still_hear() -> None:
    """A listener that raises is logged (``listener_failed``); the rest get the event."""
    events = Events()
    heard: list[tuple[str, dict[str, Any]]] = []

    def broken(_event: str, _fields: Mapping[str, Any]) -> None:
        raise RuntimeError("a bug")

    events.subscribe(broken)
    events.subscribe(lambda event, fields: heard.append((event, dict(fields))))
    with capture_logs() as logs:
        events.emit("sfwatch.job_finished", {"outcome": "done"})
    assert heard == [("sfwatch.job_finished", {"outcome": "done"})]
    assert [e["event"] for e in logs] == ["sfwatch.listener_failed"]


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    """Every listener a test started has stopped when it ends."""
    yield
    wait_until(
        lambda: not [t for t in threading.enumerate() if t.name.startswith("sfwatch-metrics")],
        10,
        "listener threads gone",
    )
