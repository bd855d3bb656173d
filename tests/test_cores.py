"""One core while busy (sfwatch/cores.py): real threads, real affinity calls, the
kernel's answer read back from ``sched_getaffinity`` of each thread."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from sfwatch import audio, cores
from sfwatch.cores import CorePin
from sfwatch.hooks import run_hook
from sfwatch.pressure import Pressure
from tests.audiogen import wav_bytes
from tests.conftest import running_daemon, wait_until, write_config
from tests.fakeapi import FakeAPI

ALLOWED = set(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs two CPUs to pin to one")


def affinities() -> dict[int, set[int]]:
    """Every thread of this process → the CPUs the kernel lets it run on."""
    found = {}
    for tid in cores.threads():
        try:
            found[tid] = set(os.sched_getaffinity(tid))
        except ProcessLookupError:
            continue  # ended meanwhile
    return found


def all_on(cpus: set[int]) -> bool:
    """Every thread of this process may run on exactly ``cpus``."""
    return all(found == cpus for found in affinities().values())


@contextmanager
def idle_thread() -> Iterator[threading.Thread]:
    """A thread that exists for the block (pinning must reach threads it did not start)."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join()


class _Log:
    """A structlog-like logger that keeps its events (CorePin logs via ``info``/``warning``)."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def info(self, event: str, **_fields: object) -> None:
        self.events.append(event)

    warning = info


class Driver:
    """A CorePin on a clock and a CPU counter that the test moves."""

    def __init__(self) -> None:
        self.now, self.spent, self.log = 1000.0, 10.0, _Log()
        pressure = Pressure(clock=lambda: self.now, cpu=lambda: self.spent)
        self.pin = CorePin(
            self.log, pressure=pressure, clock=lambda: self.now, release_after=5, repick_after=60
        )

    def after(self, seconds: float, cores: float, *, backlog: bool = True) -> int | None:
        """``seconds`` pass, the daemon using ``cores``; then the loop turns. The pin's CPU."""
        self.now += seconds
        self.spent += seconds * cores
        self.pin.turn(backlog=backlog)
        return self.pin.cpu

    def pinned(self) -> int:
        """One busy second with files waiting: the CPU pinned to."""
        cpu = self.after(1.0, 1.0)
        assert cpu is not None
        return cpu


@pytest.fixture
def driver() -> Iterator[Driver]:
    """A Driver; whatever a test does, every thread is let go after."""
    driven = Driver()
    try:
        yield driven
    finally:
        driven.pin.release()
        for tid in cores.threads():
            cores._set_affinity(tid, ALLOWED)


def test_busy_backlog_pins_every_thread_to_one_cpu_and_quiet_releases_it(driver: Driver) -> None:
    """A busy window with files waiting pins all threads (also ones started before) to
    one allowed CPU; five quiet seconds give every thread all the CPUs back."""
    with idle_thread():
        assert driver.after(0.0, 0.0) is None, "no window judged yet"
        cpu = driver.after(1.0, 1.2)
        assert cpu in ALLOWED
        assert all_on({cpu})
        with idle_thread():  # a thread started while pinned inherits the pin
            assert all_on({cpu})
        for _ in range(4):  # the backlog ends; its last files still keep a core busy
            assert driver.after(1.0, 1.0, backlog=False) == cpu, "not yet: under 5 s"
        assert driver.after(1.0, 1.0, backlog=False) is None
        assert all_on(ALLOWED)
    assert driver.log.events == ["sfwatch.cpu_pinned", "sfwatch.cpu_released"]


def test_an_idle_daemon_or_one_waiting_on_the_api_is_not_pinned(driver: Driver) -> None:
    """Busy CPU without waiting files, or waiting files without busy CPU: no pin."""
    assert driver.after(1.0, 1.5, backlog=False) is None
    assert driver.after(1.0, 0.2) is None
    assert all_on(ALLOWED)


def test_a_long_backlog_is_let_go_every_minute_so_the_kernel_may_move_it(
    driver: Driver,
) -> None:
    """After REPICK_AFTER the pin is released although files still wait; the next busy
    window, measured unpinned, pins again."""
    cpu = driver.pinned()
    for _ in range(59):
        assert driver.after(1.0, 1.0) == cpu
    assert driver.after(1.0, 1.0) is None
    assert all_on(ALLOWED)
    assert driver.after(0.5, 1.0) is None, "a whole window on every CPU first"
    assert driver.after(0.5, 1.0) is not None


def test_a_pin_that_gets_little_cpu_is_released(driver: Driver) -> None:
    """Pinned, a window of less than KEEP_CORES (the API slowed) releases the pin
    although files wait; a fresh window decides again."""
    cpu = driver.pinned()
    assert driver.after(1.0, 0.45) == cpu, "0.45 of a core: what a pinned busy daemon may use"
    assert driver.after(1.0, 0.2) is None
    assert all_on(ALLOWED)
    assert driver.after(0.5, 1.0) is None, "half a window after the release: not judged yet"
    assert driver.after(0.5, 1.0) is not None


