"""The ledger: what happened to every file, in SQLite (WAL) in ``state_dir``.

The file system says *where* each file is; the ledger says what is known about
it (attempts, the transcript, trace IDs, the plan of where finish puts things).
The orderings between the two are in docs/design.md §5; in short:

1. **claim**: the rename comes first, then the row. A crash in between leaves a
   claimed file without a row; recovery makes the row from the path.
2. **transcript**: the text is committed *before* anything is written for the
   user, so a crash after the upload never pays twice.
3. **plan**: the names finish will create are committed before it creates them;
   recovery compares them with the file system (docs/design.md §6).
4. **finished**: the row says ``done``/``failed`` after the files are in place,
   and in the same transaction the file's events go into the ``outbox`` (hooks,
   webhooks, notifications: docs/design.md §13), so no crash can finish a file
   without them; a dispatcher delivers them afterwards, at least once.

Durability (docs/design.md §4): what was paid for (transcripts, split parts),
plans and ``retried`` are written with ``synchronous=FULL`` and survive power
loss. Everything else is ``NORMAL``: it survives a crashed process, and what a
power loss could undo of it, start-up reconcile rebuilds from the file system
and the durable plan. ``sfwatch status`` and ``sfwatch retry`` open the same
file from another process while the daemon runs; WAL lets them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from sfwatch.commits import GroupCommit, Written
from sfwatch.job import Job, Plan
from sfwatch.logs import get_logger
from sfwatch.subtitles import Timing

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id       TEXT PRIMARY KEY,
    instance     TEXT NOT NULL,
    root         TEXT NOT NULL,
    rel          TEXT NOT NULL,
    sha256       TEXT,
    size         INTEGER NOT NULL,
    status       TEXT NOT NULL,       -- JobStatus: claimed (open) | done | failed | ...
    outcome      TEXT,                -- done | dedup | failed
    attempts     INTEGER NOT NULL DEFAULT 0,
    running      INTEGER NOT NULL DEFAULT 0,  -- a worker had it when we last heard
    crashes      INTEGER NOT NULL DEFAULT 0,  -- restarts that found it running
    next_attempt REAL,                -- wall-clock time of the next try
    last_error   TEXT,                -- JSON: reason, message, http_status, trace_id
    trace_ids    TEXT NOT NULL DEFAULT '[]',
    text         TEXT,                -- the transcript, once known
    transcript   TEXT,                -- where finish wrote (or will write) it
    final_path   TEXT,                -- where the original went
    audio_seconds REAL,
    parts        TEXT,                -- JSON: texts of finished parts (split uploads)
    created      REAL NOT NULL,
    updated      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_sha ON jobs (sha256);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, updated);
CREATE TABLE IF NOT EXISTS transcripts (
    sha256   TEXT NOT NULL,
    model    TEXT NOT NULL,
    text     TEXT NOT NULL,
    trace_id TEXT,
    created  REAL NOT NULL,
    PRIMARY KEY (sha256, model)
);
CREATE TABLE IF NOT EXISTS outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,  -- the order events happened in
    event_id     TEXT NOT NULL,        -- msg_…: webhook-id, the same on every retry
    event        TEXT NOT NULL,        -- done | failed | paused | resumed
    sink         TEXT NOT NULL,        -- hook | webhook:<url> | notify
    ordering     TEXT NOT NULL,        -- delivered in order per (sink, ordering): the file
    job_id       TEXT,                 -- null for account events
    target       TEXT NOT NULL,        -- JSON: how to deliver (argv, url, limits); no secret
    payload      TEXT NOT NULL,        -- JSON: the job_finished fields, or the account's
    status       TEXT NOT NULL DEFAULT 'pending',  -- pending | delivered | gave_up
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,        -- wall clock
    last_error   TEXT,
    created      REAL NOT NULL,
    updated      REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS outbox_once ON outbox (job_id, event, sink);
CREATE INDEX IF NOT EXISTS outbox_queue ON outbox (status, sink, ordering, id);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (status, next_attempt);
CREATE TABLE IF NOT EXISTS account (   -- what a run with workers last told of the account
    run     TEXT PRIMARY KEY,         -- workers.run_id: one `sfwatch run`, face and workers
    event   TEXT NOT NULL,            -- paused | resumed
    reason  TEXT,                     -- paused: why
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS daemon (
    instance TEXT PRIMARY KEY,
    pid      INTEGER,
    updated  REAL,
    state    TEXT                     -- JSON: queue, in flight, paused and why
);
"""

