"""Logging: one JSON object per line on stdout (console renderer on a TTY).

Every event is named ``sfwatch.<noun>_<verb>``. The API key is scrubbed from every
rendered line as the last step before output, so no code path (an exception's
text, a URL, a header dump) can leak it. Standard-library loggers (watchdog,
httpx) are routed through the same renderer; httpx and httpcore only at WARNING,
since their INFO lines repeat every request.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

#: extra processors run on every event just before rendering (systemd's journal sink)
_sinks: list[Processor] = []


class Redactor:
    """A processor that replaces every secret in every string value with ``***``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = tuple(s for s in secrets if s)

    def scrub(self, value: object) -> object:
        """Return ``value`` with the secrets taken out (recursing into containers)."""
        if isinstance(value, str):
            for secret in self.secrets:
                value = value.replace(secret, "***")
            return value
        if isinstance(value, dict):
            return {k: self.scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.scrub(v) for v in value]
        return value

    def __call__(self, _logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
        """Scrub one event."""
        if not self.secrets:
            return event_dict
        return {k: self.scrub(v) for k, v in event_dict.items()}


def _drop_color_message(_l: WrappedLogger, _n: str, event_dict: EventDict) -> EventDict:
    event_dict.pop("color_message", None)
    return event_dict


def _run_sinks(logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
    for sink in _sinks:
        sink(logger, name, event_dict)
    return event_dict


def add_sink(sink: Processor) -> None:
    """Send every (already scrubbed) event to ``sink`` as well, e.g. the journal."""
    _sinks.append(sink)


def configure(
    fmt: str = "auto",
    level: str = "info",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Set up structlog and the standard-library loggers for the whole process."""
    out = stream if stream is not None else sys.stdout
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: Processor = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if use_console
        else structlog.processors.JSONRenderer(ensure_ascii=False, sort_keys=False)
    )
    redact = Redactor(secrets)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]
    tail: list[Processor] = [
        structlog.processors.format_exc_info,
        redact,
        _run_sinks,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _drop_color_message,
            *tail,
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS.get(level, logging.INFO))
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # watchdog's DEBUG lines are one per inotify event: useless even when debugging us.
    logging.getLogger("watchdog").setLevel(logging.INFO)
    # watchdog warns when a folder is created and removed faster than it adds its
    # watch (our own work folders do that); route warnings into the log instead of stderr.
    logging.captureWarnings(capture=True)
    warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning)


def get_logger(**initial: Any) -> Any:
    """A structlog logger bound to ``initial`` fields."""
    return structlog.get_logger().bind(**initial)


def file_fields(job_id: str, file: str, **more: Any) -> MutableMapping[str, Any]:
    """The fields every log line about a file carries (DESIGN.md, Logs)."""
    return {"job_id": job_id, "file": file, **more}


LogHook = Callable[[WrappedLogger, str, EventDict], EventDict]
