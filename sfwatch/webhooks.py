"""Webhooks: what a delivery keeps, the secret, the signature, the text and the log's URL.

The webhook parts of the outbox (docs/design.md §13): a row's target
(``webhook_target``: the secret's file, never the secret), the secret read from its
file (``read_secret``), the Standard Webhooks signature (``sign``), the transcript
cut to the body's limit (``cut_utf8``) and a URL fit for a log line
(``url_for_log``). The POST itself is transcribe.py's ``WebhookPoster``; retries are
the outbox's (outbox.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sfwatch.config import WebhookConfig
from sfwatch.errors import ConfigError


def webhook_target(hook: WebhookConfig) -> dict[str, Any]:
    """How to deliver to ``hook``, as the outbox row keeps it (no secret, only its file)."""
    return {
        "url": hook.url,
        "secret_file": str(hook.secret_file) if hook.secret_file else None,
        "timeout_seconds": hook.timeout_seconds,
        "max_attempts": hook.max_attempts,
        "max_text_bytes": hook.max_text_bytes,
    }


def read_secret(path: Path, key: str) -> bytes:
    """A webhook secret from its file: ``whsec_<base64>`` (Standard Webhooks) or raw text.

    ``key`` is the config key for the error. The secret is never part of a message.
    """
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(key, f"cannot read {path}: {why}") from None
    if not text:
        raise ConfigError(key, f"{path} is empty")
    if text.startswith("whsec_"):
        try:
            return base64.b64decode(text[len("whsec_") :], validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(key, f"{path}: not base64 after 'whsec_'") from None
    return text.encode()


def sign(secret: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,`` + base64 HMAC-SHA256 of ``id.timestamp.body``."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def cut_utf8(text: str, limit: int) -> tuple[str, bool]:
    """``text`` cut to at most ``limit`` UTF-8 bytes, between characters; and whether it was."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text, False
    return data[:limit].decode("utf-8", errors="ignore"), True


def iso_time(when: float) -> str:
    return (
        datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def url_for_log(url: str) -> str:
    """A URL fit for a log line: no ``user:password@``, no query (either may hold a token)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


__all__ = ["cut_utf8", "iso_time", "read_secret", "sign", "url_for_log", "webhook_target"]