#: columns added after the first release (added to older ledgers on open)
ADDED_COLUMNS = {
    "plan": "TEXT",  # JSON job.Plan: where finish puts things (durable before acting)
    "stage": "TEXT",  # prepare | upload | finish: where a worker was when last heard
    "boot_id": "TEXT",  # the host's boot when stage was set (a host crash is no file's fault)
    "dirs": "TEXT",  # JSON: the watch's folders at claim time (recovery's roots)
    "work_path": "TEXT",  # where the claimed file is
    "inode": "INTEGER",
    "device": "INTEGER",
    "timing": "TEXT",  # JSON subtitles.Timing of the paid transcript (timed outputs)
    "part_timings": "TEXT",  # JSON: per finished part, its Timing (or null), as parts
}
#: columns added to ``transcripts`` after the first release
ADDED_TRANSCRIPT_COLUMNS = {
    "timing": "TEXT",  # JSON subtitles.Timing: a dedup can write srt/vtt/json too
}


class JobStatus(StrEnum):
    """Where a job stands in the ledger; only ``claimed`` is not final."""

    CLAIMED = "claimed"
    DONE = "done"
    FAILED = "failed"
    RETRIED = "retried"  # the failed original went back to its inbox (a new job follows)
    LOST = "lost"  # the claimed file disappeared (a person removed it)
    ADOPTED = "adopted"  # a sibling daemon took the claim over


#: every status but ``claimed``: nothing more happens to the job
TERMINAL = frozenset(JobStatus) - {JobStatus.CLAIMED}


@functools.cache
def boot_id() -> str:
    """This boot of the host (a restart of the daemon keeps it; a reboot changes it).

    Asked once per process (it cannot change while we run); every stage write uses it.
    """
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        # ProcSubset=pid (the unit's hardening) hides /proc/sys: the boot's wall-clock
        # time, to the minute (so that NTP steps of a few seconds do not change it).
        booted = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
        return f"booted-{round(booted / 60)}"


@dataclass(frozen=True)
class JobRow:
    """What the ledger knows about one job."""

    job_id: str
    root: str
    rel: str
    sha256: str | None
    status: str
    outcome: str | None
    attempts: int
    running: bool
    crashes: int
    last_error: dict[str, Any] | None
    trace_ids: tuple[str, ...]
    text: str | None
    transcript: str | None
    final_path: str | None
    updated: float
    size: int = 0
    plan: Plan | None = None
    stage: str | None = None
    boot_id: str | None = None
    dirs: dict[str, Any] | None = None
    work_path: str | None = None
    inode: int | None = None
    device: int | None = None
    #: the paid transcript's segments (timed outputs), with ``text``
    timing: Timing | None = None
    #: wall-clock time of the claim (``transcript_name``'s ``{date}``)
    created: float = 0.0
    #: the daemon (worker process) whose claim it is
    instance: str = ""


@dataclass(frozen=True)
class OutboxEvent:
    """One event for one sink, to be written to the outbox (docs/design.md §13)."""

    event: str
    sink: str
    ordering: str
    job_id: str | None
    target: dict[str, Any]
    payload: dict[str, Any]
    #: wall-clock time it may first be delivered (notifications wait to gather a burst)
    not_before: float


@dataclass(frozen=True)
class OutboxRow:
    """An outbox row as read back for delivery."""

    id: int
    event_id: str
    event: str
    sink: str
    ordering: str
    job_id: str | None
    target: dict[str, Any]
    payload: dict[str, Any]
    status: str
    attempts: int
    next_attempt: float
    last_error: str | None
    created: float


class OutboxStatus(StrEnum):
    """Where an outbox row stands; only ``pending`` is not final."""

    PENDING = "pending"
    DELIVERED = "delivered"
    GAVE_UP = "gave_up"


#: the ledger's file name in ``state_dir``
LEDGER_NAME = "ledger.sqlite3"


