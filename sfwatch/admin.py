"""``sfwatch status`` and ``sfwatch retry``: read and act on the ledger from outside.

Both are safe while the daemon runs: the ledger is SQLite in WAL mode (readers
never block the daemon), and ``retry`` only moves files back into an inbox,
where the daemon picks them up like any new file, as a new job with no attempts.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sfwatch.config import Config, WatchConfig
from sfwatch.fsutil import free_stems, move_no_replace
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


def _watch_for_failed(config: Config, path: Path) -> tuple[WatchConfig, Path] | None:
    """The watched folder whose failed/ holds ``path``, and the path relative to it."""
    for watch in config.watch:
        try:
            return watch, path.relative_to(watch.failed_dir)
        except ValueError:
            continue
    return None


def retry(config: Config, files: list[Path], everything: bool) -> list[tuple[Path, Path]]:
    """Move failed originals back into their inbox; return (from, to) pairs."""
    ledger = Ledger.in_state_dir(config.state_dir)
    moved: list[tuple[Path, Path]] = []
    try:
        rows = {Path(r.final_path).resolve(): r for r in ledger.failed_jobs() if r.final_path}
        if everything:
            targets = list(rows)
            for watch in config.watch:  # failed files the ledger does not know (another host)
                if watch.failed_dir.is_dir():
                    targets.extend(
                        p.resolve()
                        for p in watch.failed_dir.rglob("*")
                        if p.is_file()
                        and not p.name.endswith(".error.json")
                        and p.resolve() not in rows
                    )
        else:
            targets = [Path(str(f).removesuffix(".error.json")).resolve() for f in files]
        for failed in targets:
            found = _watch_for_failed(config, failed)
            if found is None:
                raise FileNotFoundError(f"{failed} is not in any watched folder's failed_dir")
            watch, rel = found
            if not failed.is_file():
                raise FileNotFoundError(f"{failed} does not exist")
            back = _move_back(failed, watch.path / rel)
            error_file = failed.with_name(failed.name + ".error.json")
            error_file.unlink(missing_ok=True)
            if failed in rows:
                ledger.retried(rows[failed].job_id)
            moved.append((failed, back))
    finally:
        ledger.close()
    return moved


def _move_back(failed: Path, target: Path) -> Path:
    stem, suffix = target.stem, target.suffix
    for candidate in free_stems(stem, [(target.parent, suffix)]):
        destination = target.parent / f"{candidate}{suffix}"
        try:
            move_no_replace(failed, destination)
        except FileExistsError:
            continue
        return destination
    raise AssertionError("unreachable")  # pragma: no cover
