"""systemd notifications: READY, STATUS, WATCHDOG, RELOADING, STOPPING.

With systemd-python installed, messages go through ``systemd.daemon.notify``
(libsystemd's sd_notify). Without it, a few lines here do the same: one
datagram to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a leading ``@``
names an abstract socket). Outside systemd (no ``$NOTIFY_SOCKET``) every call
does nothing, so the daemon never needs to know how it was started.
"""

from __future__ import annotations

import importlib
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

_sd_daemon: Any
try:  # an optional extra: it needs libsystemd-dev and pkg-config to build
    _sd_daemon = importlib.import_module("systemd.daemon")
except ImportError:  # pragma: no cover - depends on the environment
    _sd_daemon = None


def _builtin_send(message: str, env: Mapping[str, str]) -> bool:
    """sd_notify in a few lines: one datagram to $NOTIFY_SOCKET."""
    address = env.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(target)
            sock.sendall(message.encode("utf-8"))
        except OSError:
            return False
    return True


class Notifier:
    """Talks to systemd when there is a systemd to talk to."""

    def __init__(self, env: Mapping[str, str] | None = None, *, builtin: bool = False) -> None:
        self.env = dict(os.environ if env is None else env)
        self.enabled = bool(self.env.get("NOTIFY_SOCKET"))
        use_library = _sd_daemon is not None and not builtin and env is None
        self.backend = "systemd-python" if use_library else "builtin"
        self._send: Callable[[str], bool] = (
            self._library_send if use_library else lambda m: _builtin_send(m, self.env)
        )
        self.watchdog_interval = self._watchdog_interval()
        self._last_status = ""
        self._last_ping = float("-inf")

    @staticmethod
    def _library_send(message: str) -> bool:
        assert _sd_daemon is not None  # noqa: S101 - chosen only when importable
        return bool(_sd_daemon.notify(message))

    def _watchdog_interval(self) -> float | None:
        """Half of $WATCHDOG_USEC in seconds, when the watchdog is for this process."""
        usec = self.env.get("WATCHDOG_USEC")
        pid = self.env.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return max(0.1, int(usec) / 1e6 / 2)
        except ValueError:
            return None

    def send(self, message: str) -> bool:
        """Send one raw message; False when there is nobody to tell."""
        if not self.enabled:
            return False
        return self._send(message)

    def ready(self, status: str | None = None) -> None:
        """Startup (or a reload) is complete."""
        self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def reloading(self) -> None:
        """A reload started (with the monotonic timestamp systemd 253+ expects)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """The daemon is shutting down."""
        self.send("STOPPING=1")

    def status(self, text: str) -> bool:
        """A one-line human summary; sent only when it changed."""
        if text == self._last_status:
            return False
        self._last_status = text
        return self.send(f"STATUS={text}")

    def watchdog(self, healthy: bool) -> bool:
        """Ping the watchdog if it is due and the daemon is healthy; return whether it pinged."""
        if self.watchdog_interval is None or not healthy:
            return False
        now = time.monotonic()
        if now - self._last_ping < self.watchdog_interval:
            return False
        self._last_ping = now
        return self.send("WATCHDOG=1")
