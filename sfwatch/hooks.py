"""Running a hook: a subprocess with a built environment, a deadline and bounded output.

The hook runner of the outbox (docs/design.md §13): ``hook_env`` builds a hook's whole
environment from a job's fields (nothing inherited, so never the key); ``run_hook``
runs it without a shell in a session of its own, feeds it stdin, keeps the head of
its output and kills its whole process group past the timeout. Retries, ordering
and the ledger are the outbox's (outbox.py).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sfwatch import cores
from sfwatch.config import HOOK_PATH

#: bytes of a hook's stdout and of its stderr kept for the log line; the rest is counted
HOOK_OUTPUT_KEEP = 4096
#: a hook past its timeout gets SIGTERM, then SIGKILL this much later (its whole group)
HOOK_KILL_GRACE = 2.0
#: after a hook exits, how long its output is still read (a child of it may hold the pipes)
HOOK_EXIT_GRACE = 1.0


def _env_value(value: object) -> str:
    if value is None:
        return ""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text.replace("\0", "")


def hook_env(event: str, data: dict[str, Any]) -> dict[str, str]:
    """A hook's whole environment, built from the job's fields: nothing is inherited.

    Unknown values are empty strings, so a script with ``set -u`` still runs.
    """
    fields = {
        "SFWATCH_EVENT": event,
        "SFWATCH_JOB_ID": data.get("job_id"),
        "SFWATCH_FILE": data.get("file"),
        "SFWATCH_OUTCOME": data.get("outcome"),
        "SFWATCH_ORIGINAL": data.get("moved_to"),
        "SFWATCH_TRANSCRIPT": data.get("transcript"),
        "SFWATCH_ERROR_FILE": data.get("error_file"),
        "SFWATCH_REASON": data.get("reason"),
        "SFWATCH_TRACE_ID": data.get("trace_id"),
        "SFWATCH_MODEL": data.get("model"),
        "SFWATCH_AUDIO_SECONDS": data.get("audio_seconds"),
        "SFWATCH_WATCH": data.get("watch"),
    }
    return {
        "PATH": HOOK_PATH,
        "LANG": "C.UTF-8",
        **{name: _env_value(value) for name, value in fields.items()},
    }


@dataclass(frozen=True)
class HookResult:
    """How one run of a hook went."""

    returncode: int | None  # None: it did not start
    timed_out: bool
    error: str | None  # why it did not start
    stdout: bytes  # the first HOOK_OUTPUT_KEEP bytes
    stderr: bytes
    stdout_bytes: int  # how much it wrote in all
    stderr_bytes: int
    seconds: float

    @property
    def ok(self) -> bool:
        """It ran, in time, and exited 0."""
        return self.returncode == 0 and not self.timed_out

    def problem(self) -> str:
        """What went wrong, in a few words."""
        if self.error is not None:
            return self.error
        if self.timed_out:
            return f"timed out after {self.seconds:.1f} s; its process group was killed"
        if self.returncode is not None and self.returncode < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-self.returncode).name}"
        return f"exit status {self.returncode}"


class _Capture:
    """The head of one output stream, and how long it was; the rest is dropped as read."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.head = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.keep - len(self.head)
        if room > 0:
            self.head += data[:room]


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the hook's process group, SIGKILL it after a grace; reap the hook."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(HOOK_KILL_GRACE)
    # Also whatever of its group outlived it (a hook's children).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_hook(
    argv: Sequence[str],
    env: dict[str, str],
    stdin: bytes,
    timeout: float,
    *,
    keep: int = HOOK_OUTPUT_KEEP,
    started: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> HookResult:
    """Run one hook: argv (no shell), ``env`` as its whole environment, ``stdin`` fed to it.

    It runs in a session (and process group) of its own in ``/``; past ``timeout``
    the whole group is killed. Its stdout and stderr are read as they come, the
    first ``keep`` bytes of each kept and the rest only counted, so a hook that
    prints gigabytes costs no memory. ``started`` is told the process (the outbox
    kills the hooks still running when the daemon stops).
    """
    begin = time.monotonic()
    try:
        with cores.wide():  # a hook may use every CPU, also when the daemon is pinned
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd="/",
                start_new_session=True,
                close_fds=True,
            )
    except OSError as exc:
        return HookResult(
            None, False, f"could not start {argv[0]}: {exc.strerror or exc}", b"", b"", 0, 0, 0.0
        )
    if started is not None:
        started(proc)
    assert proc.stdout is not None  # noqa: S101 - PIPEs above
    assert proc.stderr is not None  # noqa: S101
    out, err = _Capture(keep), _Capture(keep)
    captures = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    deadline = begin + timeout
    timed_out = _pump(proc, captures, memoryview(stdin), deadline)
    if not timed_out:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    if timed_out:
        _kill_group(proc)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    return HookResult(
        returncode=proc.returncode,
        timed_out=timed_out,
        error=None,
        stdout=bytes(out.head),
        stderr=bytes(err.head),
        stdout_bytes=out.total,
        stderr_bytes=err.total,
        seconds=time.monotonic() - begin,
    )


def _pump(
    proc: subprocess.Popen[bytes],
    captures: dict[int, _Capture],
    pending: memoryview,
    deadline: float,
) -> bool:
    """Feed stdin and read both outputs until they end; True if the deadline came first."""
    exited_at: float | None = None
    with selectors.DefaultSelector() as selector:
        for fd in captures:
            selector.register(fd, selectors.EVENT_READ)
        if proc.stdin is not None:
            os.set_blocking(proc.stdin.fileno(), False)
            selector.register(proc.stdin, selectors.EVENT_WRITE)
        while selector.get_map():
            now = time.monotonic()
            if now >= deadline:
                return True
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > HOOK_EXIT_GRACE:
                return False  # a child of the hook holds the pipes: stop reading them
            for key, _ in selector.select(min(deadline - now, 0.25)):
                stream = key.fileobj
                if stream is proc.stdin:
                    try:
                        written = os.write(proc.stdin.fileno(), pending[:65536])
                    except BlockingIOError:
                        continue
                    except OSError:  # EPIPE: the hook does not want (the rest of) it
                        written = len(pending)
                    pending = pending[written:]
                    if not pending:
                        selector.unregister(proc.stdin)
                        with contextlib.suppress(OSError):
                            proc.stdin.close()
                    continue
                data = os.read(key.fd, 65536)
                if data:
                    captures[key.fd].add(data)
                else:
                    selector.unregister(key.fd)
    return False


def output_text(data: bytes, total: int) -> str:
    text = data.decode("utf-8", errors="replace")
    return text + f"… [{total - len(data)} more bytes]" if total > len(data) else text


__all__ = [
    "HOOK_EXIT_GRACE",
    "HOOK_KILL_GRACE",
    "HOOK_OUTPUT_KEEP",
    "HookResult",
    "hook_env",
    "output_text",
    "run_hook",
]
