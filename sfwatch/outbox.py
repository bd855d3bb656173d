"""The outbox: hooks, webhooks and notifications about finished files and the account.

docs/design.md §13 ("Integrations: the outbox") is the design; in short:

- **Durable first.** A finished file's events are rows of the ledger's ``outbox``
  table, written in the very transaction that marks the job done or failed
  (``Ledger.finished``); account events (``paused``, ``resumed``) are written when
  they happen. One row per (event, sink): sink ``hook``, ``webhook:<url>`` or
  ``notify``. A crash after the finish loses nothing: the rows are delivered after
  the restart (at least once).
- **Delivered apart.** One dispatcher thread picks due rows and hands them to
  lanes of their own, never an upload thread: ``hooks.concurrency`` threads run
  hooks as subprocesses, a few POST webhooks, one sends Apprise notifications.
  A row waits while an earlier row of the same sink and file is pending, so a
  receiver sees a file's events in order; other files go on.
- **Retried, then given up.** A failed delivery is tried again after a growing,
  jittered wait; after its sink's ``max_attempts`` it is recorded ``gave_up`` in
  the ledger and logged (``sfwatch.delivery_gave_up``).
- **Second to uploads.** While files wait for an upload slot and the daemon is
  CPU-bound (``pressure.Pressure``), a file's deliveries wait, up to ``YIELD_LIMIT``
  after their event: their CPU would come out of the uploads. Account events never
  wait.
- **Never the key.** A hook's environment is built from scratch (``hook_env``), a
  webhook's body and headers and a notification's text from the job's fields;
  nothing is inherited or copied wholesale, and everything goes through ``scrub``
  (the key's redactor) on its way out as a second guard.

This module routes events to sinks and runs the dispatcher and its lanes; running a
hook is hooks.py, a webhook's signature and secret webhooks.py, the Apprise sender and
its message notifications.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sfwatch import __version__
from sfwatch.backoff import full_jitter
from sfwatch.config import Config, WatchConfig
from sfwatch.errors import ConfigError, TransientError
from sfwatch.hooks import HookResult, hook_env, output_text, run_hook
from sfwatch.ledger import Ledger, OutboxEvent, OutboxRow
from sfwatch.logs import get_logger
from sfwatch.notifications import make_apprise, summary
from sfwatch.webhooks import cut_utf8, iso_time, read_secret, sign, url_for_log, webhook_target

#: the first retry waits about this long (seconds); each next one twice as long
RETRY_BASE = 5.0
#: ... up to this
RETRY_CAP = 1800.0
#: tries of one notification before it is given up
NOTIFY_MAX_ATTEMPTS = 8
#: threads that POST webhooks (a slow receiver holds one; the others go on)
WEBHOOK_THREADS = 4
#: rows handed out per look at the ledger
DISPATCH_BATCH = 64
#: the dispatcher looks at the ledger at least this often, even with nothing due
IDLE_WAIT = 60.0
#: ... and at most this often: wake-ups closer together are served by one look (and
#: the deliveries that ended meanwhile are marked in one transaction)
MIN_PASS = 0.05
#: delivered and given-up rows are forgotten after this long (seconds)
KEEP_SECONDS = 30 * 86400.0
#: a delivery that raised (a bug, the state disk) is looked at again after this long
COOL_DOWN = 5.0
#: a file's delivery yields to uploads at most this long after its event (seconds)
YIELD_LIMIT = 30.0
#: while deliveries yield, the dispatcher looks again this often (and not at each finish)
YIELD_CHECK = 1.0


def retry_delay(attempts: int, base: float = RETRY_BASE, cap: float = RETRY_CAP) -> float:
    """The wait after the ``attempts``-th failed delivery: half fixed, half full jitter.

    The fixed half keeps a failing receiver from being retried at once; the
    jittered half (backoff.py) spreads the retries of a burst of events.
    """
    step = min(cap, base * 2.0 ** max(0, min(attempts - 1, 30)))
    return step / 2 + full_jitter(attempts, base=base / 2, cap=cap / 2)


def _same(text: str) -> str:
    return text


# -- which sinks an event goes to -------------------------------------------------------------


class Routes:
    """Which outbox rows an event makes, given the config (docs/design.md §13)."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def for_job(self, watch: WatchConfig, event: str, fields: dict[str, Any]) -> list[OutboxEvent]:
        """The rows of a finished job: ``event`` is done or failed, ``fields`` job_finished's."""
        now = time.time()
        payload = {**fields, "event": event, "watch": str(watch.path)}
        ordering = str(fields["file"])
        job_id = str(fields["job_id"])
        rows: list[OutboxEvent] = []
        argv = self.config.hooks.for_watch(watch, event)
        if argv:
            target = {
                "argv": list(argv),
                "timeout_seconds": self.config.hooks.timeout_seconds,
                "max_attempts": self.config.hooks.max_attempts,
            }
            rows.append(OutboxEvent(event, "hook", ordering, job_id, target, payload, now))
        rows.extend(
            OutboxEvent(
                event, f"webhook:{hook.url}", ordering, job_id, webhook_target(hook), payload, now
            )
            for hook in self.config.webhooks
            if event in hook.events
        )
        if self.config.notify.urls and event in self.config.notify.on:
            rows.append(OutboxEvent(event, "notify", ordering, job_id, {}, payload, now))
        return rows

    def for_account(self, event: str, fields: dict[str, Any]) -> list[OutboxEvent]:
        """The rows of an account event: ``paused`` or ``resumed``."""
        now = time.time()
        payload = {**fields, "event": event}
        rows = [
            OutboxEvent(
                event, f"webhook:{hook.url}", "account", None, webhook_target(hook), payload, now
            )
            for hook in self.config.webhooks
            if event in hook.events
        ]
        if self.config.notify.urls and event in self.config.notify.on:
            rows.append(OutboxEvent(event, "notify", "account", None, {}, payload, now))
        return rows


