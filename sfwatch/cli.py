"""The command line: ``sfwatch run | check | transcribe | status | retry``.

Exit codes (docs/design.md §10): 0 success, 1 a command's work failed (an online check,
a one-shot transcription), 2 any usage or config error — with a message that
names the config key.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from sfwatch import __version__
from sfwatch.admin import RetryRefused, format_status, retry, status_report
from sfwatch.backoff import full_jitter
from sfwatch.config import (
    ApiConfig,
    Config,
    LogConfig,
    Secret,
    config_warnings,
    default_state_dir,
    find_config_file,
    load_api_key,
    load_config,
    shown_url,
)
from sfwatch.errors import (
    EXIT_CONFIG,
    ConfigError,
    RateLimited,
    SfwatchError,
    TranscribeError,
    TransientError,
)
from sfwatch.finish import transcript_bytes
from sfwatch.fsutil import free_stems, write_new_file
from sfwatch.job import Job, new_job_id
from sfwatch.logs import configure, get_logger
from sfwatch.prepare import prepare
from sfwatch.probe_fields import probe_requests, run_probes
from sfwatch.settle import signature_of
from sfwatch.text import printable
from sfwatch.transcribe import Transcriber

EXIT_OK, EXIT_FAILED = 0, 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every sub-command."""
    parser = argparse.ArgumentParser(
        prog="sfwatch", description="Turn a folder into a speech-to-text inbox."
    )
    parser.add_argument("--version", action="version", version=f"sfwatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "-c",
            "--config",
            metavar="FILE",
            help="config file (default: $SFWATCH_CONFIG, ./sfwatch.yaml, /etc/sfwatch/config.yaml)",
        )
        return p

    run = command("run", "run the daemon in the foreground")
    run.add_argument(
        "--burst", action="store_true", help="process what is in the watched folders, then exit"
    )
    # (how the face starts its worker processes: sfwatch/workers.py; not for people)
    run.add_argument("--worker", metavar="K/N", help=argparse.SUPPRESS)
    check = command("check", "validate the config (and with --online, the key and endpoint)")
    check.add_argument("--online", action="store_true", help="also call GET /user/info")
    one = command("transcribe", "transcribe files once: a sibling .txt each, nothing moved")
    one.add_argument("audio", nargs="+", metavar="AUDIO", type=Path)
    status = command("status", "what the daemon is doing: counts, queue, pause, failures")
    status.add_argument("--json", action="store_true", help="print JSON")
    again = command("retry", "move failed files back into their inbox")
    which = again.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every failed file")
    which.add_argument("files", nargs="*", default=[], metavar="FILE", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sfwatch`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "check":
            return cmd_check(args)
        if args.command == "transcribe":
            return cmd_transcribe(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "retry":
            return cmd_retry(args)
    except ConfigError as exc:
        # Values and paths in the message are the user's, and may hold anything.
        print(f"sfwatch: {printable(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_CONFIG  # pragma: no cover - argparse requires a command


def _load(args: argparse.Namespace) -> Config:
    return load_config(find_config_file(args.config))


def cmd_run(args: argparse.Namespace) -> int:
    """``sfwatch run``: the daemon."""
    from sfwatch.workers import (  # noqa: PLC0415 - keeps `check` and `--help` light
        Share,
        Workers,
        become_worker,
        check_face_config,
        hold_signals,
        lock_state_dir,
    )

    share = None
    if args.worker is not None:
        share = Share.parse(args.worker)
        become_worker()
    else:
        hold_signals()  # (until Daemon.run's handlers: a stop while importing is warm)
    config = _load(args)
    if share is not None:
        check_face_config(config, share)
    key = load_api_key(config)
    fields = {} if share is None else {"worker": share.index}
    configure(config.log.format, config.log.level, secrets=[key.reveal()], fields=fields)
    for warning in config_warnings(config) if share is None else ():  # (the face says them)
        get_logger().warning("sfwatch.config_warning", message=warning)
    started = None
    if share is None and config.workers > 1:
        # The workers import and start while the face does: they are ready when it is.
        started = (
            lock_state_dir(config.state_dir),
            Workers(config, config.workers, burst=args.burst, log=get_logger()),
        )
        started[1].start()
    from sfwatch.daemon import Daemon  # noqa: PLC0415 - as the workers above
    from sfwatch.outbox import check_integrations  # noqa: PLC0415 - as the workers above

    check_integrations(config)
    daemon = Daemon(config, key, burst=args.burst, share=share, started=started)
    try:
        code = daemon.run()
    except Exception:
        if not daemon.abandoned:
            raise
        # A cold stop whose last writes failed (the state disk): still leave now.
        get_logger().exception("sfwatch.shutdown_failed")
        code = 1
    if daemon.abandoned:
        # A cold stop: uploads are still blocked in worker threads that Python would
        # wait for at exit. Their files stay claimed and resume at the next start.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def cmd_check(args: argparse.Namespace) -> int:
    """``sfwatch check``: validate, and optionally call the API."""
    from sfwatch.outbox import check_integrations  # noqa: PLC0415 - imports Apprise if used

    config = _load(args)
    key = load_api_key(config)
    check_integrations(config)
    _warn(config)
    print(f"config ok: {printable(config.source)}")
    for watch in config.watch:
        print(f"  watching {printable(watch.path)} (settle {watch.settle_seconds:g} s)")
    if not args.online:
        return EXIT_OK
    probes = probe_requests(config)
    with Transcriber(config.api.base_url, key, timeout_seconds=30) as client:
        try:
            info = client.check_account()
        except SfwatchError as exc:
            message = printable(_scrub(str(exc), key))
            no_info = isinstance(exc, TranscribeError) and exc.http_status in (404, 405)
            if not (probes and no_info):
                print(f"sfwatch: online check failed: {message}", file=sys.stderr)
                return EXIT_FAILED
            # OpenAI, Groq, speaches, whisper.cpp have no /user/info: the probes tell.
            print(f"online: no /user/info here ({message}); probing the uploads instead")
            info = None
        if info is not None:
            balance = info.get("balance") or info.get("totalBalance")
            print(
                f"online ok: {printable(shown_url(config.api.base_url))} accepts the key"
                + (
                    f" (balance {printable(_scrub(str(balance), key))[:100]})"
                    if balance is not None
                    else ""
                )
            )
        return run_probes(client, probes, key)


def _warn(config: Config) -> None:
    """What the config allows but is probably a mistake, on stderr (not an error)."""
    for warning in config_warnings(config):
        print(f"sfwatch: warning: {printable(warning)}", file=sys.stderr)


def _scrub(text: str, key: Secret) -> str:
    return text.replace(key.reveal(), "***")


def _oneshot_config(args: argparse.Namespace) -> Config:
    """The config for ``transcribe``: the config file if there is one, else defaults."""
    try:
        path = find_config_file(args.config)
    except ConfigError:
        if args.config or os.environ.get("SFWATCH_CONFIG"):
            raise
        return Config(
            api=ApiConfig(), state_dir=default_state_dir(os.environ), log=LogConfig(), watch=()
        )
    return load_config(path)  # a config that exists but is wrong is an error, not ignored


def cmd_transcribe(args: argparse.Namespace) -> int:
    """``sfwatch transcribe``: one upload per file, a sibling .txt, nothing moved."""
    config = _oneshot_config(args)
    key = load_api_key(config)
    _warn(config)
    configure(
        "console" if sys.stderr.isatty() else "json",
        "warning",
        secrets=[key.reveal()],
        stream=sys.stderr,
    )
    tty = sys.stderr.isatty()
    failed = 0
    with Transcriber(
        config.api.base_url, key, timeout_seconds=config.api.timeout_seconds
    ) as client:
        for number, audio in enumerate(args.audio, 1):
            if tty:
                shown = printable(audio)
                print(f"[{number}/{len(args.audio)}] {shown} …", file=sys.stderr, flush=True)
            try:
                out = _transcribe_one(client, audio, config)
            except (SfwatchError, OSError) as exc:
                failed += 1
                message = _scrub(str(exc), key)
                print(f"sfwatch: {printable(audio)}: {printable(message)}", file=sys.stderr)
                continue
            print(printable(out))
    return EXIT_FAILED if failed else EXIT_OK


def _transcribe_one(client: Transcriber, audio: Path, config: Config) -> Path:
    """Probe, fit (transcode/split) and upload one file; write its sibling transcript."""
    signature = signature_of(audio)
    if signature is None:
        raise SfwatchError("not a regular file")
    job = Job(new_job_id(), audio.parent, PurePosixPath(audio.name), audio, signature)
    with tempfile.TemporaryDirectory(prefix="sfwatch-") as scratch:
        prepared = prepare(job, config, "oneshot", Path(scratch))
        texts = [
            _upload(client, part.path, part.upload_name, config.api) for part in prepared.parts
        ]
    for candidate in free_stems(audio.stem, [(audio.parent, ".txt")]):
        target = audio.parent / f"{candidate}.txt"
        try:
            write_new_file(target, transcript_bytes("\n".join(t.strip() for t in texts)))
        except FileExistsError:
            continue
        return target
    raise AssertionError("unreachable")  # pragma: no cover


def _upload(client: Transcriber, path: Path, name: str, api: ApiConfig) -> str:
    """One part, retried on the service's transient faults up to ``api.max_attempts``."""
    for attempt in range(1, api.max_attempts + 1):
        try:
            return client.transcribe(path, name, api.model).text
        except TransientError as exc:
            if attempt == api.max_attempts:
                raise
            wait = exc.retry_after if isinstance(exc, RateLimited) and exc.retry_after else 0.0
            time.sleep(max(wait, full_jitter(attempt, cap=30.0)))
    raise AssertionError("unreachable")  # pragma: no cover


def cmd_status(args: argparse.Namespace) -> int:
    """``sfwatch status``: from the ledger, safe while the daemon runs."""
    report = status_report(_load(args))
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    """``sfwatch retry``: failed originals back into their inbox.

    One line per file moved on stdout; a warning on stderr for each file skipped
    (the ledger does not show it as failed, or it is gone from failed/), which
    does not change the exit status. 1 if a named FILE is no failed file (not in
    a failed_dir, no such file) or a move failed; the other files are retried.
    2 when it refuses to start: run as root for a daemon that is not root, or no
    ledger in state_dir.
    """
    if not args.all and not args.files:
        print("sfwatch: retry: name FILEs or give --all", file=sys.stderr)
        return EXIT_CONFIG
    try:
        report = retry(_load(args), args.files, everything=args.all)
    except RetryRefused as exc:
        print(f"sfwatch: {printable(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    for source, target in report.moved:
        print(f"{printable(source)} -> {printable(target)}")
    for path, why in report.skipped:
        print(f"sfwatch: retry: skipped {printable(path)}: {printable(why)}", file=sys.stderr)
    for path, why in report.errors:
        print(f"sfwatch: retry: {printable(path)}: {printable(why)}", file=sys.stderr)
    if not report.moved:
        print("nothing retried")
    return EXIT_FAILED if report.errors else EXIT_OK
