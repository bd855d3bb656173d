"""Logging: one JSON object per line on stdout (console renderer on a TTY).

Every event is named ``sfwatch.<noun>_<verb>``. The API key is scrubbed from every
rendered line as the last step before output, so no code path (an exception's
text, a URL, a header dump) can leak it. Standard-library loggers (watchdog,
httpx) are routed through the same renderer; httpx and httpcore only at WARNING,
since their INFO lines repeat every request.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


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


class JournalWriter:
    """Sends each rendered JSON line to the journal, with its fields as upper-case fields.

    ``journalctl -u sfwatch TRACE_ID=…`` then finds a request. Used instead of
    stdout when stdout *is* the journal (``$JOURNAL_STREAM``), so each event is
    stored once.
    """

    PRIORITY: ClassVar[dict[str, int]] = {
        "debug": 7,
        "info": 6,
        "warning": 4,
        "error": 3,
        "critical": 2,
        "exception": 3,
    }

    def __init__(self, journal: Any) -> None:
        self.journal = journal

    def write_line(self, line: str) -> None:
        """Send one rendered line."""
        try:
            fields = json.loads(line)
        except ValueError:
            fields = {}
        extra = {
            _journal_key(k): v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
            for k, v in fields.items()
            if _journal_key(k)
        }
        level = str(fields.get("level", "info"))
        with contextlib.suppress(OSError):  # (see SafeStream: a log line never stops work)
            self.journal.send(
                line,
                PRIORITY=str(self.PRIORITY.get(level, 6)),
                SYSLOG_IDENTIFIER="sfwatch",
                **extra,
            )

    def msg(self, message: str) -> None:
        """structlog's entry point, whatever the level."""
        self.write_line(message)

    def __getattr__(self, _name: str) -> Callable[[str], None]:
        return self.msg


class _JournalHandler(logging.Handler):
    """Standard-library records (watchdog's) to the journal, rendered like ours."""

    def __init__(self, writer: JournalWriter) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.writer.write_line(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def _journal_key(key: str) -> str:
    """A journal field name: upper case, letters, digits and '_', not starting with '_'."""
    name = re.sub(r"[^A-Z0-9_]", "_", key.upper()).lstrip("_")
    return "" if name in {"", "MESSAGE", "PRIORITY"} else name[:64]


def journal_for(stream: TextIO) -> Any | None:
    """The systemd.journal module when ``stream`` is connected to the journal, else None."""
    wanted = os.environ.get("JOURNAL_STREAM", "")
    if not wanted:
        return None
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return None
    if wanted != f"{st.st_dev}:{st.st_ino}":
        return None
    try:
        return importlib.import_module("systemd.journal")
    except ImportError:
        return None  # no systemd-python: JSON on stdout reaches the journal as text


class SafeStream:
    """A text stream whose write errors are dropped: a log line never stops the work.

    stdout may be a full disk, a closed pipe or a journald that went away; the
    file being processed must not fail (or be retried, or paid for again)
    because its log line could not be written.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.dropped = 0

    def write(self, text: str) -> int:
        """Write, or count the line as dropped."""
        try:
            return self._stream.write(text)
        except (OSError, ValueError):
            self.dropped += 1
            return 0

    def flush(self) -> None:
        """Flush, ignoring errors (see the class docstring)."""
        try:
            self._stream.flush()
        except (OSError, ValueError):
            self.dropped += 1

    def isatty(self) -> bool:
        """As the wrapped stream."""
        return self._stream.isatty()


def configure(
    fmt: str = "auto",
    level: str = "info",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
    fields: dict[str, Any] | None = None,
) -> None:
    """Set up structlog and the standard-library loggers for the whole process.

    ``fields``: added to every line (a worker process's ``worker``: workers.py).
    """
    out = stream if stream is not None else sys.stdout
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: Processor = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if use_console
        else structlog.processors.JSONRenderer(ensure_ascii=False, sort_keys=False)
    )
    redact = Redactor(secrets)
    fixed = dict(fields or {})
    shared: list[Processor] = [
        lambda _logger, _name, event: {**event, **fixed} if fixed else event,
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]
    tail: list[Processor] = [structlog.processors.format_exc_info, redact]
    journal = None if use_console else journal_for(out)
    writer = JournalWriter(journal) if journal is not None else None
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=(lambda *_: writer)
        if writer is not None
        else structlog.WriteLoggerFactory(file=SafeStream(out)),  # type: ignore[arg-type]
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
    handler: logging.Handler = (
        _JournalHandler(writer) if writer is not None else logging.StreamHandler(out)
    )
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
