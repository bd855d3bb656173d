"""Audio with PyAV: probe, transcode to 16 kHz mono MP3, split at quiet moments.

The only module that imports ``av``. PyAV's wheels bundle FFmpeg, so no system
ffmpeg is needed. Every PyAV error is translated here into ``PrepareError``
(reason ``not_audio``), so callers see one error type; the exceptions are errors
of the machine rather than the file (the file vanished, the disk is full, a
permission is missing: see ``_ENVIRONMENT_ERRNOS``), which propagate as the
``OSError`` they are, as any other file operation's would.

Memory stays bounded whatever the file's length: audio is decoded, resampled and
encoded frame by frame; the only whole-file data kept is one loudness value per
tenth of a second (a two-hour file: 72,000 floats).
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from sfwatch.errors import PrepareError


class _PyAV:
    """``av``, imported at its first use (``warm_up`` starts that early, in the background).

    Importing PyAV loads FFmpeg's libraries: 40-70 ms here with them in the page
    cache, more from a cold disk. Made before the daemon watches, it delays the
    first upload by as much; the daemon waits for files to settle anyway
    (docs/benchmarks.md, d). The import system's lock makes a use during the
    background import wait for it.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.import_module("av"), name)


if TYPE_CHECKING:
    import av
else:
    av = _PyAV()


def warm_up() -> None:
    """Import PyAV now (from a background thread: the first probe then finds it loaded)."""
    importlib.import_module("av")


if TYPE_CHECKING:
    # numpy is imported where loudness is measured (only long files are cut): it is
    # a fifth of the daemon's start-up time (docs/benchmarks.md, d). PyAV's own
    # to_ndarray and from_ndarray import it the same way.
    import numpy as np


#: what transcoding produces: what the models use internally, in a format every server takes
TARGET_RATE = 16_000
TARGET_BITRATE = 32_000
#: loudness is measured per block of this many seconds when choosing where to cut
BLOCK_SECONDS = 0.1
#: container formats the API takes as they are (FFmpeg's names), when they hold no video
ACCEPTED_FORMATS = {"mp3", "wav", "flac", "ogg", "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"}
#: file name endings that go with an accepted format (.mp4/.mkv/.mov are video containers)
ACCEPTED_SUFFIXES = {".mp3", ".wav", ".flac", ".ogg", ".opus", ".oga", ".m4a", ".webm"}


@dataclass(frozen=True)
class AudioInfo:
    """What a probe found out about a file."""

    container: str
    codec: str
    duration: float | None
    sample_rate: int
    channels: int
    has_video: bool

    def accepted_as(self, suffix: str) -> bool:
        """Would the API take this file as it is, under this name ending?"""
        return (
            self.container in ACCEPTED_FORMATS
            and not self.has_video
            and suffix.lower() in ACCEPTED_SUFFIXES
        )


def _not_audio(exc: BaseException) -> PrepareError:
    return PrepareError("not_audio", f"not decodable audio: {exc}")


#: demuxers tried first by a file's name ending. FFmpeg's format probe (every demuxer's
#: guess at the first bytes) is a third of a short WAV's probe; WAV's demuxer checks its
#: header strictly (RIFF/RF64/BW64 … WAVE), so it takes no other format's file, and a
#: file it refuses (a name can lie) is probed as usual
_STRICT_DEMUXERS = {".wav": "wav"}


def probe(path: Path, suffix: str = "") -> AudioInfo:
    """Container, codec, duration; PrepareError("not_audio") if there is no decodable audio.

    ``suffix``: the file's name ending, when ``path`` does not show it (``/proc/self/fd/N``).
    """
    if (demuxer := _STRICT_DEMUXERS.get(suffix.lower())) is not None:
        try:
            with av.open(str(path), format=demuxer, metadata_errors="ignore") as container:
                return _probe_open(container)
        except av.error.InvalidDataError:
            pass  # not what its name says: FFmpeg's own probe tells what it is
        except (av.FFmpegError, OSError, ValueError) as exc:
            _reraise(exc)
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            return _probe_open(container)
    except (av.FFmpegError, OSError, ValueError) as exc:
        _reraise(exc)