def test_wide_work_keeps_every_cpu_while_the_rest_is_pinned(driver: Driver) -> None:
    """A thread inside wide() (PyAV's work) keeps all CPUs, whether the pin came before
    or during the block, and takes the pin when it leaves."""
    me = threading.get_native_id()
    cpu = driver.pinned()
    with cores.wide():
        assert set(os.sched_getaffinity(0)) == ALLOWED
        with cores.wide():  # nested: still wide
            pass
        assert set(os.sched_getaffinity(0)) == ALLOWED
    assert set(os.sched_getaffinity(0)) == {cpu}
    driver.pin.release()
    with cores.wide():
        cpu = driver.pinned()  # pinned while this thread is wide
        others = {tid: cpus for tid, cpus in affinities().items() if tid != me}
        assert set(os.sched_getaffinity(0)) == ALLOWED
        assert all(cpus == {cpu} for cpus in others.values())
    assert set(os.sched_getaffinity(0)) == {cpu}


def test_a_hook_started_while_pinned_may_use_every_cpu(driver: Driver) -> None:
    """A hook inherits no pin: a user's script keeps every CPU the daemon was allowed."""
    cpu = driver.pinned()
    script = "grep Cpus_allowed_list: /proc/self/status"
    result = run_hook(["/bin/sh", "-c", script], {}, b"", 10)
    assert result.returncode == 0, result
    assert cpu_list(result.stdout.decode().split()[-1]) == ALLOWED
    assert set(os.sched_getaffinity(0)) == {cpu}, "the thread that started it is not"


def cpu_list(text: str) -> set[int]:
    """``0-1,3`` → {0, 1, 3}."""
    found: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        found.update(range(int(low), int(high or low) + 1))
    return found


def test_a_pin_the_kernel_refuses_turns_pinning_off_and_changes_nothing(driver: Driver) -> None:
    """A CPU set the kernel refuses (as after a cpuset change): one warning, pinning off
    for good, every thread as it was."""
    driver.pin.allowed = {4095}  # no such CPU: sched_setaffinity answers EINVAL
    assert driver.after(1.0, 1.0) is None
    assert not driver.pin.enabled
    assert all_on(ALLOWED)
    assert driver.log.events == ["sfwatch.cpu_pin_off"]
    driver.after(1.0, 1.0)
    assert driver.log.events == ["sfwatch.cpu_pin_off"], "logged once"


