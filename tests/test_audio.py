"""sfwatch.audio on real files made by tests.audiogen: probe, loudness, cuts, transcode, copy."""

from __future__ import annotations

import errno
import itertools
import math
import os
import shutil
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import pytest

from sfwatch import audio
from sfwatch.audio import AudioInfo, choose_cuts, loudness, probe, stream_copy, transcode
from sfwatch.errors import PrepareError
from tests.audiogen import (
    FORMATS,
    audio_streams,
    duration_of,
    sound_spans,
    video_streams,
    wav_bytes,
    write_audio,
    write_video,
)
from tests.conftest import daemon_process, write_config
from tests.fakeapi import FakeAPI

#: seconds of slack for durations that depend on codec framing
FRAME_SLACK = 0.1


def namer(folder: Path, stem: str = "part") -> Callable[[int], Path]:
    """A part-path callback naming parts ``<stem>-<index>.mp3`` in ``folder``."""
    return lambda index: folder / f"{stem}-{index}.mp3"


def packets(path: Path) -> list[bytes]:
    """The payloads of the first audio stream's packets, in order."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return [bytes(p) for p in container.demux(stream) if p.size]


def edges(path: Path) -> list[float]:
    """Where sound starts and stops in a file, flattened: [start, end, start, end, ...]."""
    return [t for span in sound_spans(path) for t in span]


def part_lengths(cuts: list[float], total: float) -> list[float]:
    """The lengths of the parts that ``cuts`` make of ``total`` seconds."""
    edges = [0.0, *cuts, total]
    return [b - a for a, b in itertools.pairwise(edges)]


# --- the generators themselves --------------------------------------------------------------


def test_wav_bytes_is_small_valid_and_unique() -> None:
    """wav_bytes makes a decodable WAV near the asked size; unseeded calls differ."""
    data = wav_bytes(2000)
    assert 1990 <= len(data) <= 2000
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    assert wav_bytes() != wav_bytes()
    assert wav_bytes(seed=7) == wav_bytes(seed=7)
    assert len(wav_bytes(10)) > 44  # always at least one sample


def test_wav_bytes_probes_as_wav(tmp_path: Path) -> None:
    """What most tests drop into inboxes is real audio to the prober."""
    path = tmp_path / "memo.wav"
    path.write_bytes(wav_bytes(16_044))
    info = probe(path)
    assert (info.container, info.sample_rate, info.channels) == ("wav", 8000, 1)
    assert info.duration == pytest.approx(1.0, abs=0.01)


def test_write_audio_puts_silence_where_asked(tmp_path: Path) -> None:
    """Silent gaps are exact digital silence; the rest is clearly audible."""
    path = write_audio(tmp_path / "gaps.wav", 3, silences=[(1.0, 1.5)])
    levels = loudness(path)
    assert len(levels) == 30
    assert np.all(levels[10:15] == 0)
    assert np.all(levels[:10] > 5000) and np.all(levels[15:] > 5000)


def test_write_audio_refuses_unknown_suffix(tmp_path: Path) -> None:
    """An ending without an encoding is an error, not a silently wrong file."""
    with pytest.raises(ValueError, match="no encoding"):
        write_audio(tmp_path / "x.xyz", 1)


# --- probe ----------------------------------------------------------------------------------

#: suffix -> (container, codec, sample rate, accepted by the API as it is)
PROBED = {
    ".wav": ("wav", "pcm_s16le", 16000, True),
    ".mp3": ("mp3", "mp3float", 16000, True),
    ".flac": ("flac", "flac", 16000, True),
    ".m4a": ("mov,mp4,m4a,3gp,3g2,mj2", "aac", 16000, True),
    ".ogg": ("ogg", "opus", 48000, True),
    ".opus": ("ogg", "opus", 48000, True),
    ".amr": ("amr", "amrnb", 8000, False),
    ".wma": ("asf", "wmav2", 16000, False),
    ".aiff": ("aiff", "pcm_s16be", 16000, False),
}


def test_probed_covers_every_generated_format() -> None:
    """Every format audiogen writes is probed below."""
    assert set(PROBED) == set(FORMATS)


@pytest.mark.parametrize("suffix", sorted(PROBED))
def test_probe_reads_format(tmp_path: Path, suffix: str) -> None:
    """Container, codec, rate, channels, duration and acceptance of each format."""
    path = write_audio(tmp_path / f"clip{suffix}", 2.0)
    info = probe(path)
    container, codec, rate, accepted = PROBED[suffix]
    assert (info.container, info.codec, info.sample_rate, info.channels) == (
        container,
        codec,
        rate,
        1,
    )
    assert not info.has_video
    assert info.duration is not None
    # AMR has no duration in its header: FFmpeg estimates it from the bit rate
    assert info.duration == pytest.approx(2.0, abs=0.2 if suffix == ".amr" else 0.05)
    assert info.accepted_as(suffix) is accepted
    assert info.accepted_as(suffix.upper()) is accepted


@pytest.mark.parametrize("suffix", sorted(PROBED))
def test_a_name_ending_in_wav_does_not_change_what_the_probe_finds(
    tmp_path: Path, suffix: str
) -> None:
    """Told the name ends in .wav (WAV's demuxer is tried first), every format is still
    probed as what it is; a WAV the same either way."""
    path = write_audio(tmp_path / f"clip{suffix}", 1.0)
    assert probe(path, ".WAV") == probe(path)


def test_junk_named_wav_is_not_audio(tmp_path: Path) -> None:
    """Bytes that are no audio, named .wav, fail as not_audio after both tries."""
    path = tmp_path / "junk.wav"
    path.write_bytes(b"RIFF\x00\x01\x00\x00WAVEjunk" + b"\x07" * 4000)
    with pytest.raises(PrepareError) as caught:
        probe(path, ".wav")
    assert caught.value.reason == "not_audio"


def test_probe_stereo_44k(tmp_path: Path) -> None:
    """Rate and channel count come from the stream."""
    info = probe(write_audio(tmp_path / "cd.flac", 1.0, rate=44100, channels=2))
    assert (info.sample_rate, info.channels) == (44100, 2)


def test_probe_video_is_not_accepted(tmp_path: Path) -> None:
    """An mp4 with a picture track has video and is never sent as it is."""
    path = write_video(tmp_path / "clip.mp4", 2.0)
    info = probe(path)
    assert info.has_video
    assert info.codec == "aac"
    assert info.duration == pytest.approx(2.0, abs=0.05)
    assert not info.accepted_as(".mp4")
    assert not info.accepted_as(".m4a")  # even renamed: the video would be uploaded


def test_probe_audio_only_mp4_container(tmp_path: Path) -> None:
    """An m4a passes as .m4a, but not under a video container's name."""
    info = probe(write_audio(tmp_path / "voice.m4a", 1.0))
    assert not info.has_video
    assert info.accepted_as(".m4a")
    assert not info.accepted_as(".mp4")
    assert not info.accepted_as(".mov")


def test_probe_cover_art_is_not_video(tmp_path: Path) -> None:
    """An attached picture (album art) does not make an mp3 a video."""
    path = write_audio(tmp_path / "song.mp3", 1.0, cover_art=True)
    pictures = video_streams(path)
    assert len(pictures) == 1 and pictures[0].attached_pic
    info = probe(path)
    assert not info.has_video
    assert info.accepted_as(".mp3")


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 8192, dtype=np.uint8).tobytes())


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _header_only_wav(path: Path) -> None:
    path.write_bytes(wav_bytes()[:44])


