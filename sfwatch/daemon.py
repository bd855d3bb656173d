"""The daemon: wires the stages, owns the threads, the signals and the work loop.

Threads: one watchdog observer per watched folder (they only note paths), one
scanner (start-up scan, then periodic rescans), ``api.concurrency`` upload
workers, one account prober, and the main thread, which runs the work loop::

    drain noted paths → settle → claim (only when an upload slot is free)
    → worker thread: prepare → transcribe → finish → Outcome
    → main thread: the scheduler decides (done, retry, pause, fail)

All decisions are made on the main thread, so pacing state needs no locks. A
file waiting for a retry holds no upload slot, and a settled file stays in the
inbox until a slot is free (so sibling daemons can take it meanwhile).

Shutdown follows rq's worker: the first SIGTERM/SIGINT is a warm stop (claim
nothing more, let uploads in flight finish within a grace period); a second one
is a cold stop (leave now; claimed files are resumed at the next start).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

from sfwatch import __version__
from sfwatch.claim import claim, claimed_files
from sfwatch.config import Config, Secret, WatchConfig, load_config
from sfwatch.errors import ConfigError, SfwatchError, TranscribeError
from sfwatch.intake import Intake
from sfwatch.job import Job
from sfwatch.ledger import Ledger
from sfwatch.lifecycle import OutcomeKind
from sfwatch.logs import get_logger
from sfwatch.notify import Notifier
from sfwatch.pacing import Pacer
from sfwatch.recovery import DEFAULT_LEASE_SECONDS, LeaseKeeper, job_from_row, retired_watch
from sfwatch.scheduler import Scheduler, needs_upload
from sfwatch.settle import SettledFile, signature_of
from sfwatch.transcribe import Transcriber
from sfwatch.worker import Outcome, Worker

#: how long a warm stop waits for uploads in flight
DEFAULT_GRACE_SECONDS = 60.0
#: the longest the loop sleeps: it also checks the observers' health
TICK = 0.5
#: how often `sfwatch status` and systemd's STATUS= see fresh numbers
PUBLISH_EVERY = 2.0
#: how often an unchanged status is written again (so `sfwatch status` knows we live)
STATE_REFRESH = 30.0
#: an upload running this much longer than api.timeout_seconds means a stuck worker
STUCK_MARGIN = 60.0
#: a loop that has not ticked for this long is frozen (it ticks every TICK seconds)
FROZEN_AFTER = 30.0
#: threads for local work (moves to failed/, finishing paid transcripts)
LOCAL_WORKERS = 2


def instance_name(state_dir: Path) -> str:
    """A name unique per (host, state_dir) without configuration: ``host-1a2b3c4d``."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40] or "host"
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:8]
    return f"{host}-{digest}"


