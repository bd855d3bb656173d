"""The daemon: wires the stages together and runs the work loop, signals and reload.

Threads: one watchdog observer per watched folder (they only note paths), one
scanner (start-up scan, then periodic rescans), ``api.concurrency`` upload
workers, one account prober, and the main thread, which runs the work loop::

    drain noted paths → settle → hand to a free upload slot
    → worker thread: claim → prepare → transcribe → finish → Outcome
    → main thread: the scheduler decides (done, retry, pause, fail)

All decisions are made on the main thread, so pacing state needs no locks. A
file waiting for a retry holds no upload slot, and a settled file stays in the
inbox until a slot is free (so sibling daemons can take it meanwhile).

Each part of that has one owner, so that this module is only the loop: the
folders' settings (``folders.Folders``), watch and settle (``intake.Intake``),
the next job and claiming (``ready.ReadyQueue``), the pools and the jobs in
flight (``slots.UploadSlots``), the account probe (``probe.AccountProbe``),
decisions (``scheduler.Scheduler``), start-up recovery (``reconcile.Reconciler``).

Shutdown follows rq's worker: the first SIGTERM/SIGINT is a warm stop (claim
nothing more, let uploads in flight finish within a grace period); a second one
is a cold stop (leave now; claimed files are resumed at the next start).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from sfwatch import __version__
from sfwatch.audio import warm_up
from sfwatch.config import TOP_KEYS, Config, Secret, load_config
from sfwatch.cores import CorePin, wide
from sfwatch.endpoint import Endpoint
from sfwatch.errors import ConfigError
from sfwatch.events import Events
from sfwatch.folders import Folders
from sfwatch.health import HEALTHY, Health, start_endpoint
from sfwatch.intake import Intake
from sfwatch.ledger import Ledger
from sfwatch.logs import Redactor, get_logger
from sfwatch.notify import Notifier
from sfwatch.outbox import Outbox
from sfwatch.pacing import Pacer
from sfwatch.pressure import Pressure
from sfwatch.probe import AccountProbe
from sfwatch.ready import Claimer, ClaimMiss, ReadyQueue
from sfwatch.reconcile import Reconciler
from sfwatch.recovery import DEFAULT_LEASE_SECONDS, LeaseKeeper
from sfwatch.runstatus import Publisher, format_status
from sfwatch.safefs import let_go
from sfwatch.scheduler import Scheduler
from sfwatch.slots import UploadSlots
from sfwatch.transcribe import Transcriber
from sfwatch.worker import Worker
from sfwatch.workers import (
    STOP_SIGNAL,
    Share,
    Workers,
    lock_state_dir,
    lock_worker,
    release_signals,
    run_id,
)

#: how long a warm stop waits for uploads in flight
DEFAULT_GRACE_SECONDS = 60.0
#: the longest the loop sleeps: it also checks the observers' health
TICK = 0.5
#: a loop that has not ticked for this long is frozen (it ticks every TICK seconds)
FROZEN_AFTER = 30.0
#: a worker of several counts as busy (and pins) at less: they share the CPUs with each other
WORKER_BUSY_CORES = 0.25
#: ... and keeps its pin down to this (pinned, it needs less CPU for the same work)
WORKER_KEEP_CORES = 0.1
#: how long a stop waits for hooks and webhooks in flight (the rest run at the next start)
OUTBOX_GRACE = 5.0


def instance_name(state_dir: Path) -> str:
    """A name unique per (host, state_dir) without configuration: ``host-1a2b3c4d``."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40] or "host"
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:8]
    return f"{host}-{digest}"