def _text(path: Path) -> None:
    path.write_text("These are meeting notes, not a recording.\n" * 40)


def _video_only(path: Path) -> None:
    write_video(path, 1.0, with_audio=False)


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("noise.bin", _random_bytes),
        ("noise.mp3", _random_bytes),
        ("empty.wav", _empty),
        ("header.wav", _header_only_wav),
        ("notes.mp3", _text),
        ("silent-film.mp4", _video_only),
    ],
)
def test_probe_not_audio(tmp_path: Path, name: str, make: Callable[[Path], None]) -> None:
    """Files without decodable audio are PrepareError("not_audio")."""
    path = tmp_path / name
    make(path)
    with pytest.raises(PrepareError) as caught:
        probe(path)
    assert caught.value.reason == "not_audio"


def test_probe_missing_file_is_os_error(tmp_path: Path) -> None:
    """A vanished file is the machine's business (FileNotFoundError), not "not audio"."""
    with pytest.raises(FileNotFoundError):
        probe(tmp_path / "gone.wav")


def test_accepted_as_needs_format_suffix_and_no_video() -> None:
    """accepted_as is the conjunction of an accepted container, suffix and no video."""
    wav = AudioInfo("wav", "pcm_s16le", 1.0, 16000, 1, has_video=False)
    assert wav.accepted_as(".wav")
    assert not wav.accepted_as(".aiff")
    assert not AudioInfo("aiff", "pcm_s16be", 1.0, 16000, 1, False).accepted_as(".wav")
    assert not AudioInfo("matroska,webm", "opus", 1.0, 48000, 1, True).accepted_as(".webm")
    assert AudioInfo("matroska,webm", "opus", 1.0, 48000, 1, False).accepted_as(".webm")


