"""Real audio (and a little video) made on the fly for the tests: no binary fixtures.

Everything here is generated with the standard library (``wave``) or PyAV + numpy,
so a test can ask for exactly the file it needs::

    inbox.joinpath("memo.wav").write_bytes(wav_bytes())        # tiny, unique content
    write_audio(tmp_path / "talk.mp3", 150, silences=[(52, 54)])
    write_video(tmp_path / "clip.mp4", 3)                      # h264 video + aac audio

Signals are a tone plus white noise (so every 0.1 s block is audible) with exact
digital silence in the requested gaps. Files are written one second at a time, so
memory does not grow with the length asked for.
"""

from __future__ import annotations

import io
import math
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

__all__ = [
    "FORMATS",
    "AudioStreamInfo",
    "Encoding",
    "VideoStreamInfo",
    "audio_streams",
    "duration_of",
    "video_streams",
    "wav_bytes",
    "write_audio",
    "write_video",
]

WAV_HEADER_BYTES = 44


@dataclass(frozen=True)
class Encoding:
    """How a file name ending is written: container, codec, and fixed parameters."""

    format: str
    codec: str
    #: the codec takes only this rate / channel count (AMR-NB: 8 kHz mono)
    rate: int | None = None
    channels: int | None = None
    bit_rate: int | None = None


#: what ``write_audio`` writes for each name ending
FORMATS: dict[str, Encoding] = {
    ".wav": Encoding("wav", "pcm_s16le"),
    ".mp3": Encoding("mp3", "libmp3lame", bit_rate=64_000),
    ".flac": Encoding("flac", "flac"),
    ".m4a": Encoding("ipod", "aac", bit_rate=64_000),
    ".ogg": Encoding("ogg", "libopus", bit_rate=32_000),
    ".opus": Encoding("opus", "libopus", bit_rate=32_000),
    ".amr": Encoding("amr", "libopencore_amrnb", rate=8_000, channels=1, bit_rate=12_200),
    ".wma": Encoding("asf", "wmav2", bit_rate=64_000),
    ".aiff": Encoding("aiff", "pcm_s16be"),
}

#: the cover picture of ``write_audio(..., cover_art=True)``
_COVER_SIZE = (32, 32)


