"""Timed transcripts: segments in, SRT / WebVTT / JSON out (and SRT / WebVTT back in).

A server asked for ``response_format=verbose_json`` answers segments with start and
end times; one that only speaks ``srt`` or ``vtt`` answers cues. Both become a
``Timing``: the segments, the language the server heard and the audio's duration.
From a ``Timing`` the finish step renders the files a watch asks for
(``outputs: [txt, srt, vtt, json]``, docs/design.md §9); rendering is a pure
function of the record, so a finish run again after a crash renders the same bytes
and recognises the files it already wrote (docs/design.md §5.3).

Nothing here trusts its input: parsed cues are bounded like every other answer
(``MAX_SEGMENTS``), times must be finite and not negative, and text is cleaned of
lone surrogates and control characters before it reaches a file.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

#: more segments than any hour of speech has (~1 per second at most); a longer list is hostile
MAX_SEGMENTS = 100_000
#: the formats a watch may write (``outputs``); txt is the plain transcript
OUTPUT_FORMATS = ("txt", "srt", "vtt", "json")
#: the outputs that need segment times from the server
TIMED_OUTPUTS = frozenset({"srt", "vtt", "json"})
#: the version of our own JSON output shape (documented in README, "Outputs")
JSON_FORMAT = "sfwatch.transcript/1"

_SURROGATES = re.compile(r"[\ud800-\udfff]")
#: C0 and C1 controls but tab and newline
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
#: ``00:01:02,500`` (SRT) or ``00:01:02.500`` / ``01:02.500`` (WebVTT)
_TIME = re.compile(r"^(?:(\d{1,6}):)?(\d{1,2}):(\d{1,2})[.,](\d{1,3})$")


@dataclass(frozen=True)
class Segment:
    """A stretch of speech: seconds from the start of the recording, and what was said."""

    start: float
    end: float
    text: str

    def shifted(self, seconds: float) -> Segment:
        """The same segment ``seconds`` later (a split part's offset in the original)."""
        return Segment(self.start + seconds, self.end + seconds, self.text)


@dataclass(frozen=True)
class Timing:
    """What a timed answer adds to the text: segments, language heard, duration."""

    segments: tuple[Segment, ...]
    language: str | None = None
    duration: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ledger's and the sidecar's form (``from_dict`` reads it back)."""
        return {
            "language": self.language,
            "duration": self.duration,
            "segments": [[s.start, s.end, s.text] for s in self.segments],
        }

    @classmethod
    def from_dict(cls, data: Any) -> Timing | None:
        """Read back what ``to_dict`` wrote; None for anything else (an older or broken row)."""
        if not isinstance(data, dict) or not isinstance(data.get("segments"), list):
            return None
        segments: list[Segment] = []
        for item in data["segments"]:
            if not (isinstance(item, list) and len(item) == 3):
                return None
            start, end, text = item
            if not (_number(start) and _number(end) and isinstance(text, str)):
                return None
            segments.append(Segment(float(start), float(end), text))
        language = data.get("language")
        duration = data.get("duration")
        return cls(
            tuple(segments),
            language if isinstance(language, str) else None,
            float(duration) if _number(duration) else None,
        )

    def to_json(self) -> str:
        """``to_dict`` as JSON text."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | None) -> Timing | None:
        """``from_dict`` of JSON text; None for None or text that is not ours."""
        if text is None:
            return None
        try:
            return cls.from_dict(json.loads(text))
        except ValueError:
            return None


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def clean(text: str) -> str:
    """Server text fit for a file: lone surrogates and control characters made U+FFFD."""
    return _CONTROLS.sub("\ufffd", _SURROGATES.sub("\ufffd", text))


def join(parts: Sequence[tuple[float, Timing | None]]) -> Timing | None:
    """One timeline from the timings of split parts, each shifted by its start offset.

    None when any part has no timing (they were not asked for, or an older ledger
    row holds only texts): a timeline with holes would put the subtitles out of step.
    """
    if not parts or any(timing is None for _, timing in parts):
        return None
    segments: list[Segment] = []
    language = None
    for offset, timing in parts:
        assert timing is not None  # noqa: S101 - checked above
        segments.extend(s.shifted(offset) for s in timing.segments)
        language = language or timing.language
    last_offset, last = parts[-1]
    assert last is not None  # noqa: S101 - checked above
    end = last_offset + last.duration if last.duration is not None else None
    if end is None and segments:
        end = segments[-1].end
    return Timing(tuple(segments), language, end)


# -- reading what a server sent ----------------------------------------------------------


def segments_from_json(items: object) -> tuple[Segment, ...] | None:
    """The ``segments`` of a verbose_json answer; None when the list is unusable.

    Each needs a finite ``start`` >= 0, an ``end`` >= ``start`` and a string ``text``
    (OpenAI, Groq, speaches and whisper.cpp all send these; other keys are ignored).
    """
    if not isinstance(items, list) or len(items) > MAX_SEGMENTS:
        return None
    segments: list[Segment] = []
    for item in items:
        if not isinstance(item, dict):
            return None
        start, end, text = item.get("start"), item.get("end"), item.get("text")
        if not (_number(start) and _number(end) and isinstance(text, str)):
            return None
        if start < 0 or end < start:
            return None
        segments.append(Segment(float(start), float(end), clean(text).strip()))
    return tuple(segments)


def _seconds(stamp: str) -> float | None:
    match = _TIME.match(stamp.strip())
    if match is None:
        return None
    hours, minutes, seconds, millis = match.groups()
    return (
        int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds) + int(millis.ljust(3, "0")) / 1000
    )


