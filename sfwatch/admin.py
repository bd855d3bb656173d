"""``sfwatch status`` and ``sfwatch retry``: read and act on the ledger from outside.

Both are safe while the daemon runs: the ledger is SQLite in WAL mode (readers
never block the daemon), and ``retry`` only moves files back into an inbox,
where the daemon picks them up like any new file, as a new job with no attempts.
``retry`` takes only files whose job the ledger shows as ``failed``: the daemon
writes that last, after the original and its error file are in place, so a file
it is still finishing is never moved from under it.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sfwatch.config import Config, WatchConfig
from sfwatch.finish import ERROR_SUFFIX
from sfwatch.fsutil import files_below, free_stems, fsync_dir, move_no_replace, numbered
from sfwatch.ledger import JobRow, Ledger

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
            daemons.append({**state, "running": running, "age_seconds": round(age, 1)})
        failures = [_failure(row) for row in ledger.recent_failures(10)]
        return {
            "ledger": str(ledger.path),
            "daemons": daemons,
            "counts": ledger.counts(),
            "recent_failures": failures,
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
                f"(limit {d.get('limit')})"
            )
            if d.get("paused"):
                lines.append(f"  paused: {d['paused']} (for {d.get('paused_for')} s more)")
    counts = report["counts"]
    lines.append(
        "jobs: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none yet")
    )
    if report["recent_failures"]:
        lines.append("recent failures:")
        for f in report["recent_failures"]:
            status = f" HTTP {f['http_status']}" if f["http_status"] else ""
            trace = f" trace {f['trace_id']}" if f["trace_id"] else ""
            lines.append(
                f"  {f['time']}  {f['file']}  {f['reason']}{status}: {f['message']}{trace}"
            )
    return "\n".join(lines)


#: Unicode categories a file name may hold but a terminal line must not: control
#: characters, lone surrogates (undecodable bytes), line and paragraph separators
_UNPRINTABLE = frozenset({"Cc", "Cs", "Zl", "Zp"})


def printable(text: object) -> str:
    """``text`` with control characters (and undecodable bytes) escaped as ``repr`` does."""
    return "".join(
        repr(c)[1:-1] if unicodedata.category(c) in _UNPRINTABLE else c for c in str(text)
    )


@dataclass
class RetryReport:
    """What ``retry`` did: files moved back, files skipped and why, FILEs it could not take."""

    moved: list[tuple[Path, Path]] = field(default_factory=list)
    #: not retried, for a stated reason (not failed in this ledger, gone): warnings
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    #: a named FILE that is no failed file, or a move that failed: exit status 1
    errors: list[tuple[Path, str]] = field(default_factory=list)


def _located(path: Path) -> Path:
    """``path`` absolute, its folder's symlinks resolved (not the file's own)."""
    path = path.absolute()
    return path.parent.resolve() / path.name


def _watch_for_failed(config: Config, path: Path) -> tuple[WatchConfig, Path] | None:
    """The watched folder whose failed/ holds ``path``, and the path relative to it."""
    for watch in config.watch:
        try:
            return watch, path.relative_to(watch.failed_dir.resolve())
        except ValueError:
            continue
    return None


def retry(config: Config, files: list[Path], everything: bool) -> RetryReport:
    """Move failed originals back into their inbox: only those the ledger shows as failed.

    The ledger is the authority. A file in failed/ whose job the ledger does not
    show as failed (the daemon is still finishing it, or another daemon with its
    own ledger failed it) is skipped with a reason, as is a failed job whose file
    is gone; neither stops the others.
    """
    report = RetryReport()
    ledger = Ledger.in_state_dir(config.state_dir)
    try:
        rows: dict[Path, JobRow] = {}
        for row in ledger.failed_jobs():  # oldest first: the newest job of a name wins
            if row.final_path:
                rows[_located(Path(row.final_path))] = row
        if everything:
            targets = list(rows.items())
            for watch in config.watch:
                for path in _unknown_failed(watch, rows):
                    report.skipped.append((path, _why_not_failed(ledger, path)))
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
        failed = _located(Path(str(name).removesuffix(ERROR_SUFFIX)))
        if _watch_for_failed(config, failed) is None:
            report.errors.append((failed, "not in any watched folder's failed_dir"))
        elif failed in rows:
            targets[failed] = rows[failed]
        elif failed.is_dir():
            report.errors.append((failed, "a folder, not a failed file"))
        elif os.path.lexists(failed):
            report.skipped.append((failed, _why_not_failed(ledger, failed)))
        else:
            report.errors.append((failed, "no such file, and no failed job for it in the ledger"))
    return list(targets.items())


def _unknown_failed(watch: WatchConfig, rows: dict[Path, JobRow]) -> list[Path]:
    """Files in a failed/ that the ledger shows no failed job for (``--all`` skips them)."""
    top = watch.failed_dir.resolve()
    if not top.is_dir():
        return []
    return sorted(
        found
        for path in files_below(top)  # not rglob: it recurses, and failed/ may be deep
        if not path.name.startswith(".")
        and not path.name.endswith(ERROR_SUFFIX)
        and not path.is_dir()
        and (found := _located(path)) not in rows
    )


def _why_not_failed(ledger: Ledger, failed: Path) -> str:
    """Why a file in failed/ is not retried: what the ledger says of it."""
    job_id = _error_file_job(failed.with_name(f"{failed.name}{ERROR_SUFFIX}"))
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
        "another daemon's (retry with its config), or still being finished"
    )


def _error_file_job(path: Path) -> str | None:
    """The ``job_id`` in an error file; None if it is missing or not one of ours."""
    try:
        record = json.loads(path.read_bytes())
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
    to ``a (1).mp3``).
    """
    found = _watch_for_failed(config, failed)
    if found is None:
        report.skipped.append((failed, "not in any watched folder's failed_dir any more"))
        return
    watch, rel = found
    why = (
        "gone from failed/ (removed by hand, or moved back by an interrupted retry); "
        f"the ledger still shows job {row.job_id} as failed"
    )
    gone = (failed, why)
    if not os.path.lexists(failed):
        report.skipped.append(gone)
        return
    try:
        _remove_error_files(failed, row.job_id)
        back = _move_back(failed, watch.path / rel)
    except OSError as exc:
        if not os.path.lexists(failed):  # another retry took it meanwhile
            report.skipped.append(gone)
        else:
            report.errors.append((failed, f"not moved back: {exc}"))
        return
    ledger.retried(row.job_id)
    report.moved.append((failed, back))