def lock_state_dir(state_dir: Path) -> int:
    """Hold ``state_dir/daemon.lock`` for this process; ConfigError if another holds it.

    Two daemons on one state_dir would share an instance name and resume each
    other's claims while both are working on them.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(
            "state_dir", f"{state_dir} is in use by another sfwatch daemon (pid {holder})"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


class Daemon:
    """``sfwatch run``: the long-running work loop."""

    def __init__(
        self,
        config: Config,
        api_key: Secret,
        *,
        burst: bool = False,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
        lease_seconds: float | None = None,
        backoff_base: float = 1.0,
    ) -> None:
        self.config = config
        self.burst = burst
        self.grace_seconds = grace_seconds
        self.instance = instance_name(config.state_dir)
        self.log = get_logger()
        self._lock_fd = lock_state_dir(config.state_dir)
        self.intake = Intake({w.path: w for w in config.watch})
        self.notes = self.intake.notes
        self.settler = self.intake.settler
        self.watchers = self.intake.watchers
        self.ledger = Ledger.in_state_dir(config.state_dir)
        self.transcriber = Transcriber(
            config.api.base_url,
            api_key,
            timeout_seconds=config.api.timeout_seconds,
            concurrency=config.api.concurrency,
        )
        self.pacer = Pacer(
            config.api.concurrency, config.api.requests_per_minute, backoff_base=backoff_base
        )
        self.leases = LeaseKeeper(
            self.instance,
            [w.work_dir for w in config.watch],
            lease_seconds=lease_seconds or DEFAULT_LEASE_SECONDS,
        )
        self.worker = Worker(
            config, self.transcriber, self.ledger, self.instance, fence=self.leases.fence
        )
        self.scheduler = Scheduler(config, self.pacer, self.ledger, self.worker)
        self.ready: deque[SettledFile] = deque()
        self.queued: set[Path] = set()
        self.in_flight: dict[Future[Outcome], Job] = {}
        self.pool = ThreadPoolExecutor(config.api.concurrency, thread_name_prefix="sfwatch-upload")
        # Moves to failed/ and finishes of paid transcripts: never behind the pacer.
        self.local_pool = ThreadPoolExecutor(LOCAL_WORKERS, thread_name_prefix="sfwatch-local")
        self.uploading: set[Future[Outcome]] = set()
        self.prober = ThreadPoolExecutor(1, thread_name_prefix="sfwatch-probe")
        self.probe: Future[dict[str, Any]] | None = None
        self.stop_level = 0  # 0 running, 1 warm stop, 2 cold stop
        self.abandoned = False  # uploads were still running when run() returned
        self.last_tick = time.monotonic()
        self._published = 0.0
        self._last_state: dict[str, Any] = {}
        self._state_written = 0.0
        self.notifier = Notifier()
        self.started_at: dict[Future[Outcome], float] = {}
        self.reload_requested = False
        self.signals: list[str] = []  # received, not yet logged

    @property
    def watches(self) -> dict[Path, WatchConfig]:
        """The folders watched now (a reload may change them)."""
        return self.intake.watches

    # -- the loop ------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped (or, in burst mode, until there is nothing left to do)."""
        self._install_signals()
        self.intake.start()
        self.leases.beat()
        self._reconcile()
        self.log.info(
            "sfwatch.daemon_started",
            version=__version__,
            instance=self.instance,
            watches=[str(w) for w in self.watches],
            state_dir=str(self.config.state_dir),
            pid=os.getpid(),
        )
        self.notifier.ready(self.status_line())
        stop_deadline: float | None = None
        while True:
            try:
                self.tick()
            except Exception:  # a bug, or the state_dir's disk full: log, pause, go on
                self.log.exception("sfwatch.loop_error")
                self.notes.wakeup.wait(1.0)
            if self.stop_level == 1 and stop_deadline is None:
                self.notifier.stopping()
                stop_deadline = time.monotonic() + self.grace_seconds
                self.log.info(
                    "sfwatch.daemon_stopping",
                    mode="warm",
                    in_flight=len(self.in_flight),
                    grace_seconds=self.grace_seconds,
                )
            if self.stop_level >= 1 and not self.in_flight:
                break
            if self.stop_level >= 2 or (stop_deadline and time.monotonic() > stop_deadline):
                self.log.warning(
                    "sfwatch.daemon_stopping", mode="cold", in_flight=len(self.in_flight)
                )
                self.abandoned = bool(self.in_flight)
                break
            if self.burst and self._idle():
                break
            self.notes.wakeup.wait(self._sleep_time())
            self.notes.wakeup.clear()
        self._shutdown()
        self.log.info("sfwatch.daemon_stopped", **dict(self.scheduler.counts))
        return 0

    def tick(self) -> None:
        """One turn of the work loop."""
        self.last_tick = time.monotonic()
        while self.signals:
            self.log.info("sfwatch.signal_received", signal=self.signals.pop(0))
        if self.reload_requested:
            self.reload_requested = False
            self.reload()
        self.intake.take_notes(self.queued)
        for settled in self.intake.settled(lambda root: self.worker.watches[root].settle_seconds):
            if settled.path not in self.queued:
                self.queued.add(settled.path)
                self.ready.append(settled)
        self._reap()
        self._probe_account()
        if self.stop_level == 0:
            self._dispatch()
            for job in self.leases.adopt_expired():
                self.scheduler.resume(job, self.instance)
        if self.stop_level == 0:
            self.intake.check_watchers()
        if time.monotonic() - self._published >= PUBLISH_EVERY:
            self._publish()
        self.notifier.watchdog(self.healthy())

    def _idle(self) -> bool:
        return (
            self.intake.idle()
            and not self.in_flight
            and not self.ready
            and not len(self.scheduler)
            and self.probe is None
        )

    def _sleep_time(self) -> float:
        now = time.monotonic()
        candidates = [self.settler.next_due(), self.pacer.wake_at()]
        # A retry that is due only matters when it could start: otherwise the loop
        # would spin (a paused account, every slot busy, a warm stop).
        if self.stop_level == 0:
            candidates.append(self.scheduler.next_due(self.pacer.allowed(len(self.uploading))))
        wakes = [now + TICK, *(due for due in candidates if due is not None and due > now)]
        return min(wakes) - now

    def status(self) -> dict[str, Any]:
        """What the daemon is doing now (for `sfwatch status` and systemd's STATUS=)."""
        pace = self.pacer.state()
        return {
            "version": __version__,
            "settling": len(self.settler),
            "queued": len(self.ready),
            "waiting": len(self.scheduler.waiting),
            "in_flight": len(self.in_flight),
            "limit": pace.limit,
            "paused": pace.paused,
            "paused_for": round(max(0.0, pace.paused_until - time.monotonic()), 1)
            if pace.paused_until
            else None,
            "counts": dict(self.scheduler.counts),
            "watches": [str(w) for w in self.watches],
        }

    def status_line(self) -> str:
        """One line for systemd's STATUS=: what a person wants to see in `systemctl status`."""
        s = self.status()
        counts = s["counts"]
        line = (
            f"queued {s['queued'] + s['settling']}, waiting {s['waiting']}, "
            f"in flight {s['in_flight']}, done {counts.get('done', 0) + counts.get('dedup', 0)}, "
            f"failed {counts.get('failed', 0)}"
        )
        return f"{line}; paused: {s['paused']}" if s["paused"] else line

    def healthy(self) -> bool:
        """Observers alive, the loop ticking, no upload stuck past its timeout."""
        now = time.monotonic()
        if now - self.last_tick > FROZEN_AFTER:
            return False
        if self.stop_level == 0 and not self.intake.healthy():
            return False
        # Sending and answering are each bounded by timeout_seconds (transcribe.py).
        limit = 2 * self.config.api.timeout_seconds + STUCK_MARGIN
        return all(now - started < limit for started in self.started_at.values())

    def _publish(self) -> None:
        now = self._published = time.monotonic()
        self.leases.beat()
        status = self.status()
        # The ledger write is fsynced: an idle daemon makes one a minute, not one per tick.
        if status != self._last_state or now - self._state_written >= STATE_REFRESH:
            self.ledger.publish_state(self.instance, os.getpid(), status)
            self._last_state, self._state_written = status, now
        self.notifier.status(self.status_line())

    # -- claim and dispatch --------------------------------------------------------

    def _dispatch(self) -> None:
        while (job := self._next_job(self.pacer.allowed(len(self.uploading)))) is not None:
            upload = needs_upload(job)
            if upload:
                self.pacer.started()
            future = (self.pool if upload else self.local_pool).submit(self.worker.process, job)
            if upload:
                self.uploading.add(future)
            self.in_flight[future] = job
            self.started_at[future] = time.monotonic()
            future.add_done_callback(lambda _f: self.notes.wakeup.set())

    def _next_job(self, uploads_allowed: bool) -> Job | None:
        self.scheduler.run_deferred()
        while (job := self.scheduler.pop_due(uploads_allowed)) is not None:
            if job.plan is not None:
                return job  # mid-finish: the worker finds the file where it is now
            sig = signature_of(job.path)
            if sig is None:
                self.scheduler.vanished(job)
                continue
            if sig != job.signature:  # still being written through an old handle
                self.scheduler.wait(
                    job.evolve(signature=sig, sha256=None, text=None),
                    self.worker.watches[job.root].settle_seconds,
                )
                continue
            return job
        while uploads_allowed and self.ready:
            settled = self.ready.popleft()
            self.queued.discard(settled.path)
            watch = self.watches.get(settled.root)
            if watch is None:
                continue  # its folder is no longer watched (a reload removed it)
            try:
                claimed = claim(settled, watch.work_dir, self.instance)
            except OSError as exc:
                self.log.error("sfwatch.claim_failed", file=str(settled.path), error=str(exc))
                continue
            if claimed is None:
                if os.path.lexists(settled.path):
                    self.notes.note(str(settled.path))  # changed since it settled
                continue
            now = time.monotonic()
            job = claimed.evolve(claimed_at=now, window_start=now)
            if not self.scheduler.record_claim(job, self.instance):
                continue  # resumed once the ledger takes the row
            self.log.info(
                "sfwatch.file_claimed",
                job_id=job.job_id,
                file=str(job.source),
                bytes=job.signature.size,
            )
            return job
        return None

    def _reconcile(self) -> None:
        """Start-up: every open ledger row against the file system (docs/design.md §6)."""
        for watch in self.watches.values():
            shutil.rmtree(watch.work_dir / "tmp" / self.instance, ignore_errors=True)
        rows = self.ledger.open_jobs()
        for row in rows:  # claims of folders that have left the config finish there
            if Path(row.root) not in self.worker.watches:
                watch = retired_watch(row)
                self.worker.watches[watch.path] = watch
                self.log.warning(
                    "sfwatch.retired_watch_resumed", path=str(watch.path), job_id=row.job_id
                )
        roots = {Path(r.root) for r in rows} | set(self.watches)
        for root in sorted(roots):
            self._recover(self.worker.watches[root])
        live = self._live_jobs()
        for row in rows:
            if row.job_id in live:
                continue
            job = job_from_row(row, self.instance)
            if row.plan is not None:
                self.scheduler.resume(job, self.instance)  # the worker finds where it went
            elif job.path.exists():
                continue  # another instance name's work folder: its lease decides
            else:
                self.scheduler.vanished(job)

    def _live_jobs(self) -> set[str]:
        live = {j.job_id for j in self.in_flight.values()}
        live.update(j.job_id for _, _, j in self.scheduler.waiting)
        return live

    def _recover(self, watch: WatchConfig) -> None:
        """Resume the claims an earlier run of this instance left in the work area."""
        # A folder removed and re-added by reloads may hold jobs we are still working on.
        live = self._live_jobs()
        for job in claimed_files(watch.work_dir, self.instance, watch.path):
            if job.job_id not in live:
                self.scheduler.resume(job, self.instance)

    # -- outcomes and the account probe --------------------------------------------

    def _reap(self) -> None:
        for future in [f for f in self.in_flight if f.done()]:
            job = self.in_flight.pop(future)
            self.uploading.discard(future)
            self.started_at.pop(future, None)
            try:
                outcome = future.result()
            except Exception as exc:  # a bug: keep the file claimed, try again later
                self.log.exception(
                    "sfwatch.worker_crashed", job_id=job.job_id, file=str(job.source)
                )
                self.scheduler.handle(Outcome(OutcomeKind.CRASH, job, exc))
                continue
            self.scheduler.handle(outcome)

    def _probe_account(self) -> None:
        if self.probe is not None and self.probe.done():
            try:
                self.probe.result()
            except SfwatchError as exc:
                if isinstance(exc, TranscribeError) and exc.http_status in (404, 405):
                    # No /user/info here (OpenAI, Groq, speaches, whisper.cpp): let one
                    # upload through as the probe instead; it pauses us again if need be.
                    self.pacer.account_ok()
                    self.log.info("sfwatch.uploads_resumed", probe="upload")
                    self.probe = None
                    return
                reason = exc.reason if isinstance(exc, TranscribeError) else "probe_failed"
                wait = self.pacer.account_failed(self.pacer.account_fault or reason)
                self.log.info(
                    "sfwatch.account_probe_failed",
                    reason=reason,
                    http_status=getattr(exc, "http_status", None),
                    retry_in=round(wait, 1),
                )
            except Exception:  # a bug: still a failed probe, so the pause goes on and ends
                wait = self.pacer.account_failed(self.pacer.account_fault or "probe_failed")
                self.log.exception(
                    "sfwatch.account_probe_failed", reason="probe_crashed", retry_in=round(wait, 1)
                )
            else:
                self.pacer.account_ok()
                self.log.info("sfwatch.uploads_resumed")
            self.probe = None
        if (
            self.pacer.account_fault is not None
            and self.probe is None
            and time.monotonic() >= self.pacer.probe_at
            and self.stop_level == 0
        ):
            self.probe = self.prober.submit(self.transcriber.check_account)
            self.probe.add_done_callback(lambda _f: self.notes.wakeup.set())

    # -- reload --------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: re-read the config and apply watch changes without dropping any work."""
        self.notifier.reloading()
        self.log.info("sfwatch.reload_started", config=str(self.config.source))
        try:
            new = load_config(self.config.source or Path("sfwatch.yaml"))
        except ConfigError as exc:
            self.log.error("sfwatch.reload_failed", error=str(exc), kept="the running config")
            self.notifier.ready(self.status_line())
            return
        needs_restart = [
            name
            for name in ("api", "state_dir", "log", "prepare")
            if getattr(new, name) != getattr(self.config, name)
        ]
        if needs_restart:
            self.log.warning("sfwatch.reload_partial", needs_restart=needs_restart)
        fresh = {w.path: w for w in new.watch}
        # Jobs already claimed from a removed folder finish with its old settings.
        self.worker.watches.update(fresh)
        for watch in self.intake.replace(fresh):
            self._recover(watch)
        self.leases.work_dirs = [w.work_dir for w in fresh.values()]
        self.config = replace(self.config, watch=new.watch)
        self.log.info("sfwatch.reload_finished", watches=[str(p) for p in fresh])
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

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        self.reload_requested = True
        self.notes.wakeup.set()

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _shutdown(self) -> None:
        self.intake.stop()
        for job in self.in_flight.values():
            # We are leaving them, not crashing on them: no poison count.
            self.ledger.set_stage(job.job_id, None)
        self._publish()
        self.pool.shutdown(wait=not self.abandoned, cancel_futures=True)
        self.local_pool.shutdown(wait=not self.abandoned, cancel_futures=True)
        self.prober.shutdown(wait=False, cancel_futures=True)
        if not self.abandoned:
            self.transcriber.close()
            self.ledger.close()
        os.close(self._lock_fd)  # (a cold stop exits the process, which releases it too)


__all__ = ["Daemon", "instance_name"]
