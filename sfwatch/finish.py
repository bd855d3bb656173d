"""finish: put the transcript where the user expects it, then move the original.

Every finish follows a *plan* (``job.Plan``): the names it will create, chosen
first and recorded durably by the caller (``record``) before anything visible
is made (docs/design.md §5). Then, for a transcribed file:

1. the transcript is written (tagged temp file, fsync, link into place, fsync);
2. the original moves to done/ (link + unlink, or a verified copy across file
   systems).

For a failed file the error file is written first and the original moved
second, so an original in failed/ always has its ``.error.json``.

A watch may ask for more than the ``.txt`` (``outputs: [txt, srt, vtt, json]``):
every output of one recording shares one stem with the original (``a (1).srt``
beside ``a (1).txt`` and ``done/a (1).mp3``; a name taken for any of them moves
them all), and they are made all or nothing: each is written to its tagged temp
first, and only when all are written are they linked into place (docs/design.md
§5.3). A kill between two links leaves a plan that the next run completes.

Each step is idempotent, so a killed or failed finish is simply run again with
the same plan: a name that already holds what the step would put there (the
job's inode, or its size and SHA-256; our transcript's bytes; an error file
naming our job) is accepted as done. A planned name taken by a stranger meanwhile
makes a new plan (``PlanConflict``); names are never overwritten, and the
transcript and the original always share one stem: ``a (1).txt`` beside
``done/a (1).mp3``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sfwatch.claim import work_parts
from sfwatch.config import WatchConfig
from sfwatch.config_request import render_name
from sfwatch.fsutil import (
    free_stems,
    link_or_rename_at,
    make_dirs,
    move_no_replace_at,
    numbered,
    same_content_at,
    temp_leaf,
    write_and_close,
    write_new_at,
)
from sfwatch.job import Job, Plan
from sfwatch.safefs import anchored, folder, fsync_fd, read_at, work_area
from sfwatch.subtitles import Timing, render

#: a longer "suffix" is part of the stem, so that derived names can be cut to fit
MAX_SUFFIX_BYTES = 32
#: what failed/ puts beside an original's name
ERROR_SUFFIX = ".error.json"
#: new plans tried when strangers keep taking the planned names (each one re-looks)
MAX_PLANS = 50


class PlanConflict(FileExistsError):
    """A planned name was taken by someone else's file before our step made it."""


@dataclass(frozen=True)
class Placed:
    """Where finish put things."""

    original: Path
    transcript: Path | None = None
    error_file: Path | None = None
    #: the outputs beside the transcript (``a.srt``, ``a.json``)
    outputs: tuple[Path, ...] = ()


def local_date(wall: float) -> str:
    """YYYY-MM-DD of the wall-clock time ``wall`` in this host's time zone."""
    return datetime.fromtimestamp(wall, UTC).astimezone().strftime("%Y-%m-%d")


@dataclass(frozen=True)
class Naming:
    """The values of ``transcript_name``'s placeholders other than ``{stem}``."""

    #: request.language, else what the server heard, else ``und`` (made file-name safe)
    lang: str = "und"
    #: YYYY-MM-DD, the local date of the claim
    date: str = ""
    model: str = ""

    def fill(self, template: str, stem: str) -> str:
        """``template`` with ``stem`` and these values."""
        return render_name(
            template,
            stem=stem,
            lang=self.lang,
            date=self.date or local_date(datetime.now(UTC).timestamp()),
            model=self.model,
        )


def transcript_folder(job: Job, watch: WatchConfig) -> Path:
    """The folder the transcript goes to: beside where the audio arrived, or transcript_dir."""
    base = watch.transcript_dir if watch.transcript_dir is not None else watch.path
    return base / job.rel.parent


def transcript_bytes(text: str) -> bytes:
    """UTF-8, ending with exactly one newline."""
    return (text.rstrip("\n") + "\n").encode("utf-8")


def _split(name: str) -> tuple[str, str]:
    path = Path(name)
    if len(os.fsencode(path.suffix)) > MAX_SUFFIX_BYTES:
        return name, ""  # "a.<200 bytes>" has no extension worth keeping whole
    return path.stem, path.suffix


def _nothing(_plan: Plan) -> None:
    return None


def _always() -> None:
    return None


# -- plans -------------------------------------------------------------------------------


def output_formats(watch: WatchConfig, timing: Timing | None) -> tuple[str, ...]:
    """The formats to write, the transcript's first (txt when asked for).

    A transcript paid for without segments (before ``outputs`` changed, or a
    server that sent none where none were needed) gets the outputs it can have:
    its txt; at least that.
    """
    wanted = [f for f in watch.outputs if f == "txt" or timing is not None] or ["txt"]
    return tuple(sorted(wanted, key=lambda f: f != "txt"))