# --- loudness and choose_cuts on files ------------------------------------------------------


@pytest.fixture(scope="module")
def talk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """150 s of sound with pauses at 52-54 s and 110-112 s."""
    folder = tmp_path_factory.mktemp("talk")
    return write_audio(folder / "talk.wav", 150, silences=[(52, 54), (110, 112)])


def test_loudness_one_level_per_block(talk: Path) -> None:
    """One level per 0.1 s; pauses read 0, sound reads about the tone's RMS."""
    levels = loudness(talk)
    assert len(levels) == 1500
    assert np.all(levels[520:540] == 0) and np.all(levels[1100:1120] == 0)
    sound = np.delete(levels, np.r_[520:540, 1100:1120])
    expected = math.hypot(0.3 / math.sqrt(2), 0.05) * 32767
    assert np.all(np.abs(sound - expected) < 0.1 * expected)


def test_loudness_partial_last_block(tmp_path: Path) -> None:
    """A trailing partial block gets a level too; any rate and layout is measured at 16 kHz."""
    levels = loudness(write_audio(tmp_path / "odd.wav", 1.05, rate=44100, channels=2))
    assert len(levels) == 11
    assert levels[-1] > 1000


def test_cuts_land_inside_pauses(talk: Path) -> None:
    """With a pause near each limit, the cut is inside it, in its middle."""
    cuts = choose_cuts(loudness(talk), max_seconds=60)
    assert len(cuts) == 2
    assert 52 < cuts[0] < 54 and 110 < cuts[1] < 112
    assert cuts == pytest.approx([53.0, 111.0], abs=0.2)
    assert max(part_lengths(cuts, 150)) <= 60


def test_cuts_without_pauses_keep_parts_short(tmp_path: Path) -> None:
    """Steady sound still gets cut, and no part is longer than the limit."""
    levels = loudness(write_audio(tmp_path / "drone.wav", 130, noise=0.2))
    cuts = choose_cuts(levels, max_seconds=45)
    assert len(cuts) >= 2
    assert all(0 < c < 130 for c in cuts)
    assert cuts == sorted(cuts)
    assert max(part_lengths(cuts, 130)) <= 45


def test_no_cuts_for_short_file(tmp_path: Path) -> None:
    """A file within the limit stays whole."""
    assert choose_cuts(loudness(write_audio(tmp_path / "short.wav", 20)), 60) == []


def test_long_silent_file(tmp_path: Path) -> None:
    """Silence throughout: cuts still come, evenly, and keep parts within the limit."""
    path = write_audio(tmp_path / "quiet.flac", 200, silences=[(0, 200)])
    levels = loudness(path)
    assert np.all(levels == 0)
    cuts = choose_cuts(levels, max_seconds=60, window_seconds=20)
    assert max(part_lengths(cuts, 200)) <= 60
    assert min(part_lengths(cuts, 200)[:-1]) >= 40  # each cut is in its window (40-60 s)


# --- choose_cuts as a pure function ---------------------------------------------------------


def test_exactly_max_is_not_cut() -> None:
    """A file exactly as long as the limit is one part; one block more is two."""
    assert choose_cuts(np.ones(600), 60) == []
    assert len(choose_cuts(np.ones(601), 60)) == 1


def test_max_is_not_spoiled_by_float_division() -> None:
    """0.3 s is three blocks, not two (0.3 / 0.1 < 3 in binary)."""
    assert choose_cuts(np.ones(3), 0.3) == []
    assert choose_cuts(np.ones(7), 0.7) == []


def test_empty_levels() -> None:
    """No audio, no cuts."""
    assert choose_cuts(np.zeros(0), 60) == []


