"""answers: what a server's bytes say, read with the bounds of docs/design.md §8.

Pure functions (no httpx, no I/O) that ``transcribe.py`` applies to every answer:
JSON refused unparsed when it nests too deep, the service's message out of an
error body, the field a 400/422 blames, and a 200's text (and segments) in the
format the upload asked for. Kept apart so that the HTTP module stays about HTTP;
every name is still importable from ``sfwatch.transcribe``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from sfwatch.config_request import UploadRequest
from sfwatch.subtitles import Timing, parse_cues, segments_from_json

#: The most of a 200 answer read, counted on the wire and again after decompression.
#: A transcript is text: an hour of speech (``api.max_audio_seconds``) is ~60 KB,
#: under 1 MB even as verbose JSON with timestamps, so 8 MiB leaves over 8x room for
#: the largest while one upload thread never holds more than about twice this.
MAX_RESPONSE = 8 * 1024 * 1024
#: The most of an error answer, or of ``GET /user/info``, read: a message, not a document.
MAX_SMALL_RESPONSE = 64 * 1024
#: JSON nested deeper than this is refused unparsed (the API's answers nest 1 to 4
#: deep; Python's parser would recurse into a 100,000-deep one until RecursionError).
MAX_JSON_DEPTH = 32

#: one JSON string (closed, or running to the end), or a run of brackets
_JSON_TOKENS = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"?|[\[{]++|[\]}]++', re.DOTALL)
SURROGATES = re.compile(r"[\ud800-\udfff]")
#: C0 and C1 controls but tab and newline: a server's message must not drive a terminal
CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class JSONTooDeep(ValueError):
    """A body whose JSON nests deeper than ``MAX_JSON_DEPTH``; it is not parsed."""


def too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``body``'s brackets (outside strings) nest deeper than ``limit``.

    One regular-expression pass; nothing is parsed, so no depth can exhaust the stack.
    """
    depth = 0
    for match in _JSON_TOKENS.finditer(body):
        token = match.group()
        if token[0] in b"[{":
            depth += len(token)
            if depth > limit:
                return True
        elif token[0] in b"]}":
            depth -= len(token)
    return False


def parse_json(body: bytes) -> Any:
    """``body`` as JSON; ``ValueError`` when it is not, ``JSONTooDeep`` when it nests too deep."""
    if too_deep(body):
        raise JSONTooDeep(f"JSON nested deeper than {MAX_JSON_DEPTH}")
    try:
        return json.loads(body)
    except RecursionError as exc:  # not reached below the limit; kept as a second guard
        raise JSONTooDeep("JSON nested too deep") from exc


def api_message(body: bytes) -> str:
    """The service's message from an error body: a JSON object, a JSON string, or text."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        parsed: Any = parse_json(body)
    except ValueError:
        return text[:500]
    if isinstance(parsed, str):
        return parsed[:500]
    if isinstance(parsed, dict):
        for field in (parsed.get("message"), parsed.get("error"), parsed.get("detail")):
            candidate = field.get("message") if isinstance(field, dict) else field
            if isinstance(candidate, str) and candidate:
                return candidate[:500]
    return text[:500]


def api_code(body: bytes) -> int | None:
    try:
        parsed = parse_json(body)
    except ValueError:
        return None
    code = parsed.get("code") if isinstance(parsed, dict) else None
    return code if isinstance(code, int) else None


def rejected_field(body: bytes, message: str, request: UploadRequest) -> str | None:
    """The form field a 400/422 blames, if it is one that ``request`` sent.

    OpenAI and Groq name it in ``error.param``; FastAPI servers (speaches, vLLM) in a
    ``detail[].loc``; others only in the message, so the message is searched for each
    sent field's name as a whole word. ``file`` and ``model`` are never blamed here:
    a bad file is the file's fault, a bad model the account's (docs/design.md §8).
    """
    sent = {f.name.removesuffix("[]") for f in request.fields}
    if not sent:
        return None
    named: list[str] = []
    try:
        parsed: Any = parse_json(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        wheres = (parsed, error if isinstance(error, dict) else {})
        named.extend(p for w in wheres if isinstance(p := w.get("param"), str))
        detail = parsed.get("detail")
        for item in detail if isinstance(detail, list) else []:
            loc = item.get("loc") if isinstance(item, dict) else None
            if isinstance(loc, list):
                named.extend(part for part in loc if isinstance(part, str))
    for name in named:
        if name.removesuffix("[]") in sent:
            return name.removesuffix("[]")
    for name in sorted(sent, key=len, reverse=True):  # timestamp_granularities before a prefix
        if re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", message):
            return name
    return None


def shown_size(limit: int) -> str:
    return f"{limit // 1048576} MiB" if limit >= 1048576 else f"{limit // 1024} KiB"


def transcript_text(body: bytes, *, complete: bool) -> tuple[str | None, str]:
    """The ``text`` of a 200's JSON, or None and why there is none to use."""
    if not complete:
        return None, f"it is larger than {shown_size(MAX_RESPONSE)}"
    try:
        parsed = parse_json(body)
    except JSONTooDeep as exc:
        return None, str(exc)
    except ValueError as exc:
        return None, f"not JSON ({type(exc).__name__})"
    text = parsed.get("text") if isinstance(parsed, dict) else None
    if not isinstance(text, str):
        return None, "no text"
    if SURROGATES.search(text):
        return None, "the text holds a lone surrogate (it is not Unicode)"
    return text, ""


def read_answer(
    body: bytes, *, complete: bool, request: UploadRequest
) -> tuple[str | None, Timing | None, str]:
    """The text (and segments) of a 200 in the format ``request`` asked for.

    None for the text, and why, when the answer is unusable: the same for a
    verbose_json without a usable segment list or subtitles that do not parse,
    when segments were needed (an ``UnusableResponse``, like a 200 without text).
    """
    if request.answer == "json":
        text, why_not = transcript_text(body, complete=complete)
        return text, None, why_not
    if not complete:
        return None, None, f"it is larger than {shown_size(MAX_RESPONSE)}"
    if request.answer == "verbose_json":
        text, why_not = transcript_text(body, complete=complete)
        if text is None:
            return None, None, why_not
        parsed = parse_json(body)  # parsed once already: it is a JSON object
        segments = segments_from_json(parsed.get("segments"))
        if segments is None:
            if request.timed:
                return None, None, "no usable segments (start, end, text)"
            return text, None, ""
        language = parsed.get("language")
        duration = parsed.get("duration")
        return (
            text,
            Timing(
                segments,
                language if isinstance(language, str) else None,
                float(duration)
                if isinstance(duration, int | float)
                and not isinstance(duration, bool)
                and 0 <= duration < 1e9
                else None,
            ),
            "",
        )
    try:
        document = body.decode("utf-8")
    except UnicodeDecodeError:
        return None, None, "the answer is not UTF-8 text"
    if request.answer == "text":
        return document.strip(), None, ""
    cues = parse_cues(document)  # srt, vtt
    if cues is None:
        return None, None, f"not {request.answer} subtitles"
    end = cues[-1].end if cues else None
    return " ".join(c.text for c in cues if c.text).strip(), Timing(cues, None, end), ""
