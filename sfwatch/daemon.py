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
from sfwatch.claim import claim, claimed_files, instance_dir, release
from sfwatch.config import Config, Secret, WatchConfig, load_config
from sfwatch.errors import AccountError, ConfigError, TransientError
from sfwatch.job import Job
from sfwatch.ledger import Ledger
from sfwatch.logs import get_logger
from sfwatch.notify import Notifier
from sfwatch.pacing import Pacer
from sfwatch.recovery import DEFAULT_LEASE_SECONDS, LeaseKeeper
from sfwatch.scheduler import Scheduler
from sfwatch.settle import SettledFile, Settler, signature_of
from sfwatch.transcribe import Transcriber
from sfwatch.watch import (
    PathNotes,
    Watcher,
    printable,
    scan,
    under_link,
    utf8_name,
    walk_dir,
    wants,
    wants_dir,
)
from sfwatch.worker import Outcome, Worker

#: how long a warm stop waits for uploads in flight
DEFAULT_GRACE_SECONDS = 60.0
#: the longest the loop sleeps: it also checks the observers' health
TICK = 0.5
#: restarts that found a job mid-attempt before it is failed as "poison"
POISON_AFTER = 3
#: how often `sfwatch status` and systemd's STATUS= see fresh numbers
PUBLISH_EVERY = 2.0
#: an upload running this much longer than api.timeout_seconds means a stuck worker
STUCK_MARGIN = 60.0
#: a loop that has not ticked for this long is frozen (it ticks every TICK seconds)
FROZEN_AFTER = 30.0
#: how long to wait before trying again to restart an observer that failed to start
WATCH_RETRY = 30.0


