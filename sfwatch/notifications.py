"""Apprise notifications: the sender built from ``notify.urls``, and one message for a burst.

The notification parts of the outbox (docs/design.md §13): ``make_apprise`` checks
and holds the configured URLs (Apprise is the optional extra ``sfwatch[notify]``);
``summary`` turns the gathered events into one title and body. When to send, and
retries, are the outbox's (outbox.py). Not to be confused with notify.py, the
systemd notifier.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sfwatch.config import NotifyConfig
from sfwatch.errors import ConfigError
from sfwatch.ledger import OutboxRow

#: files named in a summary notification (the rest are counted)
SUMMARY_FILES = 10


def make_apprise(notify: NotifyConfig) -> Any:
    """An ``apprise.Apprise`` holding ``notify.urls``; ConfigError naming the bad one."""
    try:
        import apprise  # noqa: PLC0415 - the optional extra sfwatch[notify]
    except ImportError:
        raise ConfigError(
            "notify.urls", "needs Apprise: pip install 'sfwatch[notify]' (or: pip install apprise)"
        ) from None
    sender = apprise.Apprise(asset=apprise.AppriseAsset(app_id="sfwatch", app_desc="sfwatch"))
    quiet = logging.getLogger("apprise")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # its warning would quote the URL, token and all
    try:
        for index, url in enumerate(notify.urls):
            if not sender.add(url):
                scheme = url.partition("://")[0]
                raise ConfigError(
                    f"notify.urls[{index}]", f"Apprise does not understand this {scheme}:// URL"
                )
    finally:
        quiet.setLevel(level)
    return sender


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def summary(rows: Sequence[OutboxRow], host: str) -> tuple[str, str, str]:
    """One message for gathered events: (title, body, Apprise notify type)."""
    by_event = Counter(row.event for row in rows)
    failed = [row.payload for row in rows if row.event == "failed"]
    done = [row.payload for row in rows if row.event == "done"]
    account = [row for row in rows if row.event in ("paused", "resumed")]
    title_parts: list[str] = []
    body: list[str] = []
    if failed:
        one = Path(str(failed[0].get("file"))).name
        title_parts.append(f"{one} failed" if len(failed) == 1 else f"{len(failed)} files failed")
        reasons = Counter(str(p.get("reason") or "unknown") for p in failed)
        body.append(
            f"{_plural(len(failed), 'file', 'files')} failed ("
            + ", ".join(f"{reason}: {n}" for reason, n in reasons.most_common())
            + ")"
        )
        for payload in failed[:SUMMARY_FILES]:
            why = payload.get("api_message") or payload.get("message") or ""
            line = f"- {payload.get('file')}: {payload.get('reason')}"
            body.append(f"{line} ({str(why)[:200]})" if why else line)
        if len(failed) > SUMMARY_FILES:
            body.append(f"… and {len(failed) - SUMMARY_FILES} more: `sfwatch status` lists them")
    if done:
        one = Path(str(done[0].get("file"))).name
        title_parts.append(
            f"{one} transcribed" if len(done) == 1 else f"{len(done)} files transcribed"
        )
        body.extend(f"- {p.get('file')} → {p.get('transcript')}" for p in done[:SUMMARY_FILES])
        if len(done) > SUMMARY_FILES:
            body.append(f"… and {len(done) - SUMMARY_FILES} more")
    for row in account:  # in the order they happened: the last one is how things stand
        payload = row.payload
        if row.event == "paused":
            status = f" (HTTP {payload['http_status']})" if payload.get("http_status") else ""
            body.append(
                f"Uploads paused: {payload.get('reason')}{status}: {payload.get('error') or ''}"
                " — the account is probed and uploads resume by themselves once it answers."
            )
        else:
            body.append("Uploads resumed.")
    if account:
        title_parts.append(f"uploads {account[-1].event}")
    kind = "info"
    if by_event["done"] or by_event["resumed"]:
        kind = "success"
    if by_event["paused"]:
        kind = "warning"
    if by_event["failed"]:
        kind = "failure"
    return f"sfwatch on {host}: " + ", ".join(title_parts), "\n".join(body), kind


__all__ = ["SUMMARY_FILES", "make_apprise", "summary"]
