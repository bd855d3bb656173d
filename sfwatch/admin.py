"""``sfwatch status`` and ``sfwatch retry``: read and act on the ledger from outside.

Both are safe while the daemon runs: the ledger is SQLite in WAL mode (readers
never block the daemon), and ``retry`` only moves files back into an inbox,
where the daemon picks them up like any new file, as a new job with no attempts.
``retry`` takes only files whose job the ledger shows as ``failed``: the daemon
writes that last, after the original and its error file are in place, so a file
it is still finishing is never moved from under it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pwd
import stat
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sfwatch import safefs
from sfwatch.config import Config, WatchConfig
from sfwatch.errors import SfwatchError
from sfwatch.finish import ERROR_SUFFIX
from sfwatch.fsutil import move_no_replace_at, numbered
from sfwatch.ledger import LEDGER_NAME, JobRow, Ledger
from sfwatch.text import printable

#: a daemon that has not published for this long is reported as not running
STALE_AFTER = 75.0  # the daemon rewrites an unchanged status every 30 s


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status_report(config: Config) -> dict[str, Any]:
    """Everything ``sfwatch status`` shows, as data."""
    ledger = Ledger.in_state_dir(config.state_dir)
    try:
        daemons = []
        for state in ledger.daemon_states():
            age = time.time() - float(state.get("updated") or 0)
            running = age < STALE_AFTER and _pid_alive(int(state.get("pid") or 0))
            state.pop("metrics", None)  # a worker's counters, for its face's /metrics
            daemons.append({**state, "running": running, "age_seconds": round(age, 1)})
        failures = [_failure(row) for row in ledger.recent_failures(10)]
        return {
            "ledger": str(ledger.path),
            "daemons": daemons,
            "counts": ledger.counts(),
            "recent_failures": failures,
            # hooks, webhooks, notifications (docs/design.md §13): pending, delivered, gave_up
            "deliveries": ledger.outbox_counts(),
        }
    finally:
        ledger.close()


def _failure(row: JobRow) -> dict[str, Any]:
    error = row.last_error or {}
    return {
        "file": str(Path(row.root) / row.rel),
        "failed_path": row.final_path,
        "reason": error.get("reason"),
        "http_status": error.get("http_status"),
        "message": error.get("api_message") or error.get("message"),
        "trace_id": error.get("trace_id") or next((t for t in reversed(row.trace_ids) if t), None),
        "attempts": row.attempts,
        "time": datetime.fromtimestamp(row.updated, UTC).isoformat(timespec="seconds"),
    }


def format_status(report: dict[str, Any]) -> str:
    """The human-readable form of ``status_report``."""
    lines = [f"ledger: {report['ledger']}"]
    if not report["daemons"]:
        lines.append("daemon: never ran with this state_dir")
    for d in report["daemons"]:
        state = "running" if d["running"] else f"not running (last seen {d['age_seconds']} s ago)"
        lines.append(f"daemon {d['instance']} (pid {d['pid']}): {state}")
        if d["running"]:
            lines.append(
                f"  settling {d.get('settling', 0)}, queued {d.get('queued', 0)}, "
                f"waiting {d.get('waiting', 0)}, in flight {d.get('in_flight', 0)} "
                f"(uploading {d.get('uploading', 0)}, limit {d.get('limit')})"
            )
            if d.get("paused") and d.get("paused_reason") == "field_rejected":
                # A config the server refused: no timer ends it, a reload does.
                lines.append(f"  paused: {d['paused']}")
            elif d.get("paused"):
                lines.append(f"  paused: {d['paused']} (for {d.get('paused_for')} s more)")
    counts = report["counts"]
    lines.append(
        "jobs: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none yet")
    )
    if deliveries := report.get("deliveries"):
        lines.append(
            "deliveries (hooks, webhooks, notifications): "
            + ", ".join(f"{k} {v}" for k, v in sorted(deliveries.items()))
        )
    if report["recent_failures"]:
        lines.append("recent failures:")
        for f in report["recent_failures"]:
            status = f" HTTP {f['http_status']}" if f["http_status"] else ""
            trace = f" trace {f['trace_id']}" if f["trace_id"] else ""
            lines.append(
                f"  {f['time']}  {f['file']}  {f['reason']}{status}: {f['message']}{trace}"
            )
    # Names, messages, reasons and trace ids come from the share and the API: one
    # escaped line each, so none can forge a line or drive the terminal.
    return "\n".join(printable(line) for line in lines)


@dataclass
class RetryReport:
    """What ``retry`` did: files moved back, files skipped and why, FILEs it could not take."""

    moved: list[tuple[Path, Path]] = field(default_factory=list)
    #: not retried, for a stated reason (not failed in this ledger, gone, a symlink on
    #: the way): warnings
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    #: a named FILE that is no failed file, or a move that failed: exit status 1
    errors: list[tuple[Path, str]] = field(default_factory=list)


class RetryRefused(SfwatchError):
    """``retry`` will not run here (as root for a daemon that is not root; no ledger)."""


def check_retry_user(state_dir: Path) -> None:
    """Refuse to run as root when the daemon does not: RetryRefused naming its user.

    The daemon's user is the owner of its ledger (or of ``state_dir``). Root moving
    files in folders that user, and the share's writers, control is what a planted
    link turns into a write anywhere; as the daemon's user a retry can do no more
    than the daemon itself.
    """
    if os.geteuid() != 0:
        return
    for path in (state_dir / LEDGER_NAME, state_dir):
        try:
            owner = path.stat().st_uid
        except OSError:
            continue
        if owner == 0:
            return
        try:
            user = pwd.getpwuid(owner).pw_name
        except KeyError:
            user = str(owner)
        raise RetryRefused(
            f"retry: refusing to run as root: the daemon runs as {user!r} (uid {owner}, "
            f"the owner of {path}); run it as that user, e.g. "
            f"runuser -u {user} -- sfwatch retry ..."
        )


def _lexical(path: Path) -> Path:
    """``path`` absolute and normalised without looking at the disk (no link followed)."""
    return Path(os.path.normpath(path.absolute()))


def _located(path: Path) -> Path:
    """``path`` absolute, its folder's symlinks resolved (not the file's own)."""
    path = path.absolute()
    # realpath, not Path.resolve: a planted link loop must not raise (RuntimeError)
    return Path(os.path.realpath(path.parent)) / path.name


def _watch_for_failed(config: Config, path: Path) -> tuple[WatchConfig, Path] | None:
    """The watched folder whose failed/ holds ``path``, and the path relative to it."""
    for watch in config.watch:
        if path != watch.failed_dir and path.is_relative_to(watch.failed_dir):
            return watch, path.relative_to(watch.failed_dir)
    return None


def _anchor(config: Config, folder: Path) -> tuple[Path, tuple[str, ...]]:
    """A configured root above ``folder`` and the components from it down to ``folder``.

    Inside a watched folder the root is that folder: everything below it is the
    share's, where any component may be a planted link. Below a failed_dir
    outside every watched folder, the failed_dir is the root (the admin chose it;
    the folders below it are named after the share's).
    """
    for watch in config.watch:
        if folder.is_relative_to(watch.path):
            return watch.path, folder.relative_to(watch.path).parts
    for watch in config.watch:
        if folder.is_relative_to(watch.failed_dir):
            return watch.failed_dir, folder.relative_to(watch.failed_dir).parts
    return folder, ()


def _open_folder(config: Config, folder: Path, *, create: bool = False) -> int:
    """Open a folder from its configured root down without following a link."""
    root, parts = _anchor(config, folder)
    return safefs.open_below(root, parts, create=create)


def retry(config: Config, files: list[Path], everything: bool) -> RetryReport:
    """Move failed originals back into their inbox: only those the ledger shows as failed.

    The ledger is the authority. A file in failed/ whose job the ledger does not
    show as failed (the daemon is still finishing it, another daemon with its
    own ledger failed it, or it was planted there) is skipped with a reason, as
    is a failed job whose file is gone; neither stops the others. Paths are
    walked from the watched folder down without following links (§11): a symlink
    on the way out of failed/ or back into the inbox skips the file.
    """
    check_retry_user(config.state_dir)
    if not (config.state_dir / LEDGER_NAME).is_file():
        raise RetryRefused(
            f"retry: no ledger at {config.state_dir / LEDGER_NAME}: no daemon has run with "
            "this state_dir (run retry with the daemon's config)"
        )
    report = RetryReport()
    ledger = Ledger.in_state_dir(config.state_dir)
    try:
        rows: dict[Path, JobRow] = {}
        for row in ledger.failed_jobs():  # oldest first: the newest job of a name wins
            if row.final_path:
                rows[_lexical(Path(row.final_path))] = row
        if everything:
            targets = list(rows.items())
            for watch in config.watch:
                report.skipped.extend(_unknown_failed(config, watch, ledger, rows))
        else:
            targets = _named(config, ledger, files, rows, report)
        for failed, row in targets:
            _retry_one(config, ledger, failed, row, report)
    finally:
        ledger.close()
    return report


def _named(
    config: Config, ledger: Ledger, files: list[Path], rows: dict[Path, JobRow], report: RetryReport
) -> list[tuple[Path, JobRow]]:
    """The named FILEs that are failed jobs; the others go into ``report``."""
    targets: dict[Path, JobRow] = {}
    for name in files:
        failed = _lexical(Path(str(name).removesuffix(ERROR_SUFFIX)))
        located = _located(failed)
        if failed not in rows and (
            located in rows
            or (_watch_for_failed(config, failed) is None and _watch_for_failed(config, located))
        ):
            # Named through the user's own link (a mount, ~/share). Only to find the
            # row: the move itself walks down from the watched folder, no link followed.
            failed = located
        if failed in rows:
            targets[failed] = rows[failed]
        elif _watch_for_failed(config, failed) is None:
            report.errors.append((failed, "not in any watched folder's failed_dir"))
        else:
            _named_unknown(config, ledger, failed, report)
    return list(targets.items())


def _named_unknown(config: Config, ledger: Ledger, failed: Path, report: RetryReport) -> None:
    """A named FILE in a failed/ that the ledger shows no failed job for: say what it is."""
    try:
        folder = _open_folder(config, failed.parent)
    except safefs.UnsafeFolder as exc:
        report.skipped.append((failed, f"not followed: {exc}"))
        return
    except FileNotFoundError:
        report.errors.append((failed, "no such file, and no failed job for it in the ledger"))
        return
    except OSError as exc:
        report.errors.append((failed, f"cannot look at it: {exc}"))
        return
    try:
        st = safefs.lstat_at(folder, failed.name)
        if st is None:
            report.errors.append((failed, "no such file, and no failed job for it in the ledger"))
        elif stat.S_ISDIR(st.st_mode):
            report.errors.append((failed, "a folder, not a failed file"))
        else:
            report.skipped.append((failed, _why_not_failed(ledger, folder, failed, st)))
    finally:
        os.close(folder)


def _unknown_failed(
    config: Config, watch: WatchConfig, ledger: Ledger, rows: dict[Path, JobRow]
) -> list[tuple[Path, str]]:
    """Files in a failed/ that the ledger shows no failed job for (``--all`` skips them).

    The walk opens each folder without following links; a linked folder is
    reported, not entered.
    """
    try:
        top = _open_folder(config, watch.failed_dir)
    except safefs.UnsafeFolder as exc:
        return [(watch.failed_dir, f"not followed: {exc}")]
    except OSError:
        return []  # no failed/ (yet), or one we may not read: nothing to say about it
    found: list[tuple[Path, str]] = []
    # Depth first with an explicit stack (a planted tree may be deep); each folder
    # is opened again from the top without following links, never by path.
    stack: list[tuple[str, ...]] = [()]
    os.close(top)
    root, parts = _anchor(config, watch.failed_dir)
    while stack:
        below = stack.pop()
        try:
            folder = safefs.open_below(root, (*parts, *below))
        except (OSError, safefs.UnsafeFolder):
            continue  # replaced by a link meanwhile, or closed to us
        try:
            entries = list(safefs.scan_dir(folder))
            for entry in entries:
                if entry.name.startswith(".") or entry.name.endswith(ERROR_SUFFIX):
                    continue
                here = watch.failed_dir.joinpath(*below, entry.name)
                if entry.is_dir(follow_symlinks=False):
                    stack.append((*below, entry.name))
                elif here not in rows and (st := safefs.lstat_at(folder, entry.name)):
                    found.append((here, _why_not_failed(ledger, folder, here, st)))
        except OSError:
            pass  # a folder we may not list: the daemon never put a failed file there
        finally:
            os.close(folder)
    return sorted(found)


def _why_not_failed(ledger: Ledger, folder: int, failed: Path, st: os.stat_result) -> str:
    """Why a file in failed/ is not retried: what the ledger says of it."""
    if stat.S_ISLNK(st.st_mode):
        return "a symlink: never followed or moved"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file: never moved"
    job_id = _error_file_job(folder, f"{failed.name}{ERROR_SUFFIX}")
    row = ledger.job(job_id) if job_id else None
    if row is not None and row.status == "claimed":
        return f"job {job_id} is still being finished (the ledger shows it as claimed)"
    if row is not None and row.status == "failed":
        return f"the ledger has job {job_id}'s file at {row.final_path}, not here"
    if row is not None:
        return f"the ledger shows job {job_id} as {row.status}, not failed"
    whose = f"job {job_id}" if job_id else "it"
    return (
        f"this ledger ({ledger.path}) shows no failed job for {whose}: "
        "another daemon's (retry with its config), still being finished, or not the "
        "daemon's at all"
    )


def _error_file_job(folder: int, name: str) -> str | None:
    """The ``job_id`` in an error file; None if it is missing or not one of ours."""
    try:
        record = json.loads(safefs.read_at(folder, name))
    except (OSError, ValueError):
        return None
    job_id = record.get("job_id") if isinstance(record, dict) else None
    return job_id if isinstance(job_id, str) and job_id else None


def _retry_one(
    config: Config, ledger: Ledger, failed: Path, row: JobRow, report: RetryReport
) -> None:
    """Error file out, original back into the inbox, then the row says ``retried``.

    In this order a kill at any point leaves a state the next ``retry`` completes:
    before the move the file is still in failed/ and the job still failed; and an
    error file never outlives its original (it would push the file's next failure
    to ``a (1).mp3``). Both folders are opened from the watched folder down
    without following a link, and the moves use their descriptors.
    """
    found = _watch_for_failed(config, failed)
    if found is None:
        report.skipped.append((failed, "not in any watched folder's failed_dir any more"))
        return
    watch, rel = found
    why_gone = (
        "gone from failed/ (removed by hand, or moved back by an interrupted retry); "
        f"the ledger still shows job {row.job_id} as failed"
    )
    gone = (failed, why_gone)
    source: int | None = None
    inbox: int | None = None
    try:
        source = _open_folder(config, failed.parent)
        st = safefs.lstat_at(source, failed.name)
        if st is None:
            report.skipped.append(gone)
            return
        if not stat.S_ISREG(st.st_mode):
            what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            report.skipped.append((failed, f"{what} now: never followed or moved"))
            return
        inbox = safefs.open_below(watch.path, rel.parent.parts, create=True)
        _remove_error_files(source, failed.name, row.job_id)
        back = _move_back(source, failed.name, inbox, rel.name)
    except safefs.UnsafeFolder as exc:
        report.skipped.append((failed, f"not moved: {exc}"))
        return
    except FileNotFoundError:
        report.skipped.append(gone)
        return
    except OSError as exc:
        if source is not None and _gone(source, failed.name):
            report.skipped.append(gone)  # another retry took it meanwhile
        else:
            report.errors.append((failed, f"not moved back: {exc}"))
        return
    finally:
        for fd in (source, inbox):
            if fd is not None:
                os.close(fd)
    ledger.retried(row.job_id)
    report.moved.append((failed, watch.path / rel.parent / back))


def _gone(folder: int, name: str) -> bool:
    """Is there no file ``name`` in the folder any more? (False when we cannot tell.)"""
    try:
        return safefs.lstat_at(folder, name) is None
    except OSError:
        return False


def _remove_error_files(folder: int, name: str, job_id: str) -> None:
    """Remove the error file(s) ``finish_failed`` wrote for this job; leave any other."""
    candidates = (f"{name}{ERROR_SUFFIX}", numbered(name, 0, f".{job_id}{ERROR_SUFFIX}"))
    removed = False
    for error_file in candidates:
        if _error_file_job(folder, error_file) == job_id:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(error_file, dir_fd=folder)
            removed = True
    if removed:
        safefs.fsync_fd(folder)  # gone for good before the original moves


def _move_back(source: int, name: str, inbox: int, target: str) -> str:
    """Move ``name`` to ``target`` in the inbox or, if that is taken, ``target`` with `` (n)``."""
    stem, suffix = Path(target).stem, Path(target).suffix
    earlier = _linked_earlier(source, name, inbox, stem, suffix)
    if earlier is not None:
        # An interrupted move got as far as the new name: only the old one is left to go.
        os.unlink(name, dir_fd=source)
        safefs.fsync_fd(source)
        return earlier
    for n in itertools.count():
        candidate = numbered(stem, n, suffix)
        try:
            move_no_replace_at(source, name, inbox, candidate)
        except FileExistsError:
            continue
        return candidate
    raise AssertionError("unreachable")  # pragma: no cover


def _linked_earlier(source: int, name: str, inbox: int, stem: str, suffix: str) -> str | None:
    """The inbox name (``a.mp3``, ``a (1).mp3``, …) an interrupted move already gave it."""
    st = safefs.lstat_at(source, name)
    if st is None or st.st_nlink < 2:
        return None
    for n in itertools.count():
        candidate = numbered(stem, n, suffix)
        there = safefs.lstat_at(inbox, candidate)
        if there is None:
            return None
        if (there.st_dev, there.st_ino) == (st.st_dev, st.st_ino):
            return candidate
    return None  # pragma: no cover - count() never ends