def wav_bytes(size: int = 2000, *, seed: int | None = None) -> bytes:
    """A valid 8 kHz mono 16-bit WAV of about ``size`` bytes, filled with noise.

    Unseeded calls give different content every time (as ``os.urandom`` would);
    the same ``seed`` gives the same bytes. There is always at least one sample.
    """
    samples = max(1, (size - WAV_HEADER_BYTES) // 2)
    rng = np.random.default_rng(seed)
    pcm = rng.integers(-8000, 8000, samples, dtype=np.int16).astype("<i2").tobytes()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(pcm)
    return buffer.getvalue()


def write_audio(
    path: Path,
    seconds: float,
    *,
    rate: int = 16_000,
    channels: int = 1,
    tone_hz: float = 300.0,
    noise: float = 0.05,
    silences: Sequence[tuple[float, float]] = (),
    seed: int = 0,
    cover_art: bool = False,
) -> Path:
    """Write ``seconds`` of tone + noise to ``path``, encoded as its suffix says.

    See ``FORMATS`` for the suffixes and what each one writes; ``.amr`` is always
    8 kHz mono, and Opus files are encoded at the nearest rate Opus supports.
    ``silences`` are (start, end) seconds of exact digital silence. The tone's
    amplitude is 0.3 of full scale, ``noise`` is the noise's standard deviation
    (also relative to full scale). ``cover_art`` (``.mp3`` only) adds an attached
    PNG picture, as music files carry. Returns ``path``.
    """
    path = Path(path)
    try:
        enc = FORMATS[path.suffix.lower()]
    except KeyError:
        raise ValueError(f"no encoding for {path.suffix!r}; one of {sorted(FORMATS)}") from None
    if cover_art and enc.format != "mp3":
        raise ValueError("cover_art is only supported for .mp3")
    rate = enc.rate or rate
    channels = enc.channels or channels
    layout = _layout(channels)
    with av.open(str(path), "w", format=enc.format) as container:
        stream: Any = container.add_stream(
            enc.codec, rate=_supported_rate(enc.codec, rate), layout=layout
        )
        if enc.bit_rate:
            stream.bit_rate = enc.bit_rate
        picture: Any = _add_cover(container) if cover_art else None
        if picture is not None:
            container.mux(picture)
        signal = _Signal(rate, channels, tone_hz, noise, silences, seed)
        for start, samples in signal.chunks(seconds):
            frame = av.AudioFrame.from_ndarray(samples, format="s16", layout=layout)
            frame.sample_rate = rate
            frame.pts = start
            frame.time_base = Fraction(1, rate)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_video(path: Path, seconds: float, *, with_audio: bool = True, fps: int = 5) -> Path:
    """Write an .mp4 of tiny (64x48) h264 frames (mpeg4 if h264 is missing) at ``fps``.

    With ``with_audio`` it also holds a 16 kHz mono AAC track of tone + noise
    (the sound of ``write_audio``), interleaved second by second. Returns ``path``.
    """
    path = Path(path)
    width, height = 64, 48
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w", format="mp4") as container:
        video: Any = container.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio: Any = None
        if with_audio:
            audio = container.add_stream("aac", rate=16_000, layout="mono")
            audio.bit_rate = 32_000
        signal = _Signal(16_000, 1, 300.0, 0.05, (), 0)
        frames = round(seconds * fps)
        shown = 0
        for start, samples in signal.chunks(seconds):
            # the video frames that start before this chunk of sound ends
            until = min(frames, math.ceil((start + samples.shape[1]) / 16_000 * fps))
            for index in range(shown, until):
                image = np.full((height, width, 3), (index * 40) % 256, dtype=np.uint8)
                vframe = av.VideoFrame.from_ndarray(image, format="rgb24")
                vframe.pts = index
                vframe.time_base = Fraction(1, fps)
                for packet in video.encode(vframe):
                    container.mux(packet)
            shown = until
            if audio is not None:
                aframe = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
                aframe.sample_rate = 16_000
                aframe.pts = start
                aframe.time_base = Fraction(1, 16_000)
                for packet in audio.encode(aframe):
                    container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
        if audio is not None:
            for packet in audio.encode(None):
                container.mux(packet)
    return path


@dataclass(frozen=True)
class AudioStreamInfo:
    """One audio stream of a file, as FFmpeg sees it."""

    codec: str
    sample_rate: int
    channels: int


@dataclass(frozen=True)
class VideoStreamInfo:
    """One video stream of a file; ``attached_pic`` for cover art."""

    codec: str
    width: int
    height: int
    attached_pic: bool


def duration_of(path: Path) -> float:
    """Seconds of audio in the file's first audio stream, by decoding it all.

    Counts decoded samples rather than trusting headers, so it measures what a
    listener (or the API) actually gets: 0.0 when nothing decodes.
    """
    samples = 0
    rate = 0
    with av.open(str(path)) as container:
        for frame in container.decode(container.streams.audio[0]):
            samples += frame.samples
            rate = frame.sample_rate
    return samples / rate if rate else 0.0


def audio_streams(path: Path) -> list[AudioStreamInfo]:
    """The audio streams of a file."""
    with av.open(str(path)) as container:
        return [
            AudioStreamInfo(s.codec_context.name, s.codec_context.sample_rate, s.channels)
            for s in container.streams.audio
        ]


def video_streams(path: Path) -> list[VideoStreamInfo]:
    """The video streams of a file, cover art included (see ``attached_pic``)."""
    with av.open(str(path)) as container:
        return [
            VideoStreamInfo(
                s.codec_context.name,
                s.codec_context.width,
                s.codec_context.height,
                bool(s.disposition & av.stream.Disposition.attached_pic),
            )
            for s in container.streams.video
        ]


class _Signal:
    """Tone + noise with silent gaps, produced one chunk of int16 samples at a time."""

    def __init__(
        self,
        rate: int,
        channels: int,
        tone_hz: float,
        noise: float,
        silences: Sequence[tuple[float, float]],
        seed: int,
    ) -> None:
        self.rate = rate
        self.channels = channels
        self.tone_hz = tone_hz
        self.noise = noise
        self.silences = [(round(a * rate), round(b * rate)) for a, b in silences]
        self.rng = np.random.default_rng(seed)

    def chunks(self, seconds: float) -> Any:
        """Yield (first sample index, packed int16 array of shape (1, n * channels))."""
        total = round(seconds * self.rate)
        for start in range(0, total, self.rate):
            n = min(self.rate, total - start)
            t = np.arange(start, start + n, dtype=np.float64) / self.rate
            tone = 0.3 * np.sin(2 * np.pi * self.tone_hz * t)
            wave_ = tone[:, None] + self.noise * self.rng.standard_normal((n, self.channels))
            for a, b in self.silences:
                lo, hi = max(a - start, 0), min(b - start, n)
                if lo < hi:
                    wave_[lo:hi] = 0.0
            pcm = np.clip(np.round(wave_ * 32767), -32768, 32767).astype(np.int16)
            yield start, pcm.reshape(1, -1)


def _layout(channels: int) -> str:
    names = {1: "mono", 2: "stereo"}
    if channels not in names:
        raise ValueError(f"channels must be 1 or 2, not {channels}")
    return names[channels]


def _supported_rate(codec: str, rate: int) -> int:
    """``rate`` if the encoder takes it, else the nearest rate it does (the encoder resamples)."""
    rates = av.Codec(codec, "w").audio_rates
    if not rates or rate in rates:
        return rate
    return min(rates, key=lambda r: (abs(r - rate), -r))


def _add_cover(container: Any) -> Any:
    """Add an attached-picture PNG stream to ``container``; return its one packet."""
    width, height = _COVER_SIZE
    stream: Any = container.add_stream("png")
    stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
    stream.disposition = av.stream.Disposition.attached_pic
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, :, 0] = 200
    frame = av.VideoFrame.from_ndarray(image, format="rgb24")
    frame.pts = 0
    packets = [*stream.encode(frame), *stream.encode(None)]
    packet = packets[0]
    packet.stream = stream
    return packet