def _remove_error_files(failed: Path, job_id: str) -> None:
    """Remove the error file(s) ``finish_failed`` wrote for this job; leave any other."""
    candidates = (
        failed.with_name(f"{failed.name}{ERROR_SUFFIX}"),
        failed.with_name(numbered(failed.name, 0, f".{job_id}{ERROR_SUFFIX}")),
    )
    removed = False
    for error_file in candidates:
        if _error_file_job(error_file) == job_id:
            error_file.unlink(missing_ok=True)
            removed = True
    if removed:
        fsync_dir(failed.parent)  # gone for good before the original moves


def _move_back(failed: Path, target: Path) -> Path:
    """Move ``failed`` to ``target`` or, if that is taken, ``target`` with `` (n)``."""
    stem, suffix = target.stem, target.suffix
    earlier = _linked_earlier(failed, target)
    if earlier is not None:
        # An interrupted move got as far as the new name: only the old one is left to go.
        failed.unlink()
        fsync_dir(failed.parent)
        return earlier
    for candidate in free_stems(stem, [(target.parent, suffix)]):
        destination = target.parent / f"{candidate}{suffix}"
        try:
            move_no_replace(failed, destination)
        except FileExistsError:
            continue
        return destination
    raise AssertionError("unreachable")  # pragma: no cover


def _linked_earlier(failed: Path, target: Path) -> Path | None:
    """The inbox name (``a.mp3``, ``a (1).mp3``, …) an interrupted move already gave it."""
    try:
        if failed.lstat().st_nlink < 2:
            return None
    except OSError:
        return None
    for n in itertools.count():
        candidate = target.parent / numbered(target.stem, n, target.suffix)
        if not os.path.lexists(candidate):
            return None
        try:
            if failed.samefile(candidate):
                return candidate
        except OSError:
            return None
    return None  # pragma: no cover - count() never ends
