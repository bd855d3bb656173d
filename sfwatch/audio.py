"""Audio with PyAV: probe, transcode to 16 kHz mono MP3, split at quiet moments.

The only module that imports ``av``. PyAV's wheels bundle FFmpeg, so no system
ffmpeg is needed. Every PyAV error is translated here into ``PrepareError``
(reason ``not_audio``), so callers see one error type.

Memory stays bounded whatever the file's length: audio is decoded, resampled and
encoded frame by frame; the only whole-file data kept is one loudness value per
tenth of a second (a two-hour file: 72,000 floats).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np

from sfwatch.errors import PrepareError

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


def probe(path: Path) -> AudioInfo:
    """Container, codec, duration; PrepareError("not_audio") if there is no decodable audio."""
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            return _probe_open(container)
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise _not_audio(exc) from exc


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
    decoded = next(container.decode(stream), None)
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


def _mono_blocks(path: Path) -> Iterator[np.ndarray[Any, np.dtype[np.int16]]]:
    """The audio as 16 kHz mono int16 arrays, frame by frame."""
    resampler = av.AudioResampler(format="s16p", layout="mono", rate=TARGET_RATE)
    with av.open(str(path), metadata_errors="ignore") as container:
        stream = container.streams.audio[0]
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                yield out.to_ndarray()[0]
        for out in resampler.resample(None):
            yield out.to_ndarray()[0]


def loudness(path: Path) -> np.ndarray[Any, np.dtype[np.float64]]:
    """Root-mean-square level of each 0.1 s block of the file (decoded once)."""
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
        raise _not_audio(exc) from exc
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

    Each cut is at the quietest 0.1 s block within ``window_seconds`` before the
    point where the part would become too long: at a pause, when there is one,
    rather than mid-word.
    """
    levels = np.asarray(levels, dtype=np.float64)
    total = len(levels) * BLOCK_SECONDS
    max_blocks = int(max_seconds / BLOCK_SECONDS)
    window = max(1, min(int(window_seconds / BLOCK_SECONDS), max_blocks // 2))
    cuts: list[float] = []
    start = 0
    while (len(levels) - start) * BLOCK_SECONDS > max_seconds:
        hi = start + max_blocks  # the part would be too long past this block
        lo = hi - window
        quietest = lo + int(np.argmin(levels[lo:hi]))
        cuts.append(quietest * BLOCK_SECONDS)
        start = quietest
    return [c for c in cuts if 0 < c < total]


def transcode(src: Path, part_path: Callable[[int], Path], cuts: Sequence[float]) -> list[Path]:
    """Re-encode ``src`` as 16 kHz mono MP3, one file per part between ``cuts`` (seconds).

    Returns the part files in order. Each starts at time 0 and cuts fall on
    exact samples.
    """
    boundaries = [round(c * TARGET_RATE) for c in cuts]
    paths: list[Path] = []
    writer: _Mp3Writer | None = None
    position = 0  # samples of the whole file written so far
    try:
        for samples in _mono_blocks(src):
            offset = 0
            while offset < len(samples):
                if writer is None:
                    paths.append(part_path(len(paths)))
                    writer = _Mp3Writer(paths[-1])
                index = len(paths) - 1
                end = boundaries[index] if index < len(boundaries) else None
                room = len(samples) - offset if end is None else end - position
                take = min(room, len(samples) - offset)
                if take > 0:
                    writer.write(samples[offset : offset + take])
                    offset += take
                    position += take
                if end is not None and position >= end:
                    writer.close()
                    writer = None
        if writer is not None:
            writer.close()
            writer = None
    except av.FFmpegError as exc:
        raise _not_audio(exc) from exc
    finally:
        if writer is not None:
            writer.abort()
    return paths


class _Mp3Writer:
    """One MP3 output file fed with int16 mono samples."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.container = av.open(str(path), "w", format="mp3")
        self.stream = self.container.add_stream("libmp3lame", rate=TARGET_RATE, layout="mono")
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

    def abort(self) -> None:
        self.container.close()
        self.path.unlink(missing_ok=True)


def stream_copy(src: Path, part_path: Callable[[int], Path], cuts: Sequence[float]) -> list[Path]:
    """Split an MP3 without re-encoding: whole packets go to the part their time falls in."""
    paths: list[Path] = []
    out: Any = None
    try:
        with av.open(str(src), metadata_errors="ignore") as container:
            stream = container.streams.audio[0]
            unit = float(stream.time_base) if stream.time_base is not None else 1.0
            ost: Any = None
            first_pts = 0
            for packet in container.demux(stream):
                if packet.pts is None or packet.size == 0:
                    continue
                part = sum(1 for c in cuts if packet.pts * unit >= c)
                while len(paths) <= part:
                    if out is not None:
                        out.close()
                    paths.append(part_path(len(paths)))
                    out = av.open(str(paths[-1]), "w", format="mp3")
                    ost = out.add_stream_from_template(stream)
                    first_pts = packet.pts
                packet.stream = ost
                packet.pts = packet.dts = packet.pts - first_pts
                out.mux(packet)
            if out is not None:
                out.close()
                out = None
    except av.FFmpegError as exc:
        raise _not_audio(exc) from exc
    finally:
        if out is not None:
            out.close()
    return paths