def test_window_larger_than_max() -> None:
    """A window wider than the limit is narrowed to half of it: progress is guaranteed."""
    levels = np.full(1000, 100.0)
    levels[150] = 0.0  # before the narrowed window [250, 500): not usable for the first cut
    cuts = choose_cuts(levels, max_seconds=50, window_seconds=500)
    assert max(part_lengths(cuts, 100)) <= 50
    assert 25 <= cuts[0] < 50


def test_prefers_a_pause_to_a_single_quiet_block() -> None:
    """A lone quiet 0.1 s (a plosive's closure) loses to a half-second pause."""
    levels = np.full(700, 5000.0)
    levels[580] = 0.0  # one block: mid-word
    levels[400:406] = 20.0  # 0.6 s of room noise: a real pause
    assert choose_cuts(levels, max_seconds=60) == [40.3]  # the middle of 40.0-40.6


def test_cut_in_middle_of_longest_quiet_run() -> None:
    """Among equally quiet stretches the longest wins, and the cut is at its middle."""
    levels = np.full(700, 5000.0)
    levels[320:330] = 0.0
    levels[500:540] = 0.0
    assert choose_cuts(levels, max_seconds=60) == [52.0]


def test_equal_pauses_prefer_the_later() -> None:
    """Of two equal pauses the later is used, so parts are as long as allowed."""
    levels = np.full(700, 5000.0)
    levels[350:360] = 0.0
    levels[550:560] = 0.0
    assert choose_cuts(levels, max_seconds=60) == [55.5]


def test_pause_at_the_limit_is_used() -> None:
    """A pause just before the limit is used; the part stays strictly within it."""
    levels = np.full(700, 5000.0)
    levels[590:600] = 0.0
    cuts = choose_cuts(levels, max_seconds=60)
    assert 59.0 <= cuts[0] < 60.0


def test_tiny_max_is_refused() -> None:
    """A limit under two blocks could not make progress: ValueError."""
    with pytest.raises(ValueError, match="max_seconds"):
        choose_cuts(np.ones(10), 0.1)


def test_random_levels_always_respect_the_limit() -> None:
    """Over many random level arrays, limits and windows: parts fit, cuts increase."""
    rng = np.random.default_rng(3)
    for _ in range(100):
        n = int(rng.integers(0, 1500))
        levels = rng.random(n) * rng.choice([1.0, 1000.0])
        levels[rng.random(n) < 0.05] = 0.0
        max_seconds = float(rng.choice([0.2, 0.3, 1.0, 7.5, 30.0, 59.9, 60.0]))
        window = float(rng.choice([0.1, 1.0, 10.0, 120.0, 1000.0]))
        cuts = choose_cuts(levels, max_seconds, window)
        total = n * audio.BLOCK_SECONDS
        assert all(0 < c < total for c in cuts)
        assert all(b > a for a, b in itertools.pairwise(cuts))
        assert all(length <= max_seconds + 1e-9 for length in part_lengths(cuts, total))


# --- transcode ------------------------------------------------------------------------------


def test_transcode_splits_at_cuts(tmp_path: Path) -> None:
    """44.1 kHz stereo WAV -> 16 kHz mono MP3 parts of exactly the cut intervals, in order."""
    src = write_audio(
        tmp_path / "meeting.wav", 24, rate=44100, channels=2, silences=[(7, 9), (15.5, 16.5)]
    )
    cuts = [8.0, 16.0]
    parts = transcode(src, namer(tmp_path, "meeting"), cuts)
    assert parts == [tmp_path / f"meeting-{i}.mp3" for i in range(3)]
    for part, length in zip(parts, part_lengths(cuts, 24), strict=True):
        info = probe(part)
        assert (info.container, info.sample_rate, info.channels) == ("mp3", 16000, 1)
        assert audio_streams(part)[0].codec == "mp3float"
        assert duration_of(part) == pytest.approx(length, abs=FRAME_SLACK)
    assert sum(duration_of(p) for p in parts) == pytest.approx(24, abs=FRAME_SLACK)
    # contiguous: the parts' pauses, laid end to end, are where the original's are
    joined = np.concatenate([loudness(p) for p in parts])
    original = loudness(src)
    assert len(joined) == len(original)
    quiet_joined = set(np.flatnonzero(joined < 1000).tolist())
    quiet_original = set(np.flatnonzero(original < 1000).tolist())
    assert len(quiet_joined ^ quiet_original) <= 4