def _probe_open(container: Any) -> AudioInfo:
    audio = container.streams.audio
    if not audio:
        raise PrepareError("not_audio", "the file has no audio stream")
    stream = audio[0]
    has_video = any(
        not (s.disposition & av.stream.Disposition.attached_pic)  # cover art is fine
        for s in container.streams.video
    )
    duration: float | None = None
    if container.duration:
        duration = container.duration / av.time_base
    elif stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    decoded = next(_frames(container, stream), None)
    if decoded is None:
        raise PrepareError("not_audio", "the audio stream holds no decodable audio")
    return AudioInfo(
        container=container.format.name,
        codec=stream.codec_context.name,
        duration=duration,
        sample_rate=stream.rate or decoded.sample_rate,
        channels=stream.channels or len(decoded.layout.channels),
        has_video=has_video,
    )


#: corrupt packets skipped (as the ffmpeg tool does) before a stream counts as not audio,
#: as long as they are not the majority
MAX_BAD_PACKETS = 20


def _frames(container: Any, stream: Any) -> Iterator[Any]:
    """The stream's decoded frames, skipping packets the decoder rejects.

    Real files have the odd damaged frame (a download cut and resumed, two
    recordings joined); one should not cost the whole file. More than
    ``MAX_BAD_PACKETS`` rejected packets, if they outnumber the good ones, or a
    stream of which not one packet decodes, are ``PrepareError("not_audio")``:
    whatever errno a decoder's error carries (AAC's is EPERM), it is the data's.
    """
    good = bad = 0
    error: av.FFmpegError | None = None
    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except av.FFmpegError as exc:
            bad, error = bad + 1, exc
            if bad > MAX_BAD_PACKETS and bad > good:
                raise _not_audio(exc) from exc
            continue
        if packet.size:
            good += 1
        yield from frames
    if error is not None and not good:
        raise _not_audio(error) from error


def _mono_blocks(path: Path) -> Iterator[np.ndarray[Any, np.dtype[np.int16]]]:
    """The audio as 16 kHz mono int16 arrays, frame by frame.

    A stream may change its sample rate or channel layout midway (joined
    recordings, HE-AAC, radio captures); PyAV's resampler refuses frames unlike
    its first, so a change flushes it and starts a new one.
    """
    resampler: Any = None
    shape: tuple[str, str, int] | None = None
    with av.open(str(path), metadata_errors="ignore") as container:
        stream = container.streams.audio[0]
        for frame in _frames(container, stream):
            frame_shape = (frame.format.name, frame.layout.name, frame.sample_rate)
            if frame_shape != shape:
                if resampler is not None:
                    for out in resampler.resample(None):
                        yield out.to_ndarray()[0]
                resampler = av.AudioResampler(format="s16p", layout="mono", rate=TARGET_RATE)
                shape = frame_shape
            for out in resampler.resample(frame):
                yield out.to_ndarray()[0]
        if resampler is not None:
            for out in resampler.resample(None):
                yield out.to_ndarray()[0]


def loudness(path: Path) -> np.ndarray[Any, np.dtype[np.float64]]:
    """Root-mean-square level of each 0.1 s block of the file (decoded once)."""
    import numpy as np  # noqa: PLC0415 - see the import at the top

    block = int(TARGET_RATE * BLOCK_SECONDS)
    levels: list[float] = []
    carry = np.zeros(0, dtype=np.int16)
    try:
        for samples in _mono_blocks(path):
            data = np.concatenate([carry, samples])
            whole = len(data) // block * block
            if whole:
                chunk = data[:whole].astype(np.float64).reshape(-1, block)
                levels.extend(np.sqrt((chunk * chunk).mean(axis=1)).tolist())
            carry = data[whole:]
    except av.FFmpegError as exc:
        _reraise(exc)
    if len(carry):
        tail = carry.astype(np.float64)
        levels.append(math.sqrt(float((tail * tail).mean())))
    return np.asarray(levels, dtype=np.float64)