class Daemon:
    """``sfwatch run``: the long-running work loop, its signals, reload and status."""

    def __init__(
        self,
        config: Config,
        api_key: Secret,
        *,
        burst: bool = False,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
        lease_seconds: float | None = None,
        backoff_base: float = 1.0,
        share: Share | None = None,
        started: tuple[int, Workers] | None = None,
    ) -> None:
        #: which of the run's worker processes this is (workers.py); the face by default
        self.share = share or Share(0, config.workers)
        config = self.share.config(config)  # (its part of api.concurrency)
        #: the config the daemon started with (the folders' settings: ``folders``)
        self.config = config
        self.burst = burst
        self.grace_seconds = grace_seconds
        self.base = base = instance_name(config.state_dir)
        self.instance = self.share.instance(base)
        self.log = get_logger()
        # ``started``: the face's lock and workers, taken and started before the heavy
        # imports (cli.py), so that the workers are ready when the face is
        self._lock_fd, self.workers = started or (
            _hold_lock(config.state_dir, self.share),
            #: the face's workers 1 … N-1 (none for ``workers: 1``, or in a worker)
            Workers(config, self.share.count if self.share.face else 1, burst=burst, log=self.log),
        )
        self.folders = Folders(config.watch)
        self.intake = Intake(self.folders, owns=self.share.owns)
        self.notes = self.intake.notes
        self.settler = self.intake.settler
        self.watchers = self.intake.watchers
        self.ledger = Ledger.in_state_dir(config.state_dir)
        self.ledger.start_writer()
        # Hooks, webhooks, notifications (docs/design.md §13). The key is given only
        # to scrub it from what they send, which should never hold it anyway.
        #: files wait for a slot while the daemon is CPU-bound: deliveries wait too
        self.pressure = Pressure()
        # one CPU while busy (cores.py); each worker its own, when there are several
        self.cores = (
            CorePin(
                self.log,
                pressure=Pressure(busy_cores=WORKER_BUSY_CORES),
                keep_cores=WORKER_KEEP_CORES,
                prefer=self.share.index,
            )
            if self.share.count > 1
            else CorePin(self.log)
        )
        self.outbox = Outbox(
            config,
            self.ledger,
            instance=self.instance,
            backoff_base=backoff_base,
            scrub=_scrubber(api_key),
            yield_to=self.pressure.busy,
            # the other workers' finishes do not wake the face's dispatcher: it looks
            idle_wait=1.0 if self.share.count > 1 else None,
            run=run_id() if self.share.count > 1 else None,
        )
        self.transcriber = Transcriber(
            config.api.base_url,
            api_key,
            timeout_seconds=config.api.timeout_seconds,
        )
        self.pacer = Pacer(
            config.api.concurrency, config.api.requests_per_minute, backoff_base=backoff_base
        )
        self.leases = LeaseKeeper(
            self.instance,
            self.folders,
            lease_seconds=lease_seconds or DEFAULT_LEASE_SECONDS,
            workers=self.share.live(base),
        )
        #: what the pipeline tells besides the log (the metrics listen here)
        self.events = Events()
        self.worker = Worker(
            config,
            self.transcriber,
            self.ledger,
            self.instance,
            fence=self.leases.fence,
            folders=self.folders,
            events=self.events,
            routes=self.outbox.routes.for_job,
        )
        self.scheduler = Scheduler(
            config,
            self.pacer,
            self.ledger,
            self.worker,
            events=self.events,
            announce=self.outbox.account_event,
        )
        self.ready = ReadyQueue(
            self.folders, self.scheduler, self.ledger, self.instance, self.notes
        )
        self.slots = UploadSlots(
            self.worker,
            self.pacer,
            config.api,
            self.notes.wakeup,
            take=Claimer(self.folders, self.ledger, self.instance).take,
        )
        self.probe = AccountProbe(
            self.pacer,
            self.transcriber.check_account,
            self.notes.wakeup,
            announce=self.outbox.account_event,
        )
        self.reconciler = Reconciler(
            self.folders,
            self.ledger,
            self.scheduler,
            self.slots,
            self.instance,
            not_mine=self.share.not_mine(base),
        )
        self.stop_level = 0  # 0 running, 1 warm stop, 2 cold stop
        self.abandoned = False  # uploads were still running when run() returned
        self.unusable = False  # PyAV could not be imported: stopped, exit code 1
        self.audio_ready = threading.Event()  # PyAV's import has ended (_warm_up)
        self.last_tick = time.monotonic()
        self.notifier = Notifier()
        self.reload_requested = False
        self.signals: list[str] = []  # received, not yet logged
        #: start-up is over (observers, reconcile, READY sent): the loop runs
        self.started = False
        #: the health the loop last found (the watchdog's; /healthz reads it)
        self.last_health = HEALTHY
        self._health_at = float("-inf")
        stat = self.ledger.path.stat()
        self._ledger_id = (stat.st_dev, stat.st_ino)
        self.endpoint: Endpoint | None = None
        self.publisher = Publisher(
            self.status,
            self.ledger,
            self.notifier,
            share=self.share,
            base=base,
            running=self.workers.spawned,
            events=self.events,
            metrics=config.metrics.listen is not None,
        )
        #: the metrics (``metrics.listen``); the face serves them, a worker publishes its tally
        self.metrics = self.publisher.metrics

    # -- the loop ------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped (or, in burst mode, until there is nothing left to do)."""
        # PyAV is imported while the first files settle, not before we watch for them.
        threading.Thread(target=self._warm_up, name="sfwatch-warm-up", daemon=True).start()
        self._install_signals()
        try:
            self._start()
        except BaseException:
            self.workers.stop()  # (an in-process caller goes on: no worker may outlive this)
            self.workers.wait(OUTBOX_GRACE)
            raise
        self.log.info(
            "sfwatch.daemon_started",
            version=__version__,
            instance=self.instance,
            worker=self.share.index,
            workers=self.share.count,
            watches=self._watch_paths(),
            state_dir=str(self.config.state_dir),
            pid=os.getpid(),
        )
        self.notifier.ready(self.status_line())
        self.last_tick = time.monotonic()
        self.started = True
        stop_deadline: float | None = None
        while True:
            pause: float | None = None
            try:
                self.tick()
            except Exception:  # a bug, or the state_dir's disk full: log, pause, go on
                self.log.exception("sfwatch.loop_error")
                pause = 1.0
            if self.stop_level == 1 and stop_deadline is None:
                self.notifier.stopping()
                stop_deadline = time.monotonic() + self.grace_seconds
                self.log.info(
                    "sfwatch.daemon_stopping",
                    mode="warm",
                    in_flight=len(self.slots),
                    grace_seconds=self.grace_seconds,
                )
            if self.stop_level >= 1 and not self.slots and not self.workers.running():
                break
            if self.stop_level >= 2 or (stop_deadline and time.monotonic() > stop_deadline):
                self.log.warning("sfwatch.daemon_stopping", mode="cold", in_flight=len(self.slots))
                self.abandoned = bool(self.slots)
                break
            if self.burst and self._idle():
                break
            self.notes.wakeup.wait(pause if pause is not None else self._pause())
            self.notes.wakeup.clear()
        self._shutdown()
        self.log.info("sfwatch.daemon_stopped", **dict(self.scheduler.counts))
        return 1 if self.unusable else self.workers.worst()

    def _start(self) -> None:
        """Start-up: the workers, the listener, the observers, recovery, the outbox."""
        self.workers.start()
        if self.share.face:
            self.publisher.forget_retired_workers()
        self._start_endpoint()
        self.intake.start()
        self.leases.beat()
        self.reconciler.startup()
        if self.share.face:  # (the face delivers every worker's events)
            self.outbox.start()  # after reconcile: the rows it finished are in the outbox too

    def _warm_up(self) -> None:
        """Import PyAV (a background thread); if it cannot be, stop: no file can be prepared.

        Until it has ended, files settle but none is claimed, so a failed import
        leaves every file where it was, as an import at start-up would have.
        """
        try:
            warm_up()
        # Not installed, FFmpeg's libraries failing to load (ImportError), a build for
        # another PyAV or numpy (ValueError "size changed"): whatever it is, it is fatal.
        except Exception as exc:  # noqa: BLE001 - logged, and the daemon stops
            self.log.error("sfwatch.pyav_unavailable", error=f"{type(exc).__name__}: {exc}")
            self.unusable = True
            self.stop_level = 2
            self.workers.stop()  # (twice: a cold stop for them too)
            self.workers.stop()
        finally:
            self.audio_ready.set()
            self.notes.wakeup.set()

    def tick(self) -> None:
        """One turn of the work loop."""
        self.last_tick = time.monotonic()
        while self.signals:
            self.log.info("sfwatch.signal_received", signal=self.signals.pop(0))
        if self.reload_requested:
            self.reload_requested = False
            self.reload()
        self.workers.poll()
        self.intake.take_notes(self.ready.queued)
        self.ready.add(self.intake.settled())
        for result in self.slots.reap():
            if isinstance(result, ClaimMiss):
                self.ready.missed(result)
            else:
                self.scheduler.handle(result)
        self.slots.grant(stopping=self.stop_level > 0)
        self.probe.step(may_start=self.stop_level == 0)
        if self.stop_level == 0:
            # (nothing is claimed before PyAV is known to load: _warm_up)
            while self.audio_ready.is_set() and (
                (item := self.ready.next_job(self.slots.uploads_allowed())) is not None
            ):
                self.slots.submit(item)
            for job in self.leases.adopt_expired():
                self.scheduler.resume(job, self.instance)
        self.pressure.backlog = self.stop_level == 0 and bool(self.ready)
        self.cores.turn(self.pressure.backlog)
        if self.stop_level == 0:
            self.intake.check_watchers()
        if self.publisher.due():
            self._publish()
        # A busy loop turns several times per file: health (a few stat calls) is asked
        # once per TICK, which is as often as an idle loop asks it.
        if self.last_tick - self._health_at >= TICK:
            self._health_at = self.last_tick
            self.last_health = self.health()
            self.notifier.watchdog(self.last_health.ok)
        if not self.slots:
            let_go()  # idle: hold no folder of the share open (safefs.let_go)

    def _idle(self) -> bool:
        return (
            self.intake.idle()
            and not self.slots
            and not self.ready
            and not len(self.scheduler)
            and not self.probe.running
            and not self.workers.running()
            # deliveries due now (the face's); retries wait for the next start
            and (not self.share.face or self.outbox.idle())
        )

    def _pause(self) -> float:
        """How long the loop may sleep; a bug working it out is logged like a turn's."""
        try:
            return self._sleep_time()
        except Exception:
            self.log.exception("sfwatch.loop_error")
            return 1.0

    def _sleep_time(self) -> float:
        now = time.monotonic()
        candidates = [self.settler.next_due(), self.pacer.wake_at()]
        # A retry that is due only matters when it could start: otherwise the loop
        # would spin (a paused account, every slot busy, a warm stop).
        if self.stop_level == 0:
            candidates.append(self.scheduler.next_due(self.slots.uploads_allowed()))
        wakes = [now + TICK, *(due for due in candidates if due is not None and due > now)]
        return min(wakes) - now

    # -- status and health ---------------------------------------------------------

    def _watch_paths(self) -> list[str]:
        return [str(w.path) for w in self.folders.watched()]

    def status(self) -> dict[str, Any]:
        """What the daemon is doing now (for `sfwatch status` and systemd's STATUS=)."""
        pace = self.pacer.state()
        return {
            "version": __version__,
            "settling": len(self.settler),
            "queued": len(self.ready),
            "waiting": len(self.scheduler.waiting),
            "in_flight": len(self.slots),
            # of which uploads sent and not answered: the rest are claimed, being
            # prepared, waiting for their turn, or finishing
            "uploading": self.slots.sending(),
            "limit": pace.limit,
            "paused": pace.paused,
            "paused_reason": pace.reason,
            "paused_for": round(max(0.0, pace.paused_until - time.monotonic()), 1)
            if pace.paused_until
            else None,
            "counts": dict(self.scheduler.counts),
            "watches": self._watch_paths(),
        }

    def status_line(self) -> str:
        """One line for systemd's STATUS=: what a person wants to see in `systemctl status`."""
        return format_status(self.status())

    def healthy(self) -> bool:
        """``health()`` is fine."""
        return self.health().ok

    def health(self) -> Health:
        """The first problem found, or ``HEALTHY``: what systemd's watchdog and /healthz use.

        The loop ticked within ``FROZEN_AFTER``; every observer and the scanner run
        (not checked during a stop); no upload runs past its timeouts; the state dir
        holds our ledger, is writable, and took the last status written to it.
        """
        now = time.monotonic()
        if now - self.last_tick > FROZEN_AFTER:
            return Health(
                "loop_frozen", f"the work loop has not run for {now - self.last_tick:.0f} s"
            )
        if self.stop_level == 0 and (problem := self.intake.problem()) is not None:
            return Health(*problem)
        if (stuck := self.slots.stuck(now)) is not None:
            return Health(
                "upload_stuck",
                f"an attempt has run for {stuck:.0f} s (limit {self.slots.stuck_after:.0f} s)",
            )
        if (problem_text := self._state_dir_problem()) is not None:
            return Health("state_dir", problem_text)
        if (problem_text := self.workers.problem()) is not None:
            return Health("worker_down", problem_text)
        return HEALTHY

    def _state_dir_problem(self) -> str | None:
        try:
            stat = self.ledger.path.stat()
        except OSError as exc:
            return f"the ledger is gone from state_dir ({exc.strerror})"
        if (stat.st_dev, stat.st_ino) != self._ledger_id:
            return "the ledger in state_dir is not the one this daemon has open"
        if not os.access(self.config.state_dir, os.W_OK | os.X_OK):
            return "state_dir is not writable"
        if (error := self.publisher.state_error) is not None:
            return f"the last write to the ledger failed: {error}"
        return None

    def current_health(self) -> Health:
        """The health for another thread (/healthz): the loop's last finding, unless it froze.

        A frozen loop cannot say so itself; start-up (before the loop runs) is not frozen.
        """
        since = time.monotonic() - self.last_tick
        if self.started and since > FROZEN_AFTER:
            return Health("loop_frozen", f"the work loop has not run for {since:.0f} s")
        return self.last_health

    def readiness(self) -> Health:
        """Ready: start-up over, the start-up scan done, not stopping, and healthy."""
        if not self.started:
            return Health("starting", "observers and start-up recovery are not done yet")
        if not self.intake.scan_done.is_set():
            return Health("scanning", "the start-up scan of the watched folders is running")
        if self.stop_level:
            return Health("stopping", "the daemon is stopping")
        return self.current_health()

    def _publish(self) -> None:
        self.leases.beat()
        self.publisher.publish()

    # -- the metrics and health listener --------------------------------------------

    def _start_endpoint(self) -> None:
        """Listen on ``metrics.listen`` if set; a failure is logged, and work goes on."""
        listen = self.config.metrics.listen
        if self.metrics is None or listen is None or not self.share.face:
            return  # (a worker's counts reach the face's listener through the ledger)
        self.endpoint = start_endpoint(
            listen, self.metrics, self.current_health, self.readiness, self.log
        )

    # -- reload --------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: re-read the config and apply watch changes without dropping any work."""
        self.notifier.reloading()
        self.log.info("sfwatch.reload_started", config=str(self.config.source))
        try:
            with wide():  # (workers: auto counts the CPUs this thread may use: all of them)
                loaded = load_config(self.config.source or Path("sfwatch.yaml"))
            new = self.share.config(loaded)
        except ConfigError as exc:
            self.log.error("sfwatch.reload_failed", error=str(exc), kept="the running config")
            self.notifier.ready(self.status_line())
            return
        needs_restart = [
            name
            for name in TOP_KEYS
            if name != "watch" and getattr(new, name) != getattr(self.config, name)
        ]
        if needs_restart:
            self.log.warning("sfwatch.reload_partial", needs_restart=needs_restart)
        # Jobs already claimed from a removed folder finish with its old settings (retired).
        change = self.folders.replace(new.watch)
        for watch in self.intake.apply(change):
            self.reconciler.recover(watch)
        self.log.info("sfwatch.reload_finished", watches=self._watch_paths())
        self.notifier.ready(self.status_line())

    # -- signals and shutdown ------------------------------------------------------

    def request_stop(self) -> None:
        """First call: warm stop. Second call: cold stop."""
        self.stop_level = min(2, self.stop_level + 1)
        self.notes.wakeup.set()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # No logging here: the handler may interrupt a log write that holds the
        # writer's lock. The loop logs the signal on its next turn.
        self.signals.append(signal.Signals(signum).name)
        self.request_stop()
        self.workers.stop()  # each stop the face gets, each worker gets (workers.py)

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        self.reload_requested = True
        self.notes.wakeup.set()
        self.workers.reload()

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if self.share.face:
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        else:  # a worker stops when the face says so, whoever else signals the service
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(STOP_SIGNAL, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        release_signals()  # (held since the process began: cli.cmd_run)

    def _shutdown(self) -> None:
        self.slots.close_gate()  # (before anything here can raise: see close_gate)
        self.cores.release()  # the drain is no backlog; an in-process caller goes on
        self.intake.stop()
        for job in self.slots.jobs():
            # We are leaving them, not crashing on them: no poison count.
            self.ledger.set_stage(job.job_id, None)
        self._publish()
        self.slots.shutdown(wait=not self.abandoned)
        self.probe.shutdown()
        if self.endpoint is not None:
            self.endpoint.close()
        self.outbox.stop(0.0 if self.abandoned else OUTBOX_GRACE)
        # A cold stop: the workers were told too, and leave at once (else they are killed).
        self.workers.wait(self.grace_seconds + OUTBOX_GRACE if not self.abandoned else OUTBOX_GRACE)
        if not self.abandoned:
            self.transcriber.close()
            self.ledger.close()
        os.close(self._lock_fd)  # (a cold stop exits the process, which releases it too)


def _hold_lock(state_dir: Path, share: Share) -> int:
    """The face holds ``daemon.lock``; worker K, ``worker-K.lock`` (workers.py)."""
    return lock_state_dir(state_dir) if share.face else lock_worker(state_dir, share)


def _scrubber(api_key: Secret) -> Callable[[str], str]:
    redact = Redactor([api_key.reveal()])

    def scrub(text: str) -> str:
        return str(redact.scrub(text))

    return scrub


__all__ = ["HEALTHY", "Daemon", "Health", "instance_name"]