# -- the dispatcher -----------------------------------------------------------------------------


#: rows a lane holds per thread (running or queued): enough for one dispatcher pass
LANE_DEPTH = 8


class _Lane:
    """A few daemon threads doing one kind of delivery; ``LANE_DEPTH`` rows a thread."""

    def __init__(self, name: str, size: int, work: Callable[[Any], None]) -> None:
        self.name = name
        self.size = size
        self.depth = size * LANE_DEPTH
        self.work = work
        self.items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.busy = 0
        self._lock = threading.Lock()
        self.log = get_logger()

    def start(self) -> None:
        for index in range(self.size):
            threading.Thread(
                target=self._run, name=f"sfwatch-{self.name}-{index}", daemon=True
            ).start()

    def room(self) -> bool:
        with self._lock:
            return self.busy < self.depth

    def put(self, item: Any) -> None:
        with self._lock:
            self.busy += 1
        self.items.put(item)

    def idle(self) -> bool:
        with self._lock:
            return self.busy == 0

    def stop(self) -> None:
        for _ in range(self.size):
            self.items.put(None)

    def _run(self) -> None:
        while (item := self.items.get()) is not None:
            try:
                self.work(item)
            except Exception:  # a bug of ours: logged, the lane goes on
                self.log.exception("sfwatch.outbox_error", lane=self.name)
            finally:
                with self._lock:
                    self.busy -= 1


def _kind(sink: str) -> str:
    if sink == "hook":
        return "hook"
    if sink.startswith("webhook:"):
        return "webhook"
    return "notify" if sink == "notify" else "unknown"


