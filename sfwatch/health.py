"""The daemon's health, and the HTTP listener for metrics and health (docs/design.md §12).

``Health`` is what systemd's watchdog, ``/healthz`` and ``/readyz`` report (the
daemon's checks that make one are ``Daemon.health`` and ``Daemon.readiness``);
``start_endpoint`` serves ``/metrics``, ``/healthz`` and ``/readyz`` on
``metrics.listen`` (endpoint.py is the HTTP server, metrics.py the counters).
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sfwatch.config import listen_address
from sfwatch.endpoint import Endpoint, Response, json_response
from sfwatch.metrics import Metrics


@dataclass(frozen=True)
class Health:
    """The daemon's health, for systemd's watchdog and ``/healthz`` alike.

    ``reason`` is None when healthy, else one of ``loop_frozen``, ``observer_down``,
    ``scanner_down``, ``upload_stuck``, ``state_dir``, ``worker_down`` (readiness adds ``starting``,
    ``scanning``, ``stopping``); ``detail`` says more, for a person.
    """

    reason: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        """No problem."""
        return self.reason is None


HEALTHY = Health()


def probe_response(health: Health, good: str) -> Response:
    """/healthz and /readyz: 200 ``{"status": good}``, or 503 with the reason."""
    if health.ok:
        return json_response(200, {"status": good})
    payload: Mapping[str, Any] = {
        "status": "unhealthy" if good == "ok" else "not_ready",
        "reason": health.reason,
        "detail": health.detail,
    }
    return json_response(503, payload)


def start_endpoint(
    listen: tuple[str, int],
    metrics: Metrics,
    health: Callable[[], Health],
    readiness: Callable[[], Health],
    log: Any,
) -> Endpoint | None:
    """Listen on ``listen`` for /metrics, /healthz and /readyz; None (logged) if it cannot.

    ``health`` and ``readiness`` are asked on the listener's thread, at each request.
    """
    endpoint = Endpoint(
        *listen,
        {
            "/metrics": lambda headers: Response(200, *metrics.render(headers.get("accept"))),
            "/healthz": lambda _headers: probe_response(health(), "ok"),
            "/readyz": lambda _headers: probe_response(readiness(), "ready"),
        },
    )
    try:
        endpoint.start()
    except OSError as exc:
        endpoint.close()
        hint = (
            " (under systemd, allow the port: SocketBindAllow=tcp:PORT)"
            if exc.errno in (errno.EPERM, errno.EACCES)
            else ""
        )
        log.error(
            "sfwatch.metrics_failed",
            listen=listen_address(*listen),
            error=f"{exc.strerror or exc}{hint}",
            note="running without the metrics listener",
        )
        return None
    log.info(
        "sfwatch.metrics_started",
        listen=listen_address(endpoint.host, endpoint.port),
        paths=["/metrics", "/healthz", "/readyz"],
    )
    return endpoint


__all__ = ["HEALTHY", "Health", "probe_response", "start_endpoint"]