def test_transcode_without_cuts_is_one_part(tmp_path: Path) -> None:
    """No cuts: one MP3 of the whole file."""
    parts = transcode(write_audio(tmp_path / "a.flac", 3), namer(tmp_path), [])
    assert parts == [tmp_path / "part-0.mp3"]
    assert duration_of(parts[0]) == pytest.approx(3, abs=FRAME_SLACK)


def test_transcode_video_keeps_only_audio(tmp_path: Path) -> None:
    """An mp4 with video becomes an audio-only MP3."""
    parts = transcode(write_video(tmp_path / "clip.mp4", 3), namer(tmp_path), [])
    assert len(parts) == 1
    assert video_streams(parts[0]) == []
    assert [s.codec for s in audio_streams(parts[0])] == ["mp3float"]
    assert duration_of(parts[0]) == pytest.approx(3, abs=FRAME_SLACK)


@pytest.mark.parametrize("suffix", [".amr", ".wma", ".aiff", ".ogg"])
def test_transcode_unaccepted_formats(tmp_path: Path, suffix: str) -> None:
    """Formats the API refuses (and others) become 16 kHz mono MP3."""
    parts = transcode(write_audio(tmp_path / f"in{suffix}", 2), namer(tmp_path), [1.0])
    assert len(parts) == 2
    for part in parts:
        info = probe(part)
        assert (info.container, info.sample_rate, info.channels) == ("mp3", 16000, 1)
        assert duration_of(part) == pytest.approx(1.0, abs=FRAME_SLACK)


def test_transcode_cut_past_end_makes_no_empty_part(tmp_path: Path) -> None:
    """A cut at or beyond the end makes no extra (empty) part."""
    src = write_audio(tmp_path / "a.wav", 2)
    assert len(transcode(src, namer(tmp_path, "end"), [2.0])) == 1
    assert len(transcode(src, namer(tmp_path, "past"), [1.0, 5.0])) == 2


def test_transcode_refuses_bad_cuts(tmp_path: Path) -> None:
    """Cuts must be positive and strictly increasing."""
    src = write_audio(tmp_path / "a.wav", 2)
    for cuts in ([0.0], [1.0, 1.0], [1.5, 0.5]):
        with pytest.raises(ValueError, match="cuts"):
            transcode(src, namer(tmp_path), cuts)
    assert list(tmp_path.glob("*.mp3")) == []


def test_transcode_failure_removes_parts(tmp_path: Path) -> None:
    """If a later part cannot be made, the parts already written are removed."""
    src = write_audio(tmp_path / "a.wav", 3)

    def part_path(index: int) -> Path:
        if index == 1:
            raise RuntimeError("no room for part 1")
        return tmp_path / f"part-{index}.mp3"

    with pytest.raises(RuntimeError, match="no room"):
        transcode(src, part_path, [1.0])
    assert list(tmp_path.glob("*.mp3")) == []


def test_transcode_not_audio(tmp_path: Path) -> None:
    """A file that is not audio is PrepareError("not_audio") and leaves no parts."""
    src = tmp_path / "notes.mp3"
    src.write_text("not audio\n" * 100)
    with pytest.raises(PrepareError) as caught:
        transcode(src, namer(tmp_path, "out"), [])
    assert caught.value.reason == "not_audio"
    assert list(tmp_path.glob("out-*")) == []


def test_transcode_unwritable_output_is_os_error(tmp_path: Path) -> None:
    """A part that cannot be created is an OSError of the machine, not "not audio"."""
    src = write_audio(tmp_path / "a.wav", 1)
    with pytest.raises(FileNotFoundError):
        transcode(src, namer(tmp_path / "missing-folder"), [])


@pytest.mark.parametrize("suffix", [".mp3", ".m4a"])
def test_damaged_packets_are_skipped(tmp_path: Path, suffix: str) -> None:
    """300 damaged bytes mid-file cost a frame or two, not the file (AAC says EPERM)."""
    src = write_audio(tmp_path / f"damaged{suffix}", 3)
    data = bytearray(src.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 300] = np.random.default_rng(5).integers(0, 256, 300, np.uint8).tobytes()
    src.write_bytes(bytes(data))
    assert probe(src).duration == pytest.approx(3, abs=0.05)
    parts = transcode(src, namer(tmp_path), [])
    assert duration_of(parts[0]) == pytest.approx(3, abs=0.2)


