"""The optional sections of the config: ``metrics``, and the integrations ``hooks``,
``webhooks`` and ``notify`` (docs/design.md §12, §13; the config itself is §9).

Their dataclasses and their parsing live here; config.py builds :class:`Config`
from them and re-exports every name, so ``from sfwatch.config import HooksConfig``
goes on working.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from sfwatch.config_section import Section, show, shown_url
from sfwatch.errors import ConfigError

if TYPE_CHECKING:
    from sfwatch.config import WatchConfig

#: what hooks, webhooks and notifications are told about (docs/design.md §13)
EVENTS = ("done", "failed", "paused", "resumed")


@dataclass(frozen=True)
class MetricsConfig:
    """The optional HTTP listener for ``/metrics``, ``/healthz`` and ``/readyz``."""

    #: (IP address, port) to listen on; None: no listener (the default)
    listen: tuple[str, int] | None = None


@dataclass(frozen=True)
class HooksConfig:
    """Commands run for each finished file (docs/design.md §13); watches may override them."""

    on_done: tuple[str, ...] | None = None
    on_failed: tuple[str, ...] | None = None
    timeout_seconds: float = 60.0
    concurrency: int = 2
    max_attempts: int = 8

    def for_watch(self, watch: WatchConfig, event: str) -> tuple[str, ...]:
        """The argv of ``event``'s hook for ``watch``'s files; () when there is none."""
        own = watch.on_done if event == "done" else watch.on_failed
        default = self.on_done if event == "done" else self.on_failed
        chosen = own if own is not None else default
        return chosen or ()


@dataclass(frozen=True)
class WebhookConfig:
    """One receiver of JSON POSTs, signed Standard-Webhooks style when it has a secret."""

    url: str
    events: tuple[str, ...] = EVENTS
    secret_file: Path | None = None
    timeout_seconds: float = 10.0
    max_attempts: int = 12
    max_text_bytes: int = 262_144


@dataclass(frozen=True)
class NotifyConfig:
    """Messages to people through Apprise (``sfwatch[notify]``), gathered and rate-limited."""

    urls: tuple[str, ...] = ()
    on: tuple[str, ...] = ("failed", "paused")
    gather_seconds: float = 10.0
    min_interval_seconds: float = 60.0


# The YAML keys are the dataclasses' field names, so a new field is a new key.
_HOOKS_KEYS = tuple(f.name for f in fields(HooksConfig))
_WEBHOOK_KEYS = tuple(f.name for f in fields(WebhookConfig))
_NOTIFY_KEYS = tuple(f.name for f in fields(NotifyConfig))


def listen_address(host: str, port: int) -> str:
    """``host:port`` as written in the config (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_metrics(data: object) -> MetricsConfig:
    metrics = Section(data, "metrics", ("listen",))
    value = metrics.data.get("listen")
    if value is None:
        return MetricsConfig()
    return MetricsConfig(listen=parse_listen(value, metrics.key("listen")))


_LISTEN_EXAMPLE = (
    "HOST:PORT with HOST an IP address or localhost, e.g. 127.0.0.1:9790 or [::1]:9790"
)


def parse_listen(value: object, key: str) -> tuple[str, int]:
    """``"127.0.0.1:9790"``, ``"[::1]:9790"`` or ``"localhost:9790"`` as (address, port).

    The host must be an IP address (``localhost`` is 127.0.0.1): a name would
    depend on DNS when the daemon starts. Port 0 takes any free port (the one
    taken is logged).
    """
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f"must be {_LISTEN_EXAMPLE}; got {show(value)}")
    text = value.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ConfigError(key, f"must be [IPv6]:PORT, e.g. [::1]:9790; got {text!r}")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ConfigError(key, f"must be {_LISTEN_EXAMPLE}; got {text!r}")
        if ":" in host:
            raise ConfigError(
                key, f"an IPv6 address goes in brackets, e.g. [::1]:9790; got {text!r}"
            )
    if host.lower() == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            key, f"{host!r} is not an IP address; must be {_LISTEN_EXAMPLE}"
        ) from None
    if not port_text.isascii() or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(key, f"the port must be a number from 0 to 65535; got {port_text!r}")
    return str(address), int(port_text)


def parse_hooks(data: object, base_dir: Path) -> HooksConfig:
    hooks = Section(data, "hooks", _HOOKS_KEYS)
    return HooksConfig(
        on_done=hooks.argv("on_done", base_dir) or None,
        on_failed=hooks.argv("on_failed", base_dir) or None,
        timeout_seconds=hooks.positive("timeout_seconds", 60.0),
        concurrency=hooks.integer("concurrency", 2, 1, 64),
        max_attempts=hooks.integer("max_attempts", 8, 1),
    )


def parse_webhooks(data: object, base_dir: Path) -> tuple[WebhookConfig, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ConfigError("webhooks", f"must be a list of receivers, got {show(data)}")
    found: list[WebhookConfig] = []
    for index, entry in enumerate(data):
        where = f"webhooks[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(where, f"must be a mapping with a 'url' key, got {show(entry)}")
        hook = Section(entry, where, _WEBHOOK_KEYS)
        url = hook.optional_string("url")
        if url is None:
            raise ConfigError(hook.key("url"), "required: where to POST the events")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(hook.key("url"), f"must be an http(s) URL, got {shown_url(url)!r}")
        for earlier_index, earlier in enumerate(found):
            if earlier.url == url:
                raise ConfigError(hook.key("url"), f"same URL as webhooks[{earlier_index}].url")
        found.append(
            WebhookConfig(
                url=url,
                events=hook.events("events", EVENTS, EVENTS),
                secret_file=hook.optional_path("secret_file", base_dir),
                timeout_seconds=hook.positive("timeout_seconds", 10.0),
                max_attempts=hook.integer("max_attempts", 12, 1),
                max_text_bytes=hook.integer("max_text_bytes", 262_144, 0),
            )
        )
    return tuple(found)


def parse_notify(data: object) -> NotifyConfig:
    if isinstance(data, dict) and True in data:
        # YAML 1.1 (PyYAML) reads a bare `on:` as the boolean true: it means the key "on".
        if "on" in data:
            raise ConfigError("notify.on", "given twice")
        data = {("on" if name is True else name): value for name, value in data.items()}
    notify = Section(data, "notify", _NOTIFY_KEYS)
    urls = notify.data.get("urls")
    if urls is None:
        urls = []
    if not isinstance(urls, list):
        raise ConfigError(notify.key("urls"), f"must be a list of Apprise URLs, got {show(urls)}")
    for index, url in enumerate(urls):
        # (The URL itself is never shown: an Apprise URL carries its service's token.)
        if not isinstance(url, str) or "://" not in url:
            raise ConfigError(
                f"{notify.key('urls')}[{index}]", "must be an Apprise URL such as ntfy://topic"
            )
    return NotifyConfig(
        urls=tuple(u.strip() for u in urls),
        on=notify.events("on", NotifyConfig.on, EVENTS),
        gather_seconds=notify.positive("gather_seconds", 10.0),
        min_interval_seconds=notify.positive("min_interval_seconds", 60.0),
    )


__all__ = [
    "EVENTS",
    "HooksConfig",
    "MetricsConfig",
    "NotifyConfig",
    "WebhookConfig",
    "listen_address",
    "parse_hooks",
    "parse_listen",
    "parse_metrics",
    "parse_notify",
    "parse_webhooks",
]