def instance_name(state_dir: Path) -> str:
    """A name unique per (host, state_dir) without configuration: ``host-1a2b3c4d``."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40] or "host"
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:8]
    return f"{host}-{digest}"


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
        self.notes = PathNotes()
        self.settler = Settler()
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
        self.worker = Worker(config, self.transcriber, self.ledger, self.instance)
        self.scheduler = Scheduler(config, self.pacer, self.ledger, self.worker)
        self.watches = {w.path: w for w in config.watch}
        self.leases = LeaseKeeper(
            self.instance,
            [w.work_dir for w in config.watch],
            lease_seconds=lease_seconds or DEFAULT_LEASE_SECONDS,
        )
        self.watchers: dict[Path, Watcher] = {}
        self.ready: deque[SettledFile] = deque()
        self.queued: set[Path] = set()
        self.in_flight: dict[Future[Outcome], Job] = {}
        self.pool = ThreadPoolExecutor(config.api.concurrency, thread_name_prefix="sfwatch-upload")
        self.prober = ThreadPoolExecutor(1, thread_name_prefix="sfwatch-probe")
        self.probe: Future[dict[str, Any]] | None = None
        self.scan_done = threading.Event()
        self.stop_scanner = threading.Event()
        self.stop_level = 0  # 0 running, 1 warm stop, 2 cold stop
        self.abandoned = False  # uploads were still running when run() returned
        self.skipped: set[Path] = set()
        self.last_tick = time.monotonic()
        self._published = 0.0
        self.notifier = Notifier()
        self.started_at: dict[Future[Outcome], float] = {}
        self.broken_watches: dict[Path, float] = {}  # observer down: when to retry
        self.reload_requested = False

    # -- the loop ------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped (or, in burst mode, until there is nothing left to do)."""
        self._install_signals()
        for watch in self.watches.values():
            self._start_watcher(watch)
            self.leases.beat()
            self._recover(watch)
        self.scanner = threading.Thread(target=self._scan_loop, name="sfwatch-scan", daemon=True)
        self.scanner.start()
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
            self.tick()
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
        if self.reload_requested:
            self.reload_requested = False
            self.reload()
        self._take_notes()
        for settled in self.settler.due(lambda root: self.worker.watches[root].settle_seconds):
            if settled.path not in self.queued:
                self.queued.add(settled.path)
                self.ready.append(settled)
        self._reap()
        self._probe_account()
        if self.stop_level == 0:
            self._dispatch()
            for job in self.leases.adopt_expired():
                self._resume(job)
        self._check_watchers()
        if time.monotonic() - self._published >= PUBLISH_EVERY:
            self._publish()
        self.notifier.watchdog(self.healthy())

    def _idle(self) -> bool:
        return (
            self.scan_done.is_set()
            and len(self.notes) == 0
            and not self.in_flight
            and not self.ready
            and not self.scheduler.waiting
            and len(self.settler) == 0
            and self.probe is None
        )

    def _sleep_time(self) -> float:
        now = time.monotonic()
        candidates = (self.settler.next_due(), self.scheduler.next_due(), self.pacer.wake_at())
        wakes = [now + TICK, *(due for due in candidates if due is not None)]
        return max(0.0, min(wakes) - now)

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
        if now - self.last_tick > FROZEN_AFTER or self.broken_watches:
            return False
        if not all(w.alive() for w in self.watchers.values()):
            return False
        if self.stop_level == 0 and hasattr(self, "scanner") and not self.scanner.is_alive():
            return False
        limit = self.config.api.timeout_seconds + STUCK_MARGIN
        return all(now - started < limit for started in self.started_at.values())

    def _publish(self) -> None:
        self._published = time.monotonic()
        self.leases.beat()
        self.ledger.publish_state(self.instance, os.getpid(), self.status())
        self.notifier.status(self.status_line())

    # -- watch and settle ----------------------------------------------------------

    def _start_watcher(self, watch: WatchConfig) -> None:
        watcher = Watcher(watch, self.notes)
        watcher.start()
        self.watchers[watch.path] = watcher
        self.log.info(
            "sfwatch.watch_started",
            path=str(watch.path),
            polling=watcher.polling,
            recursive=watch.recursive,
        )

    def _check_watchers(self) -> None:
        if self.stop_level:
            return
        now = time.monotonic()
        for path, watcher in list(self.watchers.items()):
            if watcher.alive() or now < self.broken_watches.get(path, 0.0):
                continue
            if path not in self.broken_watches:
                self.log.error("sfwatch.watch_died", path=str(path))
            watcher.stop()
            try:
                self._start_watcher(self.watches[path])
            except OSError as exc:
                # Unhealthy until it works again: systemd's watchdog will restart us.
                self.broken_watches[path] = now + WATCH_RETRY
                self.log.error("sfwatch.watch_restart_failed", path=str(path), error=str(exc))
                continue
            self.broken_watches.pop(path, None)
            self.notes.rescan_requested.set()

    def _scan_loop(self) -> None:
        self._scan_all()
        self.scan_done.set()
        self.notes.wakeup.set()
        interval = min(w.rescan_seconds for w in self.watches.values())
        while not self.stop_scanner.is_set():
            self.notes.rescan_requested.wait(interval)
            if self.stop_scanner.is_set():
                return
            self.notes.rescan_requested.clear()
            self._scan_all()

    def _scan_all(self) -> None:
        for watch in self.watches.values():
            started = time.monotonic()
            found = scan(watch, self.notes.note, self.stop_scanner)
            self.log.debug(
                "sfwatch.scan_finished",
                path=str(watch.path),
                files=found,
                seconds=round(time.monotonic() - started, 3),
            )

    def _watch_for(self, path: Path) -> WatchConfig | None:
        for root, watch in self.watches.items():
            if root in path.parents:
                return watch
        return None

    def _take_notes(self) -> None:
        for raw in self.notes.drain():
            path = Path(raw)
            watch = self._watch_for(path)
            if watch is None or path in self.queued:
                continue
            try:
                self._take_note(path, watch)
            except OSError as exc:  # e.g. in a folder we may not enter: stat() says EACCES
                if wants(path, watch):
                    reason = "no_access" if isinstance(exc, PermissionError) else "os_error"
                    self._skip(path, watch, reason)

    def _take_note(self, path: Path, watch: WatchConfig) -> None:
        if under_link(path, watch.path):
            return  # a path through a symlinked folder: links are not followed
        if path.is_dir() and not path.is_symlink():
            if not os.access(path, os.R_OK | os.X_OK):
                self._skip(path, watch, "no_access")
            elif wants_dir(path, watch):  # a folder moved in: its files have no events
                for inner in walk_dir(path, watch):
                    self.notes.note(inner)
            return
        if not wants(path, watch):
            return
        if not utf8_name(path, watch.path):  # the ledger, logs and uploads need UTF-8
            self._skip(path, watch, "name_not_utf8")
        elif not self.settler.note(path, watch.path, watch.settle_seconds):
            self._skip(path, watch)

    def _skip(self, path: Path, watch: WatchConfig, reason: str | None = None) -> None:
        """Log once why a path is not taken (a symlink, a FIFO, a non-UTF-8 name, no access)."""
        if path in self.skipped:
            return
        if reason is None:
            if not os.path.lexists(path):
                return  # gone meanwhile: nothing to say
            reason = "symlink" if path.is_symlink() else "not_a_regular_file"
        self.skipped.add(path)
        self.log.warning(
            "sfwatch.file_skipped", file=printable(path), reason=reason, watch=str(watch.path)
        )

    # -- claim and dispatch --------------------------------------------------------

    def _dispatch(self) -> None:
        while self.pacer.allowed(len(self.in_flight)):
            job = self._next_job()
            if job is None:
                return
            if job.text is None:
                self.pacer.started()
            future = self.pool.submit(self.worker.process, job)
            self.in_flight[future] = job
            self.started_at[future] = time.monotonic()
            future.add_done_callback(lambda _f: self.notes.wakeup.set())

    def _next_job(self) -> Job | None:
        while (job := self.scheduler.pop_due()) is not None:
            sig = signature_of(job.path)
            if sig is None:
                self.scheduler.handle(Outcome("vanished", job))
                continue
            if sig != job.signature:  # still being written through an old handle
                self.scheduler.wait(
                    job.evolve(signature=sig, sha256=None, text=None),
                    self.worker.watches[job.root].settle_seconds,
                )
                continue
            return job
        while self.ready:
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
            self.ledger.claimed(job, self.instance)
            self.log.info(
                "sfwatch.file_claimed",
                job_id=job.job_id,
                file=str(job.source),
                bytes=job.signature.size,
            )
            return job
        return None

    def _recover(self, watch: WatchConfig) -> None:
        """Resume the claims an earlier run of this instance left in the work area."""
        # Split parts are regenerated (identically) when needed: drop stale ones.
        shutil.rmtree(watch.work_dir / "tmp" / self.instance, ignore_errors=True)
        for job in claimed_files(watch.work_dir, self.instance, watch.path):
            self._resume(job)

    def _resume(self, job: Job) -> None:
        now = time.monotonic()
        job = job.evolve(claimed_at=now, window_start=now)
        row = self.ledger.job(job.job_id)
        if row is None:
            row = self.ledger.claimed(job, self.instance)
        elif row.running:
            crashes = self.ledger.crashed(job.job_id)
            if crashes >= POISON_AFTER:
                self.log.error(
                    "sfwatch.job_poisoned", job_id=job.job_id, file=str(job.source), crashes=crashes
                )
                job = job.evolve(attempts=row.attempts, trace_ids=row.trace_ids, sha256=row.sha256)
                self.scheduler.fail(
                    job,
                    RuntimeError(f"the daemon stopped {crashes} times while working on this file"),
                    reason="poison",
                )
                return
        job = job.evolve(
            attempts=row.attempts,
            trace_ids=row.trace_ids,
            text=row.text,
            sha256=row.sha256 if row.text is not None else None,
        )
        self.log.info(
            "sfwatch.job_resumed",
            job_id=job.job_id,
            file=str(job.source),
            attempts=job.attempts,
            transcript_known=job.text is not None,
        )
        self.scheduler.wait(job, 0.0)

    # -- outcomes and the account probe --------------------------------------------

    def _reap(self) -> None:
        for future in [f for f in self.in_flight if f.done()]:
            job = self.in_flight.pop(future)
            self.started_at.pop(future, None)
            try:
                outcome = future.result()
            except Exception:  # a bug: keep the file claimed, try again later
                self.log.exception(
                    "sfwatch.worker_crashed", job_id=job.job_id, file=str(job.source)
                )
                self.scheduler.local_failure(job.evolve(last_reason="crash"), None)
                continue
            if outcome.kind in ("done", "dedup", "failed"):
                release(outcome.job, self.worker.watches[job.root].work_dir, self.instance)
            self.scheduler.handle(outcome)

    def _probe_account(self) -> None:
        if self.probe is not None and self.probe.done():
            try:
                self.probe.result()
            except (AccountError, TransientError) as exc:
                wait = self.pacer.account_failed(self.pacer.account_fault or exc.reason)
                self.log.info(
                    "sfwatch.account_probe_failed",
                    reason=exc.reason,
                    http_status=exc.http_status,
                    retry_in=round(wait, 1),
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
        old, fresh = self.watches, {w.path: w for w in new.watch}
        for path in old.keys() - fresh.keys():
            self.watchers.pop(path).stop()
            self.broken_watches.pop(path, None)
            self.log.info("sfwatch.watch_stopped", path=str(path))
        # Jobs already claimed from a removed folder finish with its old settings.
        self.worker.watches.update(fresh)
        self.watches = fresh  # one assignment: the scanner thread reads this dict
        self.leases.work_dirs = [w.work_dir for w in fresh.values()]
        for path, watch in fresh.items():
            if path in old and watch == old[path]:
                continue
            if path in self.watchers:
                self.watchers.pop(path).stop()
            try:
                self._start_watcher(watch)
            except OSError as exc:
                self.broken_watches[path] = time.monotonic() + WATCH_RETRY
                self.log.error("sfwatch.watch_restart_failed", path=str(path), error=str(exc))
                continue
            if path not in old:
                self._recover(watch)
        self.config = replace(self.config, watch=new.watch)
        self.notes.rescan_requested.set()
        self.log.info("sfwatch.reload_finished", watches=[str(p) for p in fresh])
        self.notifier.ready(self.status_line())

    # -- signals and shutdown ------------------------------------------------------

    def request_stop(self) -> None:
        """First call: warm stop. Second call: cold stop."""
        self.stop_level = min(2, self.stop_level + 1)
        self.notes.wakeup.set()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.log.info("sfwatch.signal_received", signal=signal.Signals(signum).name)
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
        self.stop_scanner.set()
        self.notes.rescan_requested.set()
        for watcher in self.watchers.values():
            watcher.stop()
        for job in self.in_flight.values():
            # We are leaving them, not crashing on them: no poison count.
            self.ledger.set_running(job.job_id, running=False)
        self._publish()
        self.pool.shutdown(wait=not self.abandoned, cancel_futures=True)
        self.prober.shutdown(wait=False, cancel_futures=True)
        if not self.abandoned:
            self.transcriber.close()
            self.ledger.close()


__all__ = ["Daemon", "instance_dir", "instance_name"]