class Outbox:
    """Delivers the outbox's rows (docs/design.md §13): hooks, webhooks, notifications."""

    def __init__(
        self,
        config: Config,
        ledger: Ledger,
        *,
        instance: str = "local",
        backoff_base: float = 1.0,
        scrub: Callable[[str], str] = _same,
        yield_to: Callable[[], bool] | None = None,
        yield_limit: float = YIELD_LIMIT,
        idle_wait: float | None = None,
        run: str | None = None,
    ) -> None:
        self.config = config
        #: with worker processes, the run's id: they all tell account events (``account_event``)
        self.run = run
        #: the longest the dispatcher sleeps: short when other processes add rows
        self.idle_wait = IDLE_WAIT if idle_wait is None else idle_wait
        self.ledger = ledger
        self.instance = instance
        self.base = RETRY_BASE * backoff_base
        #: a second guard: the key replaced in everything sent (it should hold none)
        self.scrub = scrub
        self.routes = Routes(config)
        #: true while uploads should go first (``pressure.Pressure.busy``)
        self.yield_to = yield_to
        self.yield_limit = yield_limit
        #: file deliveries are being held back for the uploads
        self.yielding = False
        #: ... and none has waited its limit: the dispatcher need not wake at each finish
        self._all_held = False
        #: wakes the dispatcher while it holds rows back: an account event, a stop
        self._urgent = threading.Event()
        self.log = get_logger()
        self.host = socket.gethostname()
        self._secrets: dict[str, bytes] = {}
        for index, hook in enumerate(config.webhooks):
            if hook.secret_file is not None:
                where = f"webhooks[{index}].secret_file"
                self._secrets[str(hook.secret_file)] = read_secret(hook.secret_file, where)
        self.apprise = make_apprise(config.notify) if config.notify.urls else None
        self._posters = threading.local()  # a WebhookPoster per webhook thread
        self.wakeup = threading.Event()
        ledger.on_outbox = self.wakeup.set
        self._lock = threading.Lock()
        self._in_flight: set[int] = set()
        #: delivered, to be marked so by the dispatcher's next pass (in flight until then)
        self._delivered: list[int] = []
        self._cooling: dict[int, float] = {}
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._left: set[int] = set()  # hooks killed because the daemon stops: not their fault
        self._stopping = threading.Event()
        self._notify_busy = False
        self._last_notify = float("-inf")  # wall clock of the last message sent
        #: whether notification rows may exist (configured, or left by an earlier run)
        self._notify_rows = bool(config.notify.urls)
        self._lanes = {
            "hook": _Lane("hook", config.hooks.concurrency, self._deliver),
            "webhook": _Lane("webhook", WEBHOOK_THREADS, self._deliver),
            "notify": _Lane("notify", 1, self._notify),
        }
        self._thread: threading.Thread | None = None

    # -- events in ----------------------------------------------------------------------------

    def account_event(self, event: str, fields: dict[str, Any]) -> None:
        """The account paused or resumed (on the main thread); a ledger error is logged.

        With worker processes (``run``) each meets an account fault and its end, and
        each tells: what repeats the run's last told state is left out, so it is told once.
        """
        try:
            rows = self.routes.for_account(event, fields)
            if self.run is None:
                self.ledger.outbox_add(rows)
            else:
                self.ledger.account_told(self.run, event, fields.get("reason"), rows)
        except Exception:  # the state disk: the event is lost, the loop must go on
            self.log.exception("sfwatch.outbox_error", event_type=event)
        self._urgent.set()  # never held back (the commit woke the dispatcher otherwise)

    # -- the dispatcher thread ------------------------------------------------------------------

    def start(self) -> None:
        """Start delivering (rows left by an earlier run first)."""
        for lane in self._lanes.values():
            lane.start()
        self._thread = threading.Thread(target=self._run, name="sfwatch-outbox", daemon=True)
        self._thread.start()

    def idle(self) -> bool:
        """Nothing being delivered and nothing due now (``run --burst`` waits for this)."""
        with self._lock:
            if self._in_flight or self._notify_busy:
                return False
        now = time.time()
        if self.ledger.outbox_due(now, 1):
            return False
        return self._notify_wait(now) is None

    def stop(self, grace: float) -> None:
        """Stop: deliveries in flight get ``grace`` seconds, then hooks still running are
        killed. What did not finish stays pending in the ledger: it runs at the next start.
        """
        self._stopping.set()
        self.wakeup.set()
        self._urgent.set()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and not all(lane.idle() for lane in self._lanes.values()):
            time.sleep(0.02)
        with self._lock:
            procs = dict(self._procs)
            self._left.update(procs)
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for lane in self._lanes.values():
            lane.stop()
        if self._thread is not None:
            self._thread.join(1.0)
        with contextlib.suppress(Exception):  # the ledger's disk: they are delivered again
            self._mark_delivered()

    def _run(self) -> None:
        with contextlib.suppress(Exception):
            self.ledger.outbox_prune(time.time() - KEEP_SECONDS)
            # Notifications left by an earlier run, whatever the config says now.
            if self.ledger.outbox_gathered(float("inf")):
                self._notify_rows = True
        while not self._stopping.is_set():
            began = time.monotonic()
            try:
                wait = self._dispatch()
            except Exception:  # a bug, or the state disk: log, wait, go on
                self.log.exception("sfwatch.outbox_error")
                wait = COOL_DOWN
            if self._all_held:
                # Each finish would wake us to hold its rows back: look once a second,
                # or at once for an account event or a stop.
                self._urgent.wait(wait)
                self._urgent.clear()
            else:
                self.wakeup.wait(wait)
            # A burst of finishes is one look at the ledger, not one per file.
            self._stopping.wait(max(0.0, began + MIN_PASS - time.monotonic()))
            self.wakeup.clear()

    def _mark_delivered(self) -> None:
        """One transaction for the deliveries that ended since the last pass.

        Until then they stay in flight, so none is handed out again; a crash before
        this commit delivers them again after the restart (at least once).
        """
        with self._lock:
            done, self._delivered = self._delivered, []
        if not done:
            return
        try:
            self.ledger.outbox_delivered(done)
        except Exception:
            with self._lock:
                self._delivered.extend(done)
            raise
        with self._lock:
            self._in_flight.difference_update(done)

    def _dispatch(self) -> float:
        """Hand out what is due; return how long to sleep at most."""
        self._mark_delivered()
        now = time.time()
        mono = time.monotonic()
        with self._lock:
            self._cooling = {k: v for k, v in self._cooling.items() if v > mono}
            skip = [*self._in_flight, *self._cooling]
        self._yield_or_not()
        # Yielding, a file's rows wait until they are yield_limit old; the ledger leaves
        # out the younger ones, so however many wait, account events are never behind.
        files_before = now - self.yield_limit if self.yielding else None
        rows = self.ledger.outbox_due(now, DISPATCH_BATCH, skip, files_before=files_before)
        # Rows past their limit go at the usual pace (woken by each finish and lane), so a
        # long busy backlog never piles them up; with none, one look a second will do.
        self._all_held = self.yielding and not rows
        for row in rows:
            if self._stopping.is_set():
                break
            lane = self._lanes.get(_kind(row.sink))
            if lane is None:
                self.ledger.outbox_gave_up([row.id], f"unknown sink {row.sink!r}")
                continue
            if not lane.room():
                continue  # a lane finishing a row wakes us
            with self._lock:
                self._in_flight.add(row.id)
            lane.put(row)
        waits = [self.idle_wait]
        if (notify_wait := self._gather(now)) is not None:
            waits.append(notify_wait)
        if (due := self.ledger.outbox_next_due(now)) is not None:
            waits.append(due - now)
        if self._cooling:
            waits.append(COOL_DOWN)
        if self.yielding:
            waits.append(YIELD_CHECK)
        return max(0.01, min(waits))

    def _yield_or_not(self) -> None:
        """Decide whether file deliveries yield to uploads for this pass; log changes."""
        yielding = self.yield_to is not None and not self._stopping.is_set() and self.yield_to()
        if yielding != self.yielding:
            self.yielding = yielding
            self.log.debug(
                "sfwatch.deliveries_yield" if yielding else "sfwatch.deliveries_resume",
                limit_seconds=self.yield_limit,
            )

    def _notify_wait(self, now: float) -> float | None:
        """Seconds until gathered notifications may go (0: now); None: none are pending.

        A message goes once no new event came for ``gather_seconds`` (a burst is over)
        or the oldest has waited ``min_interval_seconds``, and never sooner than
        ``min_interval_seconds`` after the previous message.
        """
        if not self._notify_rows:
            return None
        gathered = self.ledger.outbox_gathered(now)
        if gathered is None:
            return None
        _, oldest, newest = gathered
        notify = self.config.notify
        ready = min(newest + notify.gather_seconds, oldest + notify.min_interval_seconds)
        ready = max(ready, self._last_notify + notify.min_interval_seconds)
        return max(0.0, ready - now)

    def _gather(self, now: float) -> float | None:
        """Send the gathered notifications if it is time; else how long until it is."""
        with self._lock:
            if self._notify_busy:
                return None
        wait = self._notify_wait(now)
        if wait is None or wait > 0 or self._stopping.is_set():
            return wait
        rows = self.ledger.outbox_pending("notify", now)
        if rows:
            with self._lock:
                self._notify_busy = True
            self._lanes["notify"].put(rows)
        return None

    # -- one delivery (on a lane's thread) ------------------------------------------------------

    def _deliver(self, row: OutboxRow) -> None:
        delivered = False
        try:
            if self._stopping.is_set():
                return  # pending still: the next start delivers it
            delivered = self._run_hook(row) if row.sink == "hook" else self._post(row)
        except Exception:
            with self._lock:
                self._cooling[row.id] = time.monotonic() + COOL_DOWN
            raise
        finally:
            with self._lock:
                if delivered:
                    self._delivered.append(row.id)  # in flight until marked (_mark_delivered)
                else:
                    self._in_flight.discard(row.id)
                self._procs.pop(row.id, None)
                self._left.discard(row.id)
            self.wakeup.set()

    def _failed(
        self,
        rows: Sequence[OutboxRow],
        error: str,
        max_attempts: int,
        retry_after: float | None = None,
    ) -> float | None:
        """Record a failed delivery; return the wait before the next try (None: gave up)."""
        ids = [row.id for row in rows]
        attempts = rows[0].attempts + 1
        if attempts >= max_attempts:
            self.ledger.outbox_gave_up(ids, error)
            first = rows[0]
            self.log.error(
                "sfwatch.delivery_gave_up",
                sink=_kind(first.sink),
                url=url_for_log(first.sink.partition(":")[2]) if first.sink != "hook" else None,
                event_type=first.event,
                job_id=first.job_id,
                file=first.payload.get("file"),
                events=len(rows),
                attempts=attempts,
                error=error,
            )
            return None
        delay = max(retry_after or 0.0, retry_delay(attempts, self.base))
        self.ledger.outbox_retry(ids, time.time() + delay, error)
        return delay

    def _text(self, row: OutboxRow) -> str:
        """A done job's transcript, from the ledger (it is never copied into the outbox)."""
        if row.job_id is None:
            return ""
        return self.ledger.text_of(row.job_id, str(row.payload.get("model") or "")) or ""

    def _run_hook(self, row: OutboxRow) -> bool:
        """Run a hook once; True when it exited 0 (the caller marks it delivered)."""
        target = row.target
        argv = [str(a) for a in target["argv"]]
        data = row.payload
        env = {name: self.scrub(value) for name, value in hook_env(row.event, data).items()}
        stdin = self.scrub(self._text(row)).encode() if row.event == "done" else b""

        def started(proc: subprocess.Popen[bytes]) -> None:
            with self._lock:
                self._procs[row.id] = proc
            if self._stopping.is_set():  # stop() may have looked before we registered
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with self._lock:
                    self._left.add(row.id)

        result = run_hook(argv, env, stdin, float(target["timeout_seconds"]), started=started)
        with self._lock:
            if row.id in self._left:
                return False  # killed because the daemon stops: it runs again at the next start
        fields: dict[str, Any] = {
            "job_id": row.job_id,
            "file": data.get("file"),
            "event_type": row.event,
            "hook": argv[0],
            "attempt": row.attempts + 1,
            "exit_status": result.returncode,
            "duration_ms": round(result.seconds * 1000),
            "stdout": output_text(result.stdout, result.stdout_bytes),
            "stderr": output_text(result.stderr, result.stderr_bytes),
            "stdout_bytes": result.stdout_bytes,
            "stderr_bytes": result.stderr_bytes,
        }
        if result.ok:
            self.log.info("sfwatch.hook_finished", **fields)
            return True
        problem = result.problem()
        wait = self._failed([row], problem, int(target["max_attempts"]))
        self.log.warning(
            "sfwatch.hook_failed",
            **fields,
            timed_out=result.timed_out,
            error=problem,
            retry_in=None if wait is None else round(wait, 1),
        )
        return False

    def _post(self, row: OutboxRow) -> bool:
        """POST a webhook once; True when it answered 2xx (the caller marks it delivered)."""
        target = row.target
        url = str(target["url"])
        data = dict(row.payload)
        data.pop("event", None)
        if row.event == "done":
            data["text"], data["text_truncated"] = cut_utf8(
                self._text(row), int(target["max_text_bytes"])
            )
        envelope = {
            "type": row.event,
            "timestamp": iso_time(row.created),
            "instance": self.instance,
            "data": data,
        }
        body = self.scrub(json.dumps(envelope, ensure_ascii=False)).encode()
        stamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"sfwatch/{__version__}",
            "webhook-id": row.event_id,
            "webhook-timestamp": str(stamp),
        }
        fields: dict[str, Any] = {
            "url": url_for_log(url),
            "event_type": row.event,
            "job_id": row.job_id,
            "file": data.get("file"),
            "webhook_id": row.event_id,
            "attempt": row.attempts + 1,
        }
        retry_after: float | None = None
        try:
            if target.get("secret_file"):
                headers["webhook-signature"] = sign(
                    self._secret(str(target["secret_file"])), row.event_id, stamp, body
                )
            posted = self._poster_for().post(url, body, headers, float(target["timeout_seconds"]))
        except (TransientError, ConfigError) as exc:
            error = str(exc)
        else:
            if 200 <= posted.status < 300:
                self.log.info("sfwatch.webhook_delivered", **fields, http_status=posted.status)
                return True
            fields["http_status"] = posted.status
            error = f"HTTP {posted.status}" + (f": {posted.message}" if posted.message else "")
            retry_after = posted.retry_after
        wait = self._failed([row], error, int(target["max_attempts"]), retry_after)
        self.log.warning(
            "sfwatch.webhook_failed",
            **fields,
            error=error,
            retry_in=None if wait is None else round(wait, 1),
        )
        return False

    def _secret(self, path: str) -> bytes:
        with self._lock:
            known = self._secrets.get(path)
        if known is None:  # a row from an earlier config: its file, read now
            known = read_secret(Path(path), "webhooks[].secret_file")
            with self._lock:
                self._secrets[path] = known
        return known

    def _poster_for(self) -> Any:
        """This thread's poster: it keeps its connection alive for the next POST."""
        poster = getattr(self._posters, "poster", None)
        if poster is None:
            from sfwatch.transcribe import WebhookPoster  # noqa: PLC0415 - httpx: only if needed

            poster = self._posters.poster = WebhookPoster()
        return poster

    def _notify(self, rows: list[OutboxRow]) -> None:
        """Send one message for every gathered notification event (a burst is one)."""
        try:
            if self._stopping.is_set():
                return
            if self.apprise is None:
                self.ledger.outbox_gave_up([r.id for r in rows], "notify.urls is empty now")
                return
            title, body, kind = summary(rows, self.host)
            sent = self.apprise.notify(
                title=self.scrub(title), body=self.scrub(body), notify_type=kind
            )
            self._last_notify = time.time()
            if sent:
                self.ledger.outbox_delivered([r.id for r in rows])
                self.log.info("sfwatch.notification_sent", events=len(rows), title=title)
                return
            error = "Apprise could not deliver to every URL (its log line says why)"
            wait = self._failed(rows, error, NOTIFY_MAX_ATTEMPTS)
            self.log.warning(
                "sfwatch.notification_failed",
                events=len(rows),
                error=error,
                retry_in=None if wait is None else round(wait, 1),
            )
        finally:
            with self._lock:
                self._notify_busy = False
            self.wakeup.set()


def check_integrations(config: Config) -> None:
    """What the config cannot check by itself: webhook secrets readable, Apprise URLs
    understood (and Apprise installed). ConfigError names the key (``check``, ``run``)."""
    for index, hook in enumerate(config.webhooks):
        if hook.secret_file is not None:
            read_secret(hook.secret_file, f"webhooks[{index}].secret_file")
    if config.notify.urls:
        make_apprise(config.notify)


__all__ = [
    "HookResult",
    "Outbox",
    "Routes",
    "check_integrations",
    "hook_env",
    "retry_delay",
    "run_hook",
    "sign",
    "summary",
]