EPERM_SCRIPT = """
import json, os, threading
from structlog import get_logger
from structlog.testing import capture_logs
from sfwatch.cores import CorePin
from sfwatch.pressure import Pressure
now, spent = [0.0], [0.0]
stop = threading.Event()
threading.Thread(target=stop.wait, daemon=True).start()
with capture_logs() as logs:
    pressure = Pressure(clock=lambda: now[0], cpu=lambda: spent[0])
    pin = CorePin(get_logger(), pressure=pressure, clock=lambda: now[0])
    for _ in range(3):
        now[0] += 1.0
        spent[0] += 1.0
        pin.turn(backlog=True)
stop.set()
print(json.dumps({"events": [e["event"] for e in logs], "enabled": pin.enabled,
                  "cpu": pin.cpu, "cpus": sorted(os.sched_getaffinity(0))}))
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_seccomp_filter_refusing_the_call_is_one_warning_and_no_pin() -> None:
    """sched_setaffinity answering EPERM (a unit's SystemCallFilter= without it),
    injected by strace: one warning, pinning off, the process as it was."""
    strace = ["strace", "-f", "-qq", "-o", os.devnull, "-e", "trace=sched_setaffinity"]
    inject = ["-e", "inject=sched_setaffinity:error=EPERM"]
    run = subprocess.run(
        [*strace, *inject, sys.executable, "-c", EPERM_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["events"] == ["sfwatch.cpu_pin_off"]
    assert result == {**result, "enabled": False, "cpu": None, "cpus": sorted(ALLOWED)}


def test_wide_never_raises_when_the_pinned_cpu_is_refused(driver: Driver) -> None:
    """The pinned CPU left our cpuset (``systemctl set-property AllowedCPUs=``): a
    wide() block's work still runs, and its thread is not left counted as wide."""
    cpu = driver.pinned()
    with cores._lock:
        cores._pin = {4095}  # what the kernel now refuses, as after such a change
    try:
        ran = False
        with cores.wide():
            ran = True
        assert ran
        assert threading.get_native_id() not in cores._wide
    finally:
        with cores._lock:
            cores._pin = {cpu}


def test_a_second_pin_in_one_process_stands_aside(driver: Driver) -> None:
    """Two CorePins in one process (two daemons in a test): the one pinned owns the
    threads; the other neither pins nor releases them, nor takes one CPU for all."""
    cpu = driver.pinned()
    other = Driver()
    assert other.pin.allowed == ALLOWED
    assert other.after(1.0, 1.0) is None
    assert all_on({cpu})
    other.pin.release()
    assert all_on({cpu})


def test_current_cpu_is_one_this_thread_may_run_on() -> None:
    """/proc/thread-self/stat names a CPU of our affinity (pinned: that very CPU)."""
    assert cores.current_cpu() in ALLOWED
    cpu = max(ALLOWED)
    os.sched_setaffinity(0, {cpu})
    try:
        assert cores.current_cpu() == cpu
    finally:
        os.sched_setaffinity(0, ALLOWED)


def pinned_but_wide(cpu: int) -> bool:
    """Every thread runs on ``cpu`` alone, except those in a ``wide()`` block now."""
    with cores._lock:  # no pin pass and no wide() block changes anything meanwhile
        wide = set(cores._wide)
        return all(cpus == {cpu} for tid, cpus in affinities().items() if tid not in wide)


def held_until_stop(core_pin: CorePin) -> None:
    """Make ``core_pin`` pin on any backlog and keep the pin until the daemon stops."""
    core_pin.pressure.busy_cores = 0.0  # any CPU counts: a backlog is enough
    core_pin.keep_cores = 0.0
    core_pin.release_after = 600.0


def drop_wavs(inbox: Path, prefix: str, count: int, seed: int = 0) -> None:
    """Write ``count`` small WAVs into ``inbox``."""
    for index in range(count):
        (inbox / f"{prefix}{index}.wav").write_bytes(wav_bytes(4000, seed=seed + index))


def pin_of(core_pin: CorePin) -> int:
    """Wait for ``core_pin`` to pin; its CPU."""
    wait_until(lambda: core_pin.cpu is not None, 15, "the pin")
    assert core_pin.cpu is not None
    return core_pin.cpu


def test_a_daemon_pushing_a_backlog_runs_on_one_cpu_then_on_all(
    tmp_path: Path, fake_api: FakeAPI
) -> None:
    """A real daemon (C=1, 0.2 s uploads, 8 files): its threads are pinned while files
    wait, every file is done once, and its stop gives all CPUs back."""
    fake_api.latency = 0.2
    config = write_config(tmp_path, fake_api.url, api={"concurrency": 1})
    with capture_logs() as logs, running_daemon(config, backoff_base=0.05) as running:
        core_pin = running.daemon.cores
        held_until_stop(core_pin)  # only the stop releases it
        inbox = tmp_path / "inbox"
        drop_wavs(inbox, "", 8)
        pinned = pin_of(core_pin)
        assert pinned_but_wide(pinned)
        wait_until(lambda: len(list((inbox / "done").glob("*.wav"))) == 8, 30, "every file")
        assert core_pin.cpu == pinned
    assert core_pin.cpu is None
    assert all_on(ALLOWED)
    assert len(fake_api.uploads) == 8
    events = [e["event"] for e in logs if e["event"].startswith("sfwatch.cpu_")]
    assert events == ["sfwatch.cpu_pinned", "sfwatch.cpu_released"]


def test_a_pinned_daemon_transcodes_on_every_cpu(
    tmp_path: Path, fake_api: FakeAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files transcoded while the daemon is pinned (``prepare.transcode: always``): PyAV's
    work runs with every CPU, and its thread takes the pin back after."""
    during: list[tuple[int | None, set[int]]] = []  # (the pin, this thread's CPUs)
    real_transcode = audio.transcode

    def watched_transcode(*args: Any) -> list[Path]:
        during.append((running.daemon.cores.cpu, set(os.sched_getaffinity(0))))
        return real_transcode(*args)

    monkeypatch.setattr(audio, "transcode", watched_transcode)
    fake_api.latency = 0.2
    config = write_config(
        tmp_path, fake_api.url, api={"concurrency": 1}, extra={"prepare": {"transcode": "always"}}
    )
    with running_daemon(config, backoff_base=0.05) as running:
        core_pin = running.daemon.cores
        held_until_stop(core_pin)
        inbox = tmp_path / "inbox"
        drop_wavs(inbox, "early", 4)
        pinned = pin_of(core_pin)
        drop_wavs(inbox, "late", 4, seed=10)  # prepared while the pin holds
        wait_until(lambda: len(list((inbox / "done").glob("*.wav"))) == 8, 30, "every file")
        assert core_pin.cpu == pinned
        assert pinned_but_wide(pinned), "the threads that transcoded are pinned again"
    while_pinned = [cpus for pin, cpus in during if pin is not None]
    assert len(while_pinned) >= 4
    assert all(cpus == ALLOWED for cpus in while_pinned)


def test_worker_k_of_several_pins_to_the_kth_cpu(driver: Driver) -> None:
    """A worker process's pin (``prefer``) is the K-th allowed CPU, not the one it runs on."""
    ordered = sorted(ALLOWED)
    for index in (0, 1, len(ordered)):  # (an index past the CPUs wraps round)
        pressure = Pressure(clock=lambda: driver.now, cpu=lambda: driver.spent)
        driver.pin = CorePin(driver.log, pressure=pressure, clock=lambda: driver.now, prefer=index)
        assert driver.pinned() == ordered[index % len(ordered)]
        assert all_on({ordered[index % len(ordered)]})
        driver.pin.release()
        assert all_on(ALLOWED)
