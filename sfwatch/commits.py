"""Group commit for the ledger: many threads' writes in few transactions.

Writers that arrive while a commit is under way queue up; when it ends, the
committing thread hands the next commit to the first writer that waits, which
commits the whole queue in one transaction, each op in a savepoint of its own
(an op that raises is undone alone, and raises in its own thread). Ops queued
without waiting (``write_later``: what nothing needs before an upload) are
committed by whoever commits next, else by a writer thread of its own. Every op
returns (or ``Written.wait`` returns) only after its commit: that is all the
orderings of docs/design.md §5 rely on. Each op has an event of its own, so a
commit wakes its own writers only, never every thread waiting.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

T = TypeVar("T")


@dataclass(eq=False)
class _Pending:
    """One write waiting for a group commit (``Ledger._write``)."""

    op: Callable[[sqlite3.Connection], Any]
    durable: bool
    #: its writer waits for it (and may be handed the next commit)
    waited: bool = True
    result: Any = None
    error: Exception | None = None
    finished: bool = False
    committed: bool = False
    #: set when it is finished, or (a waited op) when its writer is to commit next
    wake: threading.Event = field(default_factory=threading.Event)

    def outcome(self) -> Any:
        """What the op returned; its error raised (or that it was never committed)."""
        if self.error is not None:
            raise self.error
        if not self.committed:  # the committing thread was interrupted
            raise sqlite3.OperationalError("the ledger write was not committed")
        return self.result


class Written:
    """A write queued by ``Ledger._write_later``."""

    def __init__(self, pending: _Pending) -> None:
        self._pending = pending

    def wait(self) -> None:
        """Until it is committed; raise what it raised (sqlite3.Error: not written)."""
        self._pending.wake.wait()
        self._pending.outcome()


class GroupCommit:
    """The writes of one SQLite connection (``db``, used under ``lock``)."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self.db = db
        self.lock = lock
        #: the ops queued, and whether a thread is committing
        self._queue_lock = threading.Lock()
        self._waiting: list[_Pending] = []
        self._committing = False
        #: the thread that commits queued ops nobody waits for, and its turn to
        self._writer: threading.Thread | None = None
        self._writer_wake = threading.Event()
        self._writer_turn = False
        self._closing = False

    def close(self) -> None:
        """Commit what is queued, then stop the writer thread."""
        with self._queue_lock:
            self._closing = True
            if self._waiting and not self._committing:
                self._committing = self._writer_turn = True
        self._writer_wake.set()
        if self._writer is not None:
            self._writer.join(10)

    def write(self, op: Callable[[sqlite3.Connection], T], *, durable: bool = False) -> T:
        """Run ``op`` in a transaction and return what it returned; committed (and, if
        ``durable``, fsynced) before this returns.

        Group commit: writers that arrive while a commit is under way queue up; when
        it ends, the committing thread hands the next commit to the first of them,
        which commits the whole queue in one transaction, each op in a savepoint of
        its own (an op that raises is undone alone and raises in its caller). With
        32 upload threads this turns hundreds of commits a second, each taking the
        lock and many an fsync, into a few dozen, with the same orderings: an op
        returns only after its commit, which is all the orderings in docs/design.md
        §5 rely on. ``durable`` ops make their batch's commit ``synchronous=FULL``;
        the others ride along. Each op has an event of its own, so a commit wakes
        only its own writers (not every thread waiting).
        """
        pending = _Pending(op, durable)
        with self._queue_lock:
            self._waiting.append(pending)
            lead = not self._committing
            self._committing = True
        if not lead:
            pending.wake.wait()  # finished by another commit, or our turn to commit
        if not pending.finished:
            self._lead()
        return cast("T", pending.outcome())

    def write_later(self, op: Callable[[sqlite3.Connection], Any]) -> Written:
        """Queue ``op`` for the next commit and return at once (``Written.wait`` waits).

        For writes nothing needs before the upload: they leave the way to it. Queued
        ops are committed in order, before or with any write queued after them, by
        whoever commits next, else by the writer thread.
        """
        pending = _Pending(op, durable=False, waited=False)
        with self._queue_lock:
            self.start_writer()
            self._waiting.append(pending)
            if not self._committing:
                self._committing = self._writer_turn = True
                self._writer_wake.set()
        return Written(pending)

    def _lead(self) -> None:
        """Commit everything queued (this thread's turn), then hand the next turn on."""
        with self._queue_lock:
            batch, self._waiting = self._waiting, []
        try:
            self._commit(batch)
        finally:
            for item in batch:
                item.finished = True
                item.wake.set()
            with self._queue_lock:
                after = next((p for p in self._waiting if p.waited), None)
                if after is not None:
                    after.wake.set()  # its writer commits next (``_committing`` stays)
                elif self._waiting:
                    self._writer_turn = True  # only queued ops: the writer thread's turn
                    self._writer_wake.set()
                else:
                    self._committing = False
                    if self._closing:
                        self._writer_wake.set()

    def start_writer(self) -> None:
        """Start the thread that commits queued ops nobody waits for (if not yet running).

        The daemon starts it with the ledger. It commits only when no waiting writer
        will, so that a write someone waits for is committed on that writer's own
        thread (where its errors belong).
        """
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._write_queued, name="sfwatch-ledger", daemon=True
            )
            self._writer.start()

    def _write_queued(self) -> None:
        while True:
            self._writer_wake.wait()
            self._writer_wake.clear()
            with self._queue_lock:
                turn, self._writer_turn = self._writer_turn, False
            if turn:
                self._lead()
            with self._queue_lock:
                if self._closing and not self._committing and not self._waiting:
                    return

    def _commit(self, batch: list[_Pending]) -> None:
        """One transaction for ``batch`` (see ``_write``)."""
        with self.lock:
            try:
                durable = any(item.durable for item in batch)
                self.db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self.db.execute("BEGIN IMMEDIATE")
                for item in batch:
                    self.db.execute("SAVEPOINT op")
                    try:
                        item.result = item.op(self.db)
                    except Exception as exc:  # noqa: BLE001 - raised again in the op's thread
                        self.db.execute("ROLLBACK TO op")
                        item.error = exc
                    self.db.execute("RELEASE op")
                self.db.execute("COMMIT")
            except sqlite3.Error as exc:  # (a full disk): nothing of the batch was kept
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
                for item in batch:
                    item.error = item.error or exc
                return
            for item in batch:
                item.committed = item.error is None


__all__ = ["GroupCommit", "Written"]