def test_joined_recordings_of_different_rates(tmp_path: Path) -> None:
    """Two MP3s joined byte-wise (16 kHz mono, then 44.1 kHz stereo) are measured and
    transcoded whole: the rate change restarts the resampler."""
    first = write_audio(tmp_path / "first.mp3", 2)
    second = write_audio(tmp_path / "second.mp3", 2, rate=44100, channels=2)
    joined = tmp_path / "joined.mp3"
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    assert len(loudness(joined)) == pytest.approx(41, abs=2)
    parts = transcode(joined, namer(tmp_path), [1.0])
    assert len(parts) == 2
    assert sum(duration_of(p) for p in parts) == pytest.approx(4.1, abs=0.2)


# --- stream_copy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "channels"),
    [(44100, 2), (16000, 1)],  # MPEG-1 (1152-sample packets), MPEG-2 (576)
)
def test_stream_copy_splits_without_reencoding(tmp_path: Path, rate: int, channels: int) -> None:
    """Parts decode, last the cut intervals, and hold the source's packets unchanged."""
    src = write_audio(tmp_path / "talk.mp3", 15, rate=rate, channels=channels)
    cuts = [5.0, 10.0]
    parts = stream_copy(src, namer(tmp_path), cuts)
    assert parts == [tmp_path / f"part-{i}.mp3" for i in range(3)]
    for part, length in zip(parts, part_lengths(cuts, 15), strict=True):
        info = probe(part)
        assert (info.codec, info.sample_rate, info.channels) == ("mp3float", rate, channels)
        assert duration_of(part) == pytest.approx(length, abs=FRAME_SLACK)
    assert sum(duration_of(p) for p in parts) == pytest.approx(15, abs=FRAME_SLACK)
    source_packets = packets(src)
    part_packets = [packets(p) for p in parts]
    assert part_packets[0][0] == source_packets[0]
    assert [pk for pp in part_packets for pk in pp] == source_packets


@pytest.mark.parametrize(("rate", "channels"), [(44100, 2), (16000, 1)])
def test_stream_copy_parts_start_where_cut(tmp_path: Path, rate: int, channels: int) -> None:
    """Each part's sound is where the original's is, counted from its cut (within 40 ms)."""
    src = write_audio(
        tmp_path / "talk.mp3", 12, rate=rate, channels=channels, silences=[(5.5, 6.5), (8, 9)]
    )
    assert sound_spans(src) == [(0.0, 5.5), (6.5, 8.0), (9.0, 12.0)]
    parts = stream_copy(src, namer(tmp_path), [6.0, 8.5])
    assert edges(parts[0]) == pytest.approx([0.0, 5.5], abs=0.01)
    assert edges(parts[1]) == pytest.approx([0.5, 2.0], abs=0.04)
    # the gapless header copied from the source must not swallow the last part's start
    assert edges(parts[2]) == pytest.approx([0.5, 3.5], abs=0.04)


def test_stream_copy_without_cuts_is_whole(tmp_path: Path) -> None:
    """No cuts: one part with every packet and the same decoded length."""
    src = write_audio(tmp_path / "a.mp3", 4)
    parts = stream_copy(src, namer(tmp_path), [])
    assert len(parts) == 1
    assert packets(parts[0]) == packets(src)
    assert duration_of(parts[0]) == pytest.approx(4, abs=0.001)


def test_stream_copy_close_cuts_make_no_empty_part(tmp_path: Path) -> None:
    """Two cuts within one packet make one boundary, never a part without audio."""
    src = write_audio(tmp_path / "a.mp3", 3)
    parts = stream_copy(src, namer(tmp_path), [1.0, 1.005, 2.0])
    assert len(parts) == 3
    assert all(duration_of(p) > 0.5 for p in parts)


def test_stream_copy_not_audio(tmp_path: Path) -> None:
    """A file that is not audio is PrepareError("not_audio") and leaves no parts."""
    src = tmp_path / "noise.mp3"
    _random_bytes(src)
    with pytest.raises(PrepareError) as caught:
        stream_copy(src, namer(tmp_path, "out"), [1.0])
    assert caught.value.reason == "not_audio"
    assert list(tmp_path.glob("out-*")) == []


# --- memory ---------------------------------------------------------------------------------