def make_private(path: Path) -> None:
    """The state folder 0700 and the ledger 0600: every transcript is in it.

    Made so whatever the umask; narrowed (with a warning) when an older version
    or a 0022 umask left them readable to others and they are ours to change.
    The ledger is only ever opened here to create it: closing any handle of a
    file drops every POSIX lock this process holds on it, SQLite's included.
    """
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        os.close(os.open(path, flags, 0o600))
    for what, mode in ((folder, 0o700), (path, 0o600)):
        st = what.stat()
        if st.st_mode & 0o077 and st.st_uid == os.geteuid():
            what.chmod(mode)
            get_logger().warning(
                "sfwatch.state_narrowed", path=str(what), was=oct(st.st_mode & 0o777)
            )


class Ledger:
    """One SQLite file shared by the daemon's threads (serialised by a lock)."""

    def __init__(self, path: Path) -> None:
        make_private(path)
        self.path = path
        #: called after a commit that added outbox rows (the dispatcher's wake-up)
        self.on_outbox: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=10, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        _wal(self._db)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=10000")
        with self._lock:
            self._db.executescript(SCHEMA)  # (executescript manages its own transaction)
            for table, added in (
                ("jobs", ADDED_COLUMNS),
                ("transcripts", ADDED_TRANSCRIPT_COLUMNS),
            ):
                have = {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}
                for name, kind in added.items():
                    if name not in have:
                        _add_column(self._db, table, name, kind)
        self._commits = GroupCommit(self._db, self._lock)
        # Reads have a connection of their own: in WAL mode they see every committed
        # write and never wait for a commit's fsync (which holds the writer's lock).
        self._read_lock = threading.Lock()
        self._reader = sqlite3.connect(
            path, timeout=10, check_same_thread=False, isolation_level=None
        )
        self._reader.row_factory = sqlite3.Row
        self._reader.execute("PRAGMA busy_timeout=10000")

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> Ledger:
        """The ledger file of a ``state_dir``."""
        return cls(state_dir / LEDGER_NAME)

    def close(self) -> None:
        """Close the database."""
        self._commits.close()  # what was queued is committed first
        with self._read_lock:
            self._reader.close()
        with self._lock:
            self._db.close()

    def _write(self, op: Callable[[sqlite3.Connection], T], *, durable: bool = False) -> T:
        """``op`` in a transaction, committed (and if ``durable`` fsynced) when this
        returns; several threads' writes share commits (commits.py)."""
        return self._commits.write(op, durable=durable)

    def _write_later(self, op: Callable[[sqlite3.Connection], Any]) -> Written:
        """``op`` queued for the next commit; returns at once (commits.py)."""
        return self._commits.write_later(op)

    def start_writer(self) -> None:
        """Start the thread that commits queued writes nobody waits for."""
        self._commits.start_writer()

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._read_lock:
            return list(self._reader.execute(sql, args))

    # -- the daemon's writes -------------------------------------------------------

    def claimed(
        self,
        job: Job,
        instance: str,
        dirs: dict[str, Any] | None = None,
        *,
        stage: str | None = None,
    ) -> JobRow:
        """Record a claim (or find the row of a resumed one); return the row.

        ``dirs``: the watch's folders now, so that recovery can finish the job
        even after its folder left the config. ``stage``: a new row starts with
        a worker already at that stage (``set_stage`` in the same write).
        """
        return _row(self._write(self._insert_claim(job, instance, dirs, stage)))

    def claimed_later(
        self, job: Job, instance: str, dirs: dict[str, Any] | None = None, *, stage: str
    ) -> Written:
        """``claimed`` for a fresh claim, without waiting for its commit (``Written.wait``).

        The row is not needed on the way to the upload: a crash before it is committed
        leaves a claimed file without a row, which recovery handles (design §5.1).
        """
        return self._write_later(self._insert_claim(job, instance, dirs, stage))

    @staticmethod
    def _insert_claim(
        job: Job, instance: str, dirs: dict[str, Any] | None, stage: str | None
    ) -> Callable[[sqlite3.Connection], sqlite3.Row]:
        now = time.time()

        def insert(db: sqlite3.Connection) -> sqlite3.Row:
            db.execute(
                "INSERT OR IGNORE INTO jobs (job_id, instance, root, rel, sha256, size, status,"
                " created, updated, dirs, work_path, inode, device, running, stage, boot_id)"
                " VALUES (?, ?, ?, ?, ?, ?, 'claimed', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.job_id,
                    instance,
                    str(job.root),
                    str(job.rel),
                    job.sha256,
                    job.signature.size,
                    now,
                    now,
                    json.dumps(dirs) if dirs else None,
                    str(job.path),
                    job.signature.inode,
                    job.signature.device,
                    int(stage is not None),
                    stage,
                    boot_id() if stage is not None else None,
                ),
            )
            row: sqlite3.Row = db.execute(
                "SELECT * FROM jobs WHERE job_id = ?", (job.job_id,)
            ).fetchone()
            return row

        return insert

    def set_stage(self, job_id: str, stage: str | None) -> None:
        """A worker is at ``stage`` of the job (None: it let go of it).

        A restart that finds a job in ``prepare`` on the same boot may blame the
        file (PyAV crashing or hanging on it); any other stage is not its fault.
        """
        self._update(job_id, running=int(stage is not None), stage=stage, boot_id=boot_id())

    def set_stage_later(self, job_id: str, stage: str) -> Written:
        """``set_stage`` without waiting for its commit (a later write commits after it)."""
        fields = {"running": 1, "stage": stage, "boot_id": boot_id()}
        return self._write_later(lambda db: self._set(db, job_id, **fields))

    def crashed(self, job_id: str) -> int:
        """A restart found the job running: count it; return the count."""

        def count(db: sqlite3.Connection) -> int:
            db.execute(
                "UPDATE jobs SET crashes = crashes + 1, running = 0, stage = NULL, updated = ?"
                " WHERE job_id = ?",
                (time.time(), job_id),
            )
            (crashes,) = db.execute(
                "SELECT crashes FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
            return int(crashes)

        return self._write(count)

    def attempt_failed(self, job: Job, error: dict[str, Any], next_attempt: float) -> None:
        """An upload failed; the job waits until ``next_attempt`` (wall clock)."""
        self._update(
            job.job_id,
            attempts=job.attempts,
            last_error=json.dumps(error),
            trace_ids=json.dumps(list(job.trace_ids)),
            next_attempt=next_attempt,
            running=0,
        )

    def transcribed(
        self, job: Job, model: str, trace_id: str | None, *, plan: Plan | None = None
    ) -> None:
        """The transcript is known: durable before anything is written for the user.

        ``plan``: finish's names, recorded in the same durable write (``planned``
        without a second fsync), with the worker at stage finish.
        """
        assert job.text is not None  # noqa: S101 - called only with a transcript
        now = time.time()
        timing = job.timing.to_json() if job.timing is not None else None

        def record(db: sqlite3.Connection) -> None:
            if job.sha256:
                db.execute(
                    "INSERT OR REPLACE INTO transcripts (sha256, model, text, trace_id, created,"
                    " timing) VALUES (?, ?, ?, ?, ?, ?)",
                    (job.sha256, model, job.text, trace_id, now, timing),
                )
            db.execute(
                "UPDATE jobs SET text = ?, timing = ?, sha256 = ?, attempts = ?, trace_ids = ?,"
                " updated = ? WHERE job_id = ?",
                (
                    job.text,
                    timing,
                    job.sha256,
                    job.attempts,
                    json.dumps(list(job.trace_ids)),
                    now,
                    job.job_id,
                ),
            )
            if plan is not None:
                self._set(db, job.job_id, stage="finish", running=1, **_plan_fields(plan))

        self._write(record, durable=True)  # what we paid for must never be paid again

    def part_done(
        self, job_id: str, texts: list[str], timings: Sequence[Timing | None] = ()
    ) -> None:
        """The transcripts of the parts finished so far (durable: they were paid for).

        ``timings``: each part's segments (times within the part), when asked for.
        """
        stored = [t.to_dict() if t is not None else None for t in timings]
        self._update(job_id, durable=True, parts=json.dumps(texts), part_timings=json.dumps(stored))

    def part_timings(self, job_id: str) -> list[Timing | None]:
        """The segments of the parts finished so far (None for a part without them)."""
        rows = self._query("SELECT part_timings FROM jobs WHERE job_id = ?", (job_id,))
        if not rows or rows[0]["part_timings"] is None:
            return []
        return [Timing.from_dict(item) for item in json.loads(rows[0]["part_timings"])]

    def parts(self, job_id: str) -> list[str]:
        """Texts of the parts finished so far."""
        rows = self._query("SELECT parts FROM jobs WHERE job_id = ?", (job_id,))
        if not rows or rows[0]["parts"] is None:
            return []
        loaded = json.loads(rows[0]["parts"])
        return [str(t) for t in loaded]

    def planned(self, job: Job, plan: Plan) -> None:
        """finish chose these names (durable: the files come next)."""
        self._update(
            job.job_id,
            durable=True,
            **_plan_fields(plan),
            sha256=job.sha256,
            attempts=job.attempts,
            trace_ids=json.dumps(list(job.trace_ids)),
        )

    def finished(
        self,
        job: Job,
        outcome: str,
        *,
        final_path: Path,
        transcript: Path | None = None,
        error: dict[str, Any] | None = None,
        audio_seconds: float | None = None,
        events: Sequence[OutboxEvent] = (),
    ) -> None:
        """The job is over: done (or dedup) or failed; its ``events`` join the outbox.

        One transaction: a crash leaves either an open row (recovery finishes it,
        and records the events then) or a finished row with its events, never a
        finished file whose hooks and webhooks nobody will run (§13).
        """

        def record(db: sqlite3.Connection) -> None:
            self._set(
                db,
                job.job_id,
                status=JobStatus.FAILED if outcome == "failed" else JobStatus.DONE,
                outcome=outcome,
                attempts=job.attempts,
                running=0,
                stage=None,
                final_path=str(final_path),
                transcript=str(transcript) if transcript else None,
                last_error=json.dumps(error) if error else None,
                trace_ids=json.dumps(list(job.trace_ids)),
                audio_seconds=audio_seconds,
            )
            _insert_events(db, events)

        self._write(record)
        if events and self.on_outbox is not None:
            self.on_outbox()

    def lost(
        self, job_id: str, why: str, status: JobStatus = JobStatus.LOST, *, instance: str = ""
    ) -> None:
        """The claimed file is gone from the work area: removed, or adopted by a sibling.

        Only an open row changes; an adopted one only while it is still ``instance``'s:
        in a ledger shared by worker processes the adopter has taken the row over
        (``take_over``), and may have finished it.
        """
        error = json.dumps({"reason": "vanished", "message": why})

        def record(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE jobs SET status = ?, running = 0, stage = NULL, last_error = ?,"
                " updated = ? WHERE job_id = ? AND status = 'claimed'"
                " AND (? = '' OR instance = ?)",
                (status, error, time.time(), job_id, instance, instance),
            )

        self._write(record)

    def open_jobs(self, skip: Callable[[str], bool] | None = None) -> list[JobRow]:
        """Every job not yet final (reconciled against the file system at start-up), but
        those of instances ``skip`` says are not ours (other worker processes')."""
        rows = self._query("SELECT * FROM jobs WHERE status = 'claimed'")
        return [_row(r) for r in rows if skip is None or not skip(r["instance"])]

    def take_over(self, job_id: str, instance: str) -> None:
        """An adopted job's row is now ``instance``'s (a ledger shared by worker processes)."""
        self._update(job_id, instance=instance)

    def _update(self, job_id: str, *, durable: bool = False, **fields: Any) -> None:
        self._write(lambda db: self._set(db, job_id, **fields), durable=durable)

    @staticmethod
    def _set(db: sqlite3.Connection, job_id: str, **fields: Any) -> None:
        fields["updated"] = time.time()
        names = ", ".join(f"{name} = ?" for name in fields)
        db.execute(
            f"UPDATE jobs SET {names} WHERE job_id = ?",  # noqa: S608 - names are ours
            (*fields.values(), job_id),
        )

    # -- the outbox (docs/design.md §13) ----------------------------------------------------

    def outbox_add(self, events: Sequence[OutboxEvent]) -> None:
        """Events not tied to a file's finish (the account paused, resumed)."""
        if not events:
            return
        self._write(lambda db: _insert_events(db, events))
        if self.on_outbox is not None:
            self.on_outbox()

    def account_told(
        self, run: str, event: str, reason: str | None, events: Sequence[OutboxEvent]
    ) -> bool:
        """An account event of a run with worker processes, each of which meets the
        fault and its end: ``events`` join the outbox unless the run's last told state
        is this one (``paused`` for the same reason, or ``resumed``); False if so.

        The run's state is kept whatever the sinks subscribe to (a sink told of pauses
        only must hear the next pause after a resume), and only the run's own: a
        pause a stopped run never saw end does not hush the next run's.
        """

        def tell(db: sqlite3.Connection) -> bool:
            last = db.execute("SELECT event, reason FROM account WHERE run = ?", (run,)).fetchone()
            if last is not None and last[0] == event and (event != "paused" or last[1] == reason):
                return False
            db.execute("DELETE FROM account WHERE run != ?", (run,))  # (runs that ended)
            row = (run, event, reason, time.time())
            db.execute("INSERT OR REPLACE INTO account VALUES (?, ?, ?, ?)", row)
            _insert_events(db, events)
            return True

        told = self._write(tell)
        if told and events and self.on_outbox is not None:
            self.on_outbox()
        return told

    def outbox_due(
        self,
        now: float,
        limit: int,
        skip: Sequence[int] = (),
        *,
        files_before: float | None = None,
    ) -> list[OutboxRow]:
        """Rows to deliver now, oldest first: per (sink, ordering) only the first pending.

        A row whose predecessor of the same sink and file is still pending (in flight,
        or waiting for a retry) waits: a file's events reach a sink in order.
        Notifications are not here: they go out gathered (``outbox_gathered``).
        ``files_before``: of a file's events only those created before it (the others
        yield to uploads: outbox.py); account events always.
        """
        rows = self._query(
            "SELECT * FROM outbox AS o WHERE o.status = 'pending' AND o.sink != 'notify'"
            " AND o.next_attempt <= ? AND (o.job_id IS NULL OR o.created <= ?)"
            " AND NOT EXISTS (SELECT 1 FROM outbox AS p"
            " WHERE p.status = 'pending' AND p.sink = o.sink AND p.ordering = o.ordering"
            " AND p.id < o.id) ORDER BY o.id LIMIT ?",
            (now, float("inf") if files_before is None else files_before, limit + len(skip)),
        )
        skipped = set(skip)
        return [_outbox_row(r) for r in rows if r["id"] not in skipped][:limit]

    def outbox_next_due(self, now: float) -> float | None:
        """The earliest wall-clock time a pending row waits for, after ``now``."""
        rows = self._query(
            "SELECT min(next_attempt) AS t FROM outbox WHERE status = 'pending'"
            " AND next_attempt > ?",
            (now,),
        )
        value = rows[0]["t"] if rows else None
        return float(value) if value is not None else None

    def outbox_gathered(self, now: float) -> tuple[int, float, float] | None:
        """Pending notifications that may go now: (count, oldest, newest ``created``)."""
        rows = self._query(
            "SELECT count(*) AS n, min(created) AS oldest, max(created) AS newest FROM outbox"
            " WHERE status = 'pending' AND sink = 'notify' AND next_attempt <= ?",
            (now,),
        )
        if not rows or not rows[0]["n"]:
            return None
        return int(rows[0]["n"]), float(rows[0]["oldest"]), float(rows[0]["newest"])

    def outbox_pending(self, sink: str, now: float) -> list[OutboxRow]:
        """Every pending row of ``sink`` that may go now, oldest first."""
        rows = self._query(
            "SELECT * FROM outbox WHERE status = 'pending' AND sink = ? AND next_attempt <= ?"
            " ORDER BY id",
            (sink, now),
        )
        return [_outbox_row(r) for r in rows]

    def outbox_delivered(self, ids: Sequence[int]) -> None:
        """These rows reached their sink (a hook exited 0, a webhook answered 2xx)."""
        self._outbox_set(ids, "status = 'delivered', attempts = attempts + 1", ())

    def outbox_retry(self, ids: Sequence[int], next_attempt: float, error: str) -> None:
        """A failed delivery: try again at ``next_attempt`` (wall clock)."""
        self._outbox_set(
            ids, "attempts = attempts + 1, next_attempt = ?, last_error = ?", (next_attempt, error)
        )

    def outbox_gave_up(self, ids: Sequence[int], error: str) -> None:
        """The last allowed delivery failed: recorded, and never tried again."""
        self._outbox_set(
            ids, "status = 'gave_up', attempts = attempts + 1, last_error = ?", (error,)
        )

    def _outbox_set(self, ids: Sequence[int], assignments: str, args: tuple[Any, ...]) -> None:
        if not ids:
            return
        marks = ", ".join("?" for _ in ids)
        sql = (
            f"UPDATE outbox SET {assignments}, updated = ?"  # noqa: S608 - ours
            f" WHERE id IN ({marks}) AND status = 'pending'"
        )
        self._write(lambda db: db.execute(sql, (*args, time.time(), *ids)))

    def outbox_rows(self, job_id: str | None = None) -> list[OutboxRow]:
        """Every outbox row (of one job), oldest first."""
        if job_id is None:
            rows = self._query("SELECT * FROM outbox ORDER BY id")
        else:
            rows = self._query("SELECT * FROM outbox WHERE job_id = ? ORDER BY id", (job_id,))
        return [_outbox_row(r) for r in rows]

    def outbox_counts(self) -> dict[str, int]:
        """Outbox rows by status (pending, delivered, gave_up)."""
        rows = self._query("SELECT status, count(*) AS n FROM outbox GROUP BY status")
        return {str(r["status"]): int(r["n"]) for r in rows}

    def outbox_prune(self, before: float) -> None:
        """Forget delivered and given-up rows last touched before ``before``."""
        self._write(
            lambda db: db.execute(
                "DELETE FROM outbox WHERE status != 'pending' AND updated < ?", (before,)
            )
        )

    # -- questions -----------------------------------------------------------------

    def known_text(self, sha256: str, model: str) -> str | None:
        """A transcript already paid for, for this content and model."""
        known = self.known(sha256, model)
        return known[0] if known is not None else None

    def known(self, sha256: str, model: str) -> tuple[str, Timing | None] | None:
        """A transcript already paid for, for this content and model, with its segments."""
        rows = self._query(
            "SELECT text, timing FROM transcripts WHERE sha256 = ? AND model = ?", (sha256, model)
        )
        if not rows:
            return None
        return str(rows[0]["text"]), Timing.from_json(rows[0]["timing"])

    def text_of(self, job_id: str, model: str) -> str | None:
        """A finished job's transcript: its own, or (dedup) the one paid for its content."""
        rows = self._query(
            "SELECT coalesce(j.text, t.text) AS text FROM jobs AS j LEFT JOIN transcripts AS t"
            " ON t.sha256 = j.sha256 AND t.model = ? WHERE j.job_id = ?",
            (model, job_id),
        )
        return str(rows[0]["text"]) if rows and rows[0]["text"] is not None else None

    def job(self, job_id: str) -> JobRow | None:
        """The row of one job."""
        rows = self._query("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        return _row(rows[0]) if rows else None

    def counts(self) -> dict[str, int]:
        """Jobs by where they stand: done, dedup, failed, claimed (open), retried, lost."""
        rows = self._query(
            "SELECT CASE WHEN status IN ('done', 'failed') THEN outcome ELSE status END AS k,"
            " count(*) AS n FROM jobs GROUP BY k"
        )
        return {str(r["k"]): int(r["n"]) for r in rows}

    def recent_failures(self, limit: int = 10) -> list[JobRow]:
        """The last failed jobs, newest first."""
        rows = self._query(
            "SELECT * FROM jobs WHERE status = 'failed' ORDER BY updated DESC LIMIT ?", (limit,)
        )
        return [_row(r) for r in rows]

    def failed_jobs(self) -> list[JobRow]:
        """Every job whose original sits in failed/, oldest first."""
        rows = self._query("SELECT * FROM jobs WHERE status = 'failed' ORDER BY updated, rowid")
        return [_row(r) for r in rows]

    def retried(self, job_id: str) -> None:
        """The failed original went back to its inbox (durable: the file has moved)."""
        self._update(job_id, durable=True, status=JobStatus.RETRIED)

    # -- the daemon's live state, for `sfwatch status` ----------------------------------

    def publish_state(self, instance: str, pid: int, state: dict[str, Any]) -> None:
        """Store what the running daemon is doing (queue, in flight, pause)."""
        row = (instance, pid, time.time(), json.dumps(state))
        self._write(lambda db: db.execute("INSERT OR REPLACE INTO daemon VALUES (?, ?, ?, ?)", row))

    def forget_states(self, instances: Collection[str]) -> None:
        """Remove the published states of ``instances`` (workers a run no longer has)."""
        rows = [(instance,) for instance in instances]
        self._write(lambda db: db.executemany("DELETE FROM daemon WHERE instance = ?", rows))

    def daemon_states(self) -> list[dict[str, Any]]:
        """What each daemon that used this ledger last published."""
        out = []
        for row in self._query("SELECT * FROM daemon"):
            state = json.loads(row["state"] or "{}")
            out.append(
                {"instance": row["instance"], "pid": row["pid"], "updated": row["updated"], **state}
            )
        return out


def _wal(db: sqlite3.Connection, wait: float = 10.0) -> None:
    """Put the ledger in WAL mode. Another process turning a new ledger to WAL at the
    same moment (a worker: workers.py) makes SQLite answer "locked" at once, without
    its busy wait: so wait here, briefly and a few times."""
    deadline = time.monotonic() + wait
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
        else:
            return


def _add_column(db: sqlite3.Connection, table: str, name: str, kind: str) -> None:
    """``ALTER TABLE … ADD COLUMN``, unless another process (a worker: workers.py) that
    opened the ledger at the same moment has just added it."""
    try:
        db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
    except sqlite3.OperationalError as exc:
        if "duplicate column" not in str(exc):
            raise


def _plan_fields(plan: Plan) -> dict[str, Any]:
    """The columns a plan sets."""
    return {
        "plan": plan.to_json(),
        "transcript": str(plan.transcript) if plan.transcript else None,
    }


def _insert_events(db: sqlite3.Connection, events: Sequence[OutboxEvent]) -> None:
    """Add ``events`` to the outbox; an event already there (a finish run twice) once."""
    now = time.time()
    for event in events:
        db.execute(
            "INSERT OR IGNORE INTO outbox (event_id, event, sink, ordering, job_id, target,"
            " payload, next_attempt, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                "msg_" + secrets.token_hex(12),
                event.event,
                event.sink,
                event.ordering,
                event.job_id,
                json.dumps(event.target, ensure_ascii=False),
                json.dumps(event.payload, ensure_ascii=False),
                event.not_before,
                now,
                now,
            ),
        )


def _outbox_row(row: sqlite3.Row) -> OutboxRow:
    return OutboxRow(
        id=int(row["id"]),
        event_id=row["event_id"],
        event=row["event"],
        sink=row["sink"],
        ordering=row["ordering"],
        job_id=row["job_id"],
        target=json.loads(row["target"]),
        payload=json.loads(row["payload"]),
        status=row["status"],
        attempts=int(row["attempts"]),
        next_attempt=float(row["next_attempt"]),
        last_error=row["last_error"],
        created=float(row["created"]),
    )


def _row(row: sqlite3.Row) -> JobRow:
    return JobRow(
        instance=row["instance"],
        job_id=row["job_id"],
        root=row["root"],
        rel=row["rel"],
        sha256=row["sha256"],
        status=row["status"],
        outcome=row["outcome"],
        attempts=int(row["attempts"]),
        running=bool(row["running"]),
        crashes=int(row["crashes"]),
        last_error=json.loads(row["last_error"]) if row["last_error"] else None,
        trace_ids=tuple(json.loads(row["trace_ids"] or "[]")),
        text=row["text"],
        transcript=row["transcript"],
        final_path=row["final_path"],
        updated=float(row["updated"]),
        size=int(row["size"]),
        plan=Plan.from_json(row["plan"]) if row["plan"] else None,
        stage=row["stage"],
        boot_id=row["boot_id"],
        dirs=json.loads(row["dirs"]) if row["dirs"] else None,
        work_path=row["work_path"],
        inode=row["inode"],
        device=row["device"],
        timing=Timing.from_json(row["timing"]),
        created=float(row["created"]),
    )
