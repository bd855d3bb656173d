"""subtitles: segments to SRT / WebVTT / JSON and back, split parts joined on one timeline."""

from __future__ import annotations

import json

import pytest

from sfwatch.subtitles import (
    MAX_SEGMENTS,
    Segment,
    Timing,
    join,
    parse_cues,
    render,
    segments_from_json,
    to_srt,
    to_vtt,
)

SEGMENTS = (
    Segment(0.0, 2.5, "Hello there."),
    Segment(2.5, 3661.042, "Grüße — 你好"),
)


def test_srt_is_numbered_cues_with_comma_milliseconds() -> None:
    """SRT: 1-based numbers, HH:MM:SS,mmm times, a blank line between cues."""
    assert to_srt(SEGMENTS) == (
        "1\n00:00:00,000 --> 00:00:02,500\nHello there.\n\n"
        "2\n00:00:02,500 --> 01:01:01,042\nGrüße — 你好\n"
    )


def test_vtt_has_its_header_and_dot_milliseconds() -> None:
    """WebVTT: the WEBVTT header, then cues with HH:MM:SS.mmm times."""
    assert to_vtt(SEGMENTS) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nHello there.\n\n"
        "00:00:02.500 --> 01:01:01.042\nGrüße — 你好\n"
    )


def test_cue_text_cannot_break_the_format() -> None:
    """A blank line or an arrow inside a segment's text does not end or fake a cue."""
    tricky = (Segment(0, 1, "one\n\n2\n00:00:05,000 --> 00:00:06,000\nfake"), Segment(1, 2, ""))
    parsed = parse_cues(to_srt(tricky))
    assert parsed is not None
    assert [(s.start, s.end) for s in parsed] == [(0, 1), (1, 2)]


@pytest.mark.parametrize("writer", [to_srt, to_vtt])
def test_what_we_write_parses_back(writer: object) -> None:
    """parse_cues reads our own SRT and WebVTT back to the same segments (to the ms)."""
    assert callable(writer)
    assert parse_cues(writer(SEGMENTS)) == SEGMENTS


def test_parse_cues_reads_what_servers_send() -> None:
    """Cue ids optional, MM:SS.mmm, cue settings, NOTE blocks and CRLF are all fine."""
    text = (
        "WEBVTT - made by a server\r\n\r\nNOTE a comment\r\n\r\n"
        "intro\r\n00:01.000 --> 00:02.500 align:start\r\nhi\r\n\r\n"
        "00:00:03.000 --> 00:00:04.000\r\nline one\r\nline two\r\n"
    )
    assert parse_cues(text) == (Segment(1.0, 2.5, "hi"), Segment(3.0, 4.0, "line one line two"))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "just some text",
        "1\n00:00:02,000 --> 00:00:01,000\nends before it starts\n",
        "1\n00:00:xx,000 --> 00:00:01,000\nbad time\n",
        '{"text": "json, not subtitles"}',
    ],
)
def test_parse_cues_refuses_what_is_not_subtitles(text: str) -> None:
    """No cues, a garbage block or impossible times: None (an unusable answer)."""
    assert parse_cues(text) is None


def test_segments_from_json_cleans_text_and_checks_times() -> None:
    """verbose_json segments: extra keys ignored, control characters made U+FFFD."""
    items = [{"id": 0, "start": 0, "end": 1.5, "text": " a\x1bb ", "tokens": [1]}]
    assert segments_from_json(items) == (Segment(0.0, 1.5, "a\ufffdb"),)
    assert segments_from_json([]) == ()


@pytest.mark.parametrize(
    "items",
    [
        None,
        "segments",
        [{"start": 0, "end": 1}],
        [{"start": -1, "end": 1, "text": "x"}],
        [{"start": 2, "end": 1, "text": "x"}],
        [{"start": float("nan"), "end": 1, "text": "x"}],
        [{"start": True, "end": 1, "text": "x"}],
        [["0", "1", "x"]],
        [{"start": 0, "end": 1, "text": "x"}] * (MAX_SEGMENTS + 1),
    ],
)
def test_segments_from_json_refuses_unusable_lists(items: object) -> None:
    """Missing or wrong fields, negative, reversed or non-finite times, too many: None."""
    assert segments_from_json(items) is None


def test_join_shifts_each_part_by_its_offset() -> None:
    """Parts' times count from their own start; joined, they line up with the original."""
    first = Timing((Segment(0, 10, "a"), Segment(10, 19.5, "b")), "en", 19.5)
    second = Timing((Segment(0, 5, "c"),), None, 7.0)
    joined = join([(0.0, first), (19.5, second)])
    assert joined == Timing(
        (Segment(0, 10, "a"), Segment(10, 19.5, "b"), Segment(19.5, 24.5, "c")), "en", 26.5
    )


def test_join_without_every_part_timed_is_none() -> None:
    """A part without segments (an older ledger row) gives no timeline rather than a gappy one."""
    assert join([(0.0, Timing((), None, 1.0)), (1.0, None)]) is None
    assert join([]) is None


def test_timing_round_trips_through_its_stored_form() -> None:
    """to_dict/from_dict and to_json/from_json keep everything; foreign data reads as None."""
    timing = Timing(SEGMENTS, "de", 3661.042)
    assert Timing.from_dict(timing.to_dict()) == timing
    assert Timing.from_json(timing.to_json()) == timing
    assert Timing.from_json(None) is None
    assert Timing.from_json("[1, 2]") is None
    assert Timing.from_dict({"segments": [[0, 1]]}) is None


def test_render_json_is_our_stable_shape() -> None:
    """The .json output: format, text, language, duration, segments (start, end, text)."""
    body = json.loads(render("json", "Hello there. Grüße", Timing(SEGMENTS, "en", 3661.042)))
    assert body == {
        "format": "sfwatch.transcript/1",
        "text": "Hello there. Grüße",
        "language": "en",
        "duration": 3661.042,
        "segments": [
            {"start": 0.0, "end": 2.5, "text": "Hello there."},
            {"start": 2.5, "end": 3661.042, "text": "Grüße — 你好"},
        ],
    }


def test_render_txt_needs_no_timing_and_timed_ones_do() -> None:
    """txt is the text with one final newline; srt without segments is a ValueError."""
    assert render("txt", "hi\n\n", None) == b"hi\n"
    with pytest.raises(ValueError, match="segment times"):
        render("srt", "hi", None)