def plan_done(job: Job, watch: WatchConfig, naming: Naming | None = None) -> Plan:
    """Free names for every output and the original in done/, all sharing one stem.

    The outputs are ``transcript_name`` filled in plus each format's extension. A
    stem is free only when *every* name is: ``a.srt`` alone taken moves all of them
    to ``a (1).*``. A template without ``{stem}`` (``"{date} notes"``) shares nothing
    with the original: its outputs and the original are each numbered on their own.
    """
    naming = naming or Naming()
    stem, suffix = _split(job.name)
    tdir = transcript_folder(job, watch)
    ddir = watch.done_dir / job.rel.parent
    exts = [f".{f}" for f in output_formats(watch, job.timing)]
    template = watch.transcript_name
    around = naming.fill(template, "")  # what the template adds to the stem
    longest_ext = max(exts, key=lambda e: len(os.fsencode(e)))
    if "{stem}" not in template:
        # Nothing to share: the outputs and the original each take their first free name.
        base = naming.fill(template, stem)
        outputs = _first_free(
            lambda n: [tdir / f"{numbered(base, n, '', longest_ext)}{ext}" for ext in exts]
        )
        (original,) = _first_free(lambda n: [ddir / numbered(stem, n, suffix)])
        return Plan("done", original=original, transcript=outputs[0], outputs=tuple(outputs[1:]))
    # One cut for all, so the stem fits beside the longest name it is part of.
    longest = max((suffix, around + longest_ext), key=lambda x: len(os.fsencode(x)))

    def named(n: int) -> list[Path]:
        candidate = numbered(stem, n, "", longest)
        base = naming.fill(template, candidate)
        return [ddir / f"{candidate}{suffix}", *(tdir / f"{base}{ext}" for ext in exts)]

    original, *outputs = _first_free(named)
    return Plan("done", original=original, transcript=outputs[0], outputs=tuple(outputs[1:]))


def _first_free(names: Callable[[int], list[Path]]) -> list[Path]:
    """``names(n)`` for the first n (0, 1, …) where none of them exists."""
    for n in itertools.count():
        candidates = names(n)
        if not any(os.path.lexists(p) for p in candidates):
            return candidates
    raise AssertionError("unreachable")  # pragma: no cover - count() never ends
    raise AssertionError("unreachable")  # pragma: no cover - count() never ends


def plan_failed(job: Job, watch: WatchConfig, error: dict[str, Any]) -> Plan:
    """Free names for the original in failed/ and its error file."""
    stem, suffix = _split(job.name)
    fdir = watch.failed_dir / job.rel.parent
    candidate = next(free_stems(stem, [(fdir, suffix), (fdir, f"{suffix}{ERROR_SUFFIX}")]))
    target = fdir / f"{candidate}{suffix}"
    return Plan(
        "failed",
        original=target,
        error_file=target.with_name(f"{target.name}{ERROR_SUFFIX}"),
        error=error,
    )


# -- carrying a plan out -----------------------------------------------------------------


def finish_done(
    job: Job,
    text: str,
    watch: WatchConfig,
    *,
    plan: Plan | None = None,
    record: Callable[[Plan], None] = _nothing,
    guard: Callable[[], None] = _always,
    naming: Naming | None = None,
) -> Placed:
    """Write the outputs, then move the original to done/, following ``plan``.

    Without a plan (or when a stranger took a planned name) a new one is made
    and passed to ``record`` before any file is written under it. ``guard`` is
    called before each visible step (it raises to stop them). The outputs are
    rendered from ``text`` and ``job.timing``; ``naming`` fills ``transcript_name``.
    """
    for _ in range(MAX_PLANS):
        if plan is None or plan.kind != "done":
            plan = plan_done(job, watch, naming)
            record(plan)
        files = output_files(plan, text, job.timing)
        try:
            return _carry_out_done(job, files, plan, watch, guard)
        except PlanConflict:
            undo(job, plan, files, watch)
            plan = None
    raise PlanConflict(f"no free name for {job.rel} after {MAX_PLANS} tries")


def finish_failed(
    job: Job,
    error: dict[str, Any],
    watch: WatchConfig,
    *,
    plan: Plan | None = None,
    record: Callable[[Plan], None] = _nothing,
    guard: Callable[[], None] = _always,
) -> Placed:
    """Write ``<name>.error.json`` in failed/, then move the original beside it."""
    for _ in range(MAX_PLANS):
        if plan is None or plan.kind != "failed":
            plan = plan_failed(job, watch, error)
            record(plan)
        try:
            return _carry_out_failed(job, plan, watch, guard)
        except PlanConflict:
            undo(job, plan, [], watch)
            plan = None
    raise PlanConflict(f"no free name for {job.rel} after {MAX_PLANS} tries")


