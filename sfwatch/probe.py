"""The account probe: while uploads are paused for the account, ask the service.

An account fault (a bad key, no balance: docs/design.md §8) pauses every upload.
Rather than spend uploads finding out whether it is fixed, one thread calls
``GET /user/info`` whenever the pacer says a probe is due: success resumes
uploads, a failure pauses them longer. Services without that endpoint (OpenAI,
Groq, speaches, whisper.cpp) answer 404 or 405; then one upload is let through
as the probe instead, and it pauses us again if need be.

The call runs on its own thread (it may take ``api.timeout_seconds``); its result
is handled on the main thread, where the pacer lives.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from sfwatch.errors import SfwatchError, TranscribeError
from sfwatch.logs import get_logger
from sfwatch.pacing import Pacer


class AccountProbe:
    """The prober thread, and what its answer means for the pacer."""

    def __init__(
        self,
        pacer: Pacer,
        check: Callable[[], dict[str, Any]],
        wakeup: threading.Event,
        announce: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.pacer = pacer
        #: account events (``resumed``) for the outbox (docs/design.md §13)
        self.announce = announce
        self.check = check
        self.wakeup = wakeup
        self.log = get_logger()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="sfwatch-probe")
        self.future: Future[dict[str, Any]] | None = None

    @property
    def running(self) -> bool:
        """A probe has started and its answer is not handled yet."""
        return self.future is not None

    def step(self, *, may_start: bool) -> None:
        """Handle a probe that ended; start one if uploads are paused and one is due."""
        if self.future is not None and self.future.done():
            try:
                self.future.result()
            except SfwatchError as exc:
                if isinstance(exc, TranscribeError) and exc.http_status in (404, 405):
                    # No /user/info here: let one upload through as the probe instead.
                    self._resumed("upload")
                    self.future = None
                    return
                reason = exc.reason if isinstance(exc, TranscribeError) else "probe_failed"
                wait = self.pacer.account_failed(self.pacer.account_fault or reason)
                self.log.info(
                    "sfwatch.account_probe_failed",
                    reason=reason,
                    http_status=getattr(exc, "http_status", None),
                    retry_in=round(wait, 1),
                )
            except Exception:  # a bug: still a failed probe, so the pause goes on and ends
                wait = self.pacer.account_failed(self.pacer.account_fault or "probe_failed")
                self.log.exception(
                    "sfwatch.account_probe_failed", reason="probe_crashed", retry_in=round(wait, 1)
                )
            else:
                self._resumed("user_info")
            self.future = None
        if (
            self.pacer.account_fault is not None
            and self.future is None
            and time.monotonic() >= self.pacer.probe_at
            and may_start
        ):
            self.future = self.pool.submit(self.check)
            self.future.add_done_callback(lambda _f: self.wakeup.set())

    def _resumed(self, probe: str) -> None:
        fields = {"probe": probe, "paused_reason": self.pacer.account_fault}
        self.pacer.account_ok()
        self.log.info("sfwatch.uploads_resumed", **fields)
        if self.announce is not None:
            self.announce("resumed", fields)

    def shutdown(self) -> None:
        """Leave a probe in flight behind: its answer no longer matters."""
        self.pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["AccountProbe"]
