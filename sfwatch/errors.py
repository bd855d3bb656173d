"""The exceptions sfwatch raises, and what each one means for a file.

Foreign exceptions (httpx's, OSError from a rename, PyAV's) are translated into
these at the module boundary where they occur (``raise X(...) from exc``), so the
daemon decides what to do with a file by looking at one hierarchy::

    SfwatchError
    ├── ConfigError              bad config file or value; names the key path; exit 2
    ├── PrepareError             the file is not audio we can decode (reason "not_audio")
    ├── Fenced                   this daemon may no longer own a job (its lease went
    │                            stale, or a sibling adopted the job): stop, look again
    └── TranscribeError          an upload did not give us a transcript
        ├── ServiceError         the service's fault: the file waits, spends no attempt
        │   ├── TransientError   timeouts, connection errors, 408/429/5xx: back off, retry
        │   │   ├── RateLimited  429: the whole client slows down (limits are per account)
        │   │   └── UnusableResponse  a 200 without a usable ``text``: once is the
        │   │                    service's fault, twice for one file is the file's
        │   ├── AccountError     401/402/403/404: pause every upload until a probe succeeds
        │   └── FieldRejected    a 400/422 naming a form field the config sends: hold
        │                        every upload until a reload (no probe can fix a config)
        └── FileRejected         the file's own fault (400/413/415/422, unusable 200):
                                 the file goes to failed/ with the reason

A ``TransientError`` that keeps happening to one file while other uploads succeed
is the one case where a service-shaped error is charged to the file (see
``api.max_attempts`` in docs/design.md §1, P3).
"""

from __future__ import annotations


class SfwatchError(Exception):
    """Base class of every error sfwatch raises on purpose."""


#: the exit code of a command (or a worker process) stopped by a ConfigError
EXIT_CONFIG = 2


class ConfigError(SfwatchError):
    """A config value is wrong; ``str()`` reads ``key.path: what is wrong``."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


class PrepareError(SfwatchError):
    """The file cannot be made into something the API takes."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Fenced(SfwatchError):
    """This daemon may no longer act for a job; no visible step is taken."""


class TranscribeError(SfwatchError):
    """An upload attempt ended without a transcript."""

    #: short machine-readable cause, used as ``reason`` in logs and error files
    reason: str = "transcribe_error"

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        trace_id: str | None = None,
        api_message: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.trace_id = trace_id
        self.api_message = api_message
        if reason is not None:
            self.reason = reason


class ServiceError(TranscribeError):
    """The service, not the file, is at fault; the file waits without spending an attempt."""

    reason = "service_error"


class TransientError(ServiceError):
    """A failure that goes away by itself; retry after ``retry_after`` or a backoff."""

    reason = "transient"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        http_status: int | None = None,
        trace_id: str | None = None,
        api_message: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(
            message,
            http_status=http_status,
            trace_id=trace_id,
            api_message=api_message,
            reason=reason,
        )
        self.retry_after = retry_after


class RateLimited(TransientError):
    """429: the account's rate limit; slow every upload, not only this one."""

    reason = "rate_limited"


class AccountError(ServiceError):
    """Bad key, no balance, disabled model or wrong base URL: pause all uploads."""

    reason = "account"


class FieldRejected(ServiceError):
    """A 400/422 whose message names a field the config sends (``language``, ...).

    Not the file's fault: every file would get the same answer. ``field`` is the
    form field, ``key`` the config key path that set it (``watch[0].request.language``).
    """

    reason = "field_rejected"

    def __init__(self, message: str, *, field: str, key: str, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.field = field
        self.key = key


class FileRejected(TranscribeError):
    """The API will never accept this file as it is."""

    reason = "rejected"


class UnusableResponse(TransientError):
    """A 200 whose body has no usable ``text``; a second one fails the file."""

    reason = "unusable_response"