def output_files(plan: Plan, text: str, timing: Timing | None) -> list[tuple[Path, bytes]]:
    """Each name a done plan writes, with its bytes (the format is the name's extension).

    Rendering is deterministic, so a run after a crash makes the same bytes and
    recognises the files the killed run wrote. A timed name without segments to
    fill it (a plan older than a lost timing) gets the text, never nothing.
    """
    files: list[tuple[Path, bytes]] = []
    for path in plan.written():
        fmt = path.suffix.removeprefix(".")
        try:
            files.append((path, render(fmt, text, timing)))
        except ValueError:
            files.append((path, transcript_bytes(text)))
    return files


def _carry_out_done(
    job: Job,
    files: Sequence[tuple[Path, bytes]],
    plan: Plan,
    watch: WatchConfig,
    guard: Callable[[], None],
) -> Placed:
    assert plan.transcript is not None  # noqa: S101 - a done plan always names one
    guard()
    mode = _source_mode(job, watch)
    with target_folder(plan.transcript, watch) as dfd:  # (all outputs share its folder)
        _write_all_once(dfd, [(p.name, data) for p, data in files], tag=job.job_id, mode=mode)
    guard()
    original = place_original(job, plan.original, watch)
    return Placed(original=original, transcript=plan.transcript, outputs=plan.outputs)


def _write_all_once(dfd: int, files: Sequence[tuple[str, bytes]], *, tag: str, mode: int) -> None:
    """Create every ``name`` that does not already hold its bytes, all or nothing.

    Every missing one is first written to its tagged temp (fsynced); only when all
    are written are they linked into place, so a kill or an error while writing
    leaves no new visible output, and a kill between links leaves names that the
    next run (same plan, same bytes) accepts and completes. A name held by anything
    else is a ``PlanConflict``: the caller removes what is ours and plans anew.
    """
    for name, _ in files:  # a killed earlier run's leftovers (remade below if needed)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_leaf(name, tag), dir_fd=dfd)
    missing = [(name, data) for name, data in files if not _holds(data)(dfd, name)]
    try:
        for name, data in missing:
            _write_temp(dfd, temp_leaf(name, tag), data, mode)
        for name, _ in missing:
            try:
                link_or_rename_at(dfd, temp_leaf(name, tag), dfd, name)
            except FileExistsError as exc:
                raise PlanConflict(name) from exc
        if missing:
            fsync_fd(dfd)
    finally:
        for name, _ in missing:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_leaf(name, tag), dir_fd=dfd)


def _write_temp(dfd: int, leaf: str, data: bytes, mode: int) -> None:
    """``data`` in the tagged temp ``leaf`` (a killed run's leftover is overwritten), fsynced."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(leaf, flags, mode, dir_fd=dfd)
    write_and_close(fd, data, sync=True)


def _carry_out_failed(
    job: Job, plan: Plan, watch: WatchConfig, guard: Callable[[], None]
) -> Placed:
    assert plan.error_file is not None  # noqa: S101 - a failed plan always names one
    body = error_body(job, plan.error or {})
    guard()
    mode = _source_mode(job, watch)
    with target_folder(plan.error_file, watch) as dfd:
        _write_once(
            dfd, plan.error_file.name, body, tag=job.job_id, mode=mode, ours=_ours(job.job_id)
        )
    guard()
    original = place_original(job, plan.original, watch)
    return Placed(original=original, error_file=plan.error_file)


def _write_once(
    dfd: int, name: str, data: bytes, *, tag: str, mode: int, ours: Callable[[int, str], bool]
) -> None:
    """Create ``name`` unless an earlier run of this step already did."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp_leaf(name, tag), dir_fd=dfd)  # a killed earlier write's leftover
    if ours(dfd, name):
        return
    try:
        write_new_at(dfd, name, data, tag=tag, mode=mode)
    except FileExistsError as exc:
        raise PlanConflict(name) from exc


# -- where things are: folder handles below the configured folders (safefs.py) -----------


def _roots(watch: WatchConfig) -> tuple[Path | None, ...]:
    # The watched folder first: a done/ inside it is reached through the share's entry.
    return (watch.path, watch.done_dir, watch.failed_dir, watch.transcript_dir)


@contextmanager
def target_folder(path: Path, watch: WatchConfig, *, create: bool = True) -> Iterator[int]:
    """A handle of the folder a planned name goes in; no link below the root followed.

    A symlink or a file where a folder must be is an OSError (ELOOP, ENOTDIR):
    the step fails and is tried again later; nothing is written elsewhere.
    """
    root, parts = anchored(path.parent, _roots(watch))
    if create and not root.is_dir():
        make_dirs(root)  # a configured folder (trusted as given) that is not there yet
    with folder(root, parts, create=create) as fd:
        yield fd


@contextmanager
def source_folder(job: Job, watch: WatchConfig) -> Iterator[int]:
    """A handle of the folder in the work area holding the claimed file."""
    with work_area(watch.path).folder(work_parts(job)[:-1], create=False) as fd:
        yield fd