def parse_cues(text: str) -> tuple[Segment, ...] | None:
    """The cues of an SRT or WebVTT document as segments; None when it is not one.

    Lenient where players are (cue numbers and identifiers optional, ``,`` or ``.``
    before the milliseconds, cue settings after the end time ignored, NOTE and
    STYLE blocks skipped), strict about the times.
    """
    blocks = re.split(r"\n\s*\n", text.replace("\r\n", "\n").replace("\r", "\n").strip())
    segments: list[Segment] = []
    for block in blocks:
        lines = block.split("\n")
        arrow = next((i for i, line in enumerate(lines) if "-->" in line), None)
        if arrow is None:
            if block.startswith(("WEBVTT", "NOTE", "STYLE", "REGION")) or not block.strip():
                continue
            return None  # a block that is neither a cue nor a header: not subtitles
        left, _, right = lines[arrow].partition("-->")
        start, end = _seconds(left), _seconds(right.strip().split(" ")[0] if right else "")
        if start is None or end is None or end < start:
            return None
        words = " ".join(line.strip() for line in lines[arrow + 1 :] if line.strip())
        segments.append(Segment(start, end, clean(words)))
        if len(segments) > MAX_SEGMENTS:
            return None
    return tuple(segments) if segments else None


# -- writing the files ---------------------------------------------------------------------


def _stamp(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _cue_text(text: str) -> str:
    # A blank line would end the cue early, and "-->" would read as a timing line.
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "\n".join(lines).replace("-->", "->") or "…"


def to_srt(segments: Iterable[Segment]) -> str:
    """SubRip: numbered cues, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, a blank line between."""
    cues = [
        f"{n}\n{_stamp(s.start, ',')} --> {_stamp(s.end, ',')}\n{_cue_text(s.text)}\n"
        for n, s in enumerate(segments, 1)
    ]
    return "\n".join(cues)


def to_vtt(segments: Iterable[Segment]) -> str:
    """WebVTT: the ``WEBVTT`` header, then cues with ``HH:MM:SS.mmm`` times."""
    cues = [
        f"{_stamp(s.start, '.')} --> {_stamp(s.end, '.')}\n{_cue_text(s.text)}\n" for s in segments
    ]
    return "\n".join(["WEBVTT\n", *cues])


def to_json(text: str, timing: Timing) -> str:
    """Our own stable JSON shape (README, "Outputs"): format, text, language, duration, segments."""
    document = {
        "format": JSON_FORMAT,
        "text": text,
        "language": timing.language,
        "duration": timing.duration,
        "segments": [
            {"start": round(s.start, 3), "end": round(s.end, 3), "text": s.text}
            for s in timing.segments
        ],
    }
    return json.dumps(document, ensure_ascii=False, indent=2) + "\n"


def render(fmt: str, text: str, timing: Timing | None) -> bytes:
    """The bytes of one output file; ``ValueError`` for a timed format without a timing."""
    if fmt == "txt":
        return (text.rstrip("\n") + "\n").encode("utf-8")
    if timing is None:
        raise ValueError(f"{fmt} needs segment times, and the transcript has none")
    if fmt == "srt":
        return to_srt(timing.segments).encode("utf-8")
    if fmt == "vtt":
        return to_vtt(timing.segments).encode("utf-8")
    if fmt == "json":
        return to_json(text, timing).encode("utf-8")
    raise ValueError(f"unknown output format {fmt!r}")