def test_transcoding_ten_minutes_streams(tmp_path: Path) -> None:
    """Measuring and transcoding 10 minutes keeps Python's (and numpy's) peak small.

    The file is 38 MB of 16 kHz stereo PCM: holding it decoded, or its 16 kHz
    mono version as floats, would pass the bound several times over.
    """
    src = write_audio(tmp_path / "lecture.wav", 600, channels=2)
    tracemalloc.start()
    try:
        levels = loudness(src)
        cuts = choose_cuts(levels, max_seconds=250)
        parts = transcode(src, namer(tmp_path), cuts)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(levels) == 6000
    assert len(parts) == 3
    assert peak < 30 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_the_daemon_starts_without_numpy() -> None:
    """numpy is imported only to place cuts: a fifth of start-up time is not spent on it."""
    code = "import sys, sfwatch.cli, sfwatch.daemon; print('numpy' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"


# -- PyAV is imported while the first files settle -------------------------------------


def test_pyav_is_imported_at_its_first_use_not_with_the_daemon(tmp_path: Path) -> None:
    """Importing the daemon leaves PyAV unloaded; a probe loads it, also from two threads."""
    sample = tmp_path / "a.wav"
    write_audio(sample, 0.5)
    code = (
        "import sys, threading\n"
        "import sfwatch.daemon\n"
        "from sfwatch.audio import probe\n"
        "assert 'av' not in sys.modules, 'imported with the daemon'\n"
        "found = []\n"
        "threads = [threading.Thread(target=lambda: found.append(probe(sys.argv[1])))"
        " for _ in range(2)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "assert 'av' in sys.modules and [i.container for i in found] == ['wav', 'wav'], found\n"
    )
    subprocess.run([sys.executable, "-c", code, str(sample)], check=True, timeout=60)


@pytest.mark.parametrize(
    "failing",
    [
        "raise ImportError('libavformat.so: cannot open')",
        # slower than a file settles, and not an ImportError (a build for another numpy)
        "import time\ntime.sleep(1.5)\nraise ValueError('av.frame.Frame size changed')",
    ],
    ids=["import-error", "slow-value-error"],
)
def test_a_daemon_without_pyav_stops_and_leaves_every_file(
    tmp_path: Path, fake_api: FakeAPI, failing: str
) -> None:
    """PyAV failing to import: one pyav_unavailable error, exit code 1, the file untouched."""
    shadow = tmp_path / "shadow" / "av"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(failing + "\n")
    config = write_config(tmp_path, fake_api.url)
    audio_file = tmp_path / "inbox" / "a.wav"
    write_audio(audio_file, 0.5)
    path = os.pathsep.join(filter(None, [str(shadow.parent), os.environ.get("PYTHONPATH")]))
    with daemon_process(config, PYTHONPATH=path) as daemon:
        assert daemon.wait(20) == 1
        (error,) = daemon.events("sfwatch.pyav_unavailable")
    assert failing.rpartition("(")[2].strip("')") in error["error"]
    assert audio_file.exists(), "left in the inbox, never claimed"
    assert not (tmp_path / "inbox" / "failed").exists()
    assert fake_api.uploads == []


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
@pytest.mark.parametrize("error", ["ESTALE", "ENOTCONN", "EIO"])
def test_a_share_failing_under_the_probe_is_the_machine_s_fault(tmp_path: Path, error: str) -> None:
    """The open under the probe failing with a stale NFS handle, a lost SMB server or an
    I/O error (strace injects it) is an OSError, retried, not the file "not_audio"."""
    path = tmp_path / "a.wav"
    path.write_bytes(wav_bytes(4000))
    script = (
        "import sys; from pathlib import Path; from sfwatch.audio import probe\n"
        "try:\n    probe(Path(sys.argv[1]))\n"
        "except OSError as exc:\n    print(exc.errno)\n"
        "except Exception as exc:\n    print(type(exc).__name__, exc)\n"
    )
    inject = ["-qq", "-f", "-o", "/dev/null", "-P", str(path), "-e", "trace=openat"]
    inject += ["-e", f"inject=openat:error={error}"]
    command = ["strace", *inject, sys.executable, "-c", script, str(path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0 and "ptrace" in done.stderr:
        pytest.skip(f"strace cannot trace here: {done.stderr.strip()}")
    assert done.stdout.strip() == str(getattr(errno, error)), done.stdout + done.stderr