def choose_cuts(
    levels: Sequence[float] | np.ndarray[Any, np.dtype[np.float64]],
    max_seconds: float,
    window_seconds: float = 120.0,
) -> list[float]:
    """Where to cut so that no part is longer than ``max_seconds``.

    Each cut is in the quietest stretch within ``window_seconds`` before the
    point where the part would become too long: in the middle of a pause, when
    there is one, rather than mid-word or at the pause's very edge. A block
    counts as quiet only when its neighbours are (see ``PAUSE_SECONDS``), so the
    short silence before a plosive does not pass for a pause. Cuts fall on
    block boundaries (multiples of ``BLOCK_SECONDS``).
    """
    import numpy as np  # noqa: PLC0415 - see the import at the top

    levels = np.asarray(levels, dtype=np.float64)
    max_blocks = _blocks(max_seconds)
    if max_blocks < 2:
        raise ValueError(f"max_seconds must be at least {2 * BLOCK_SECONDS} s, not {max_seconds}")
    window = max(1, min(_blocks(window_seconds), max_blocks // 2))
    cuts: list[float] = []
    start = 0
    while len(levels) - start > max_blocks:
        hi = start + max_blocks  # the part would be too long past this block
        lo = max(start + 1, hi - window)
        quietest = _quietest(levels, lo, hi)
        cuts.append(round(quietest * BLOCK_SECONDS, 6))
        start = quietest
    return cuts


#: a pause lasts at least this long: a block scores as loud as the loudest block
#: within half of this on either side
PAUSE_SECONDS = 0.5
#: levels (RMS of int16 samples) this close to the quietest count as equally quiet
QUIET_TOLERANCE = 1.0


def _blocks(seconds: float) -> int:
    """Whole blocks in ``seconds`` (robust to 0.1 not being exact in binary)."""
    return math.floor(seconds / BLOCK_SECONDS + 1e-9)


def _quietest(levels: np.ndarray[Any, np.dtype[np.float64]], lo: int, hi: int) -> int:
    """The block in ``[lo, hi)`` at the middle of the longest quietest stretch."""
    import numpy as np  # noqa: PLC0415 - see the import at the top

    reach = _blocks(PAUSE_SECONDS / 2)
    index = np.arange(lo, hi)
    neighbours = np.clip(index[None, :] + np.arange(-reach, reach + 1)[:, None], 0, len(levels) - 1)
    score = levels[neighbours].max(axis=0)
    quiet = score <= score.min() + QUIET_TOLERANCE
    # runs of quiet blocks: [starts[i], ends[i]) in window coordinates
    edges = np.diff(np.concatenate([[0], quiet.astype(np.int8), [0]]))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    lengths = ends - starts
    # the longest run; among equally long ones the last (parts as long as allowed)
    best = len(lengths) - 1 - int(np.argmax(lengths[::-1]))
    return lo + int((starts[best] + ends[best]) // 2)


def transcode(src: Path, part_path: Callable[[int], Path], cuts: Sequence[float]) -> list[Path]:
    """Re-encode ``src`` as 16 kHz mono MP3, one file per part between ``cuts`` (seconds).

    Returns the part files in order. Each starts at time 0 and cuts fall on
    exact samples. Cuts at or past the end of the audio make no (empty) parts.
    On any error the parts written so far are removed.
    """
    boundaries = _boundaries(cuts, TARGET_RATE)
    paths: list[Path] = []
    writer: _Mp3Writer | None = None
    position = 0  # samples of the whole file written so far
    done = False
    try:
        for samples in _mono_blocks(src):
            offset = 0
            while offset < len(samples):
                index = len(paths) if writer is None else len(paths) - 1
                end = boundaries[index] if index < len(boundaries) else None
                take = (
                    len(samples) - offset
                    if end is None
                    else min(end - position, len(samples) - offset)
                )
                if writer is None:
                    paths.append(part_path(len(paths)))
                    writer = _Mp3Writer(paths[-1])
                writer.write(samples[offset : offset + take])
                offset += take
                position += take
                if end is not None and position >= end:
                    writer.close()
                    writer = None
        if writer is not None:
            writer.close()
            writer = None
        done = True
    except av.FFmpegError as exc:
        _reraise(exc)
    finally:
        if not done:
            if writer is not None:
                _discard(writer.container)
            _remove(paths)
    return paths


def _boundaries(cuts: Sequence[float], rate: int) -> list[int]:
    """Cuts in samples at ``rate``; ValueError unless strictly increasing and positive."""
    boundaries = [round(c * rate) for c in cuts]
    if any(b <= a for a, b in zip([0, *boundaries], boundaries, strict=False)):
        raise ValueError(f"cuts must be positive and increasing: {list(cuts)}")
    return boundaries


def _remove(paths: Sequence[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


#: errors of the machine, not the file (missing file, full disk, permissions, a
#: network share's stale handle or lost server): these propagate as ``OSError``
#: (retried) instead of failing the file as not audio
_ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.EACCES,
        errno.EPERM,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EIO,
        errno.EMFILE,
        errno.ENFILE,
        errno.EFBIG,
        errno.ESTALE,  # NFS: the server removed or replaced what the handle named
        errno.ETIMEDOUT,  # NFS soft mounts, SMB
        errno.ENOTCONN,  # SMB/CIFS: the connection to the server is down
        errno.EHOSTDOWN,
        errno.ENOLINK,
    }
)


def _reraise(exc: Exception) -> NoReturn:
    """Raise ``exc`` again: as itself when it is the machine's fault (an ``OSError``
    in ``_ENVIRONMENT_ERRNOS``), otherwise as ``PrepareError("not_audio")``."""
    if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS:
        raise exc
    raise _not_audio(exc) from exc


def _discard(container: Any) -> None:
    """Close an output container after a failure, ignoring what closing raises."""
    if container is not None:
        with contextlib.suppress(av.FFmpegError, OSError):
            container.close()


class _Mp3Writer:
    """One MP3 output file fed with int16 mono samples."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.container = av.open(str(path), "w", format="mp3")
        # compression_level 7: LAME's faster search, ~1.9x quicker; for 32 kbps speech
        # going to a recogniser the difference is inaudible.
        self.stream = self.container.add_stream(
            "libmp3lame", rate=TARGET_RATE, layout="mono", options={"compression_level": "7"}
        )
        self.stream.bit_rate = TARGET_BITRATE

    def write(self, samples: np.ndarray[Any, np.dtype[np.int16]]) -> None:
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16p", layout="mono")
        frame.sample_rate = TARGET_RATE
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()


def stream_copy(src: Path, part_path: Callable[[int], Path], cuts: Sequence[float]) -> list[Path]:
    """Split an MP3 without re-encoding: whole packets go to the part their time falls in.

    Times count from the first decoded sample, as ``loudness`` does, and a
    packet belongs to the part in which the middle of its sound falls, so each
    part starts within half a packet (13-36 ms) of its cut. The decoder's delay
    (``MP3_DECODER_DELAY`` samples, 12-66 ms) before a cut is lost: it would
    need the next part's first packet. Packets of later parts lose their
    skip-samples side data: the MP3 muxer would write a gapless header from it
    that drops the first quarter second of the last part. On any error the
    parts written so far are removed.
    """
    _boundaries(cuts, 1000)  # validate
    paths: list[Path] = []
    out: Any = None
    done = False
    try:
        with av.open(str(src), metadata_errors="ignore") as container:
            stream = container.streams.audio[0]
            unit = float(stream.time_base) if stream.time_base is not None else 1.0
            # a packet's sound starts this long after its timestamp, counted as
            # loudness counts: the decoder's delay, minus what the gapless header
            # of the source tells decoders to drop (its start time)
            lag = MP3_DECODER_DELAY / (stream.rate or 44_100) - (stream.start_time or 0) * unit
            ost: Any = None
            first_pts = 0
            current = -1  # the part being written (of len(cuts) + 1)
            for packet in container.demux(stream):
                if packet.pts is None or packet.size == 0:
                    continue
                middle = (packet.pts + (packet.duration or 0) / 2) * unit + lag
                part = sum(1 for c in cuts if middle >= c)
                if part > current:  # parts no packet falls in are skipped, not left empty
                    current = part
                    if out is not None:
                        out.close()
                        out = None
                    paths.append(part_path(len(paths)))
                    out = av.open(str(paths[-1]), "w", format="mp3")
                    ost = out.add_stream_from_template(stream)
                    first_pts = packet.pts
                copy = packet
                if len(paths) > 1 and packet.has_sidedata("skip_samples"):
                    copy = _bare_copy(packet)
                copy.stream = ost
                copy.pts = copy.dts = packet.pts - first_pts
                out.mux(copy)
            if out is not None:
                out.close()
                out = None
        done = True
    except av.FFmpegError as exc:
        _reraise(exc)
    finally:
        if not done:
            _discard(out)
            _remove(paths)
    return paths


#: samples an MP3 decoder's output lags its input (the synthesis filterbank's delay);
#: a gapless (LAME) header tells decoders to drop it with the encoder's own delay
MP3_DECODER_DELAY = 528 + 1


def _bare_copy(packet: Any) -> Any:
    """The packet's data and timing without its side data."""
    bare = av.Packet(bytes(packet))
    bare.pts, bare.dts, bare.duration = packet.pts, packet.dts, packet.duration
    bare.time_base = packet.time_base
    return bare