def _source_mode(job: Job, watch: WatchConfig) -> int:
    """The recording's permission bits: what we write for it gets no more (0600 if gone)."""
    try:
        with source_folder(job, watch) as sfd:
            st = os.stat(job.name, dir_fd=sfd, follow_symlinks=False)
    except OSError:
        return 0o600
    return stat.S_IMODE(st.st_mode) & 0o666


def place_original(job: Job, target: Path, watch: WatchConfig) -> Path:
    """Move the claimed file to ``target``; accept it there if an earlier try moved it.

    FileNotFoundError when the file is neither claimed nor at ``target`` (a
    person removed it, or a sibling daemon adopted the job).
    """
    with target_folder(target, watch) as dfd:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_leaf(target.name, job.job_id), dir_fd=dfd)  # a killed copy's

        def held() -> bool:
            return same_content_at(dfd, target.name, job.signature.size, job.identity, job.sha256)

        try:
            with source_folder(job, watch) as sfd:
                try:
                    move_no_replace_at(sfd, job.name, dfd, target.name, tag=job.job_id)
                except FileExistsError as exc:
                    if not held():
                        raise PlanConflict(str(target)) from exc
                    # Killed between link() (or the copy) and unlink() last time: it is there.
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(job.name, dir_fd=sfd)
                    with contextlib.suppress(OSError):
                        fsync_fd(sfd)
        except FileNotFoundError:
            if held():
                return target  # moved by an earlier try that did not get to record it
            raise FileNotFoundError(
                2, "the claimed file is gone from the work area", str(job.path)
            ) from None
    return target


def undo(job: Job, plan: Plan, written: Sequence[tuple[Path, bytes]], watch: WatchConfig) -> None:
    """Remove what an abandoned plan made of ours (never a stranger's file), and its temps.

    ``written``: each output of a done plan with the bytes that make it ours.
    """
    made: list[tuple[Path | None, Callable[[int, str], bool]]] = [
        (path, _holds(data)) for path, data in written
    ]
    made.append((plan.error_file, _ours(job.job_id)))
    for path, ours in made:
        if path is None:
            continue
        with contextlib.suppress(OSError), target_folder(path, watch, create=False) as dfd:
            if ours(dfd, path.name):
                os.unlink(path.name, dir_fd=dfd)
    remove_temps(job.job_id, plan, watch)


def remove_temps(job_id: str, plan: Plan, watch: WatchConfig) -> None:
    """Remove the tagged temporary files a killed step of ``plan`` may have left."""
    for path in plan.paths():
        with contextlib.suppress(OSError), target_folder(path, watch, create=False) as dfd:
            os.unlink(temp_leaf(path.name, job_id), dir_fd=dfd)


def _holds(data: bytes) -> Callable[[int, str], bool]:
    """Is ``name`` in a folder a regular file holding exactly ``data``?"""

    def check(dfd: int, name: str) -> bool:
        try:
            return read_at(dfd, name, len(data) + 1) == data
        except OSError:
            return False

    return check


def _ours(job_id: str) -> Callable[[int, str], bool]:
    """Is ``name`` in a folder an error file that this job wrote?"""

    def check(dfd: int, name: str) -> bool:
        try:
            return bool(json.loads(read_at(dfd, name)).get("job_id") == job_id)
        except (OSError, ValueError, AttributeError):
            return False

    return check


def holds_bytes(path: Path, data: bytes) -> bool:
    """Is ``path`` a regular file holding exactly ``data``?"""
    try:
        with folder(path.parent, ()) as dfd:
            return _holds(data)(dfd, path.name)
    except OSError:
        return False


def is_our_error_file(path: Path, job_id: str) -> bool:
    """Is ``path`` an error file that this job wrote?"""
    try:
        with folder(path.parent, ()) as dfd:
            return _ours(job_id)(dfd, path.name)
    except OSError:
        return False


def error_record(job: Job, error: dict[str, Any]) -> dict[str, Any]:
    """The content of ``<name>.error.json``."""
    return {
        "file": str(job.rel),
        "reason": error.get("reason"),
        "message": error.get("message"),
        "http_status": error.get("http_status"),
        "api_message": error.get("api_message"),
        "trace_id": error.get("trace_id"),
        "trace_ids": list(job.trace_ids),
        "attempts": job.attempts,
        "sha256": job.sha256,
        "job_id": job.job_id,
        "time": error.get("time") or datetime.now(UTC).isoformat(timespec="seconds"),
    }


def error_body(job: Job, error: dict[str, Any]) -> bytes:
    """``error_record`` as the bytes of the file."""
    return (json.dumps(error_record(job, error), ensure_ascii=False, indent=2) + "\n").encode()
