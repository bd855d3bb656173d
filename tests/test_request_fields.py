"""Uploads send exactly the configured fields and read timed answers, against the fake API."""

from __future__ import annotations

import hashlib
import wave
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sfwatch.config import Secret
from sfwatch.config_request import FormField, UploadRequest
from sfwatch.errors import FieldRejected, FileRejected, UnusableResponse
from sfwatch.subtitles import Segment
from sfwatch.transcribe import Transcriber, classify
from tests.conftest import API_KEY
from tests.fakeapi import R400_OPENAI, R422, FakeAPI, Reply, audio_seconds

MODEL = "whisper-large-v3"
LANGUAGE = FormField("language", "de", "watch[0].request.language")
TIMED = UploadRequest(
    (
        FormField("response_format", "verbose_json", "watch[0].outputs"),
        FormField("timestamp_granularities[]", "segment", "watch[0].outputs"),
    ),
    answer="verbose_json",
    timed=True,
)


@pytest.fixture
def transcriber(fake_api: FakeAPI) -> Iterator[Transcriber]:
    """A Transcriber talking to the fake API with the right key."""
    with Transcriber(fake_api.url, Secret(API_KEY), timeout_seconds=5) as client:
        yield client


@pytest.fixture
def twelve_seconds(tmp_path: Path) -> Path:
    """A real 12 s WAV of silence (8 kHz mono), so the fake knows its duration."""
    path = tmp_path / "talk.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(b"\0\0" * 8000 * 12)
    return path


def test_exactly_the_configured_fields_are_sent(
    fake_api: FakeAPI, transcriber: Transcriber, twelve_seconds: Path
) -> None:
    """Every field of the request, and nothing else, reaches the server as a form field."""
    request = UploadRequest(
        (
            LANGUAGE,
            FormField("prompt", "Zoë, 李雷", "api.request.prompt"),
            FormField("temperature", "0.2", "api.request.temperature"),
            FormField("vad_filter", "true", "api.request.extra_fields.vad_filter"),
        )
    )
    transcriber.transcribe(twelve_seconds, "talk.wav", MODEL, request)
    (upload,) = fake_api.uploads
    assert upload.model == MODEL
    assert upload.extra_fields == {
        "language": "de",
        "prompt": "Zoë, 李雷",
        "temperature": "0.2",
        "vad_filter": "true",
    }


def test_no_request_sends_file_and_model_only(
    fake_api: FakeAPI, transcriber: Transcriber, twelve_seconds: Path
) -> None:
    """Without a request (SiliconFlow's default) no field but model goes with the file."""
    result = transcriber.transcribe(twelve_seconds, "talk.wav", MODEL)
    assert fake_api.uploads[0].extra_fields == {}
    assert (result.segments, result.language, result.timing) == (None, None, None)


def test_verbose_json_gives_segments_language_and_duration(
    fake_api: FakeAPI, transcriber: Transcriber, twelve_seconds: Path
) -> None:
    """A timed request reads verbose_json: the text, and segments covering the audio."""
    result = transcriber.transcribe(twelve_seconds, "talk.wav", MODEL, TIMED)
    sha = hashlib.sha256(twelve_seconds.read_bytes()).hexdigest()
    assert result.text == FakeAPI.text_for(sha)
    assert result.language == "en"
    assert result.duration == pytest.approx(12.0)
    assert result.segments is not None
    assert [(s.start, s.end) for s in result.segments] == [(0.0, 4.0), (4.0, 8.0), (8.0, 12.0)]
    assert fake_api.uploads[0].extra_fields == {
        "response_format": "verbose_json",
        "timestamp_granularities[]": "segment",
    }


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_subtitle_answers_are_parsed_into_segments(
    fake_api: FakeAPI, transcriber: Transcriber, twelve_seconds: Path, fmt: str
) -> None:
    """response_format srt/vtt (servers that answer only subtitles): cues become segments."""
    request = UploadRequest((FormField("response_format", fmt, "api.request.response_format"),))
    result = transcriber.transcribe(
        twelve_seconds, "talk.wav", MODEL, UploadRequest(request.fields, fmt, timed=True)
    )
    assert result.segments is not None
    assert [s.end for s in result.segments] == [4.0, 8.0, 12.0]
    assert result.text == " ".join(s.text for s in result.segments)


def test_text_answer_is_the_body(
    fake_api: FakeAPI, transcriber: Transcriber, twelve_seconds: Path
) -> None:
    """response_format text: the plain body is the transcript."""
    request = UploadRequest((FormField("response_format", "text", "k"),), answer="text")
    result = transcriber.transcribe(twelve_seconds, "talk.wav", MODEL, request)
    sha = hashlib.sha256(twelve_seconds.read_bytes()).hexdigest()
    assert result.text == FakeAPI.text_for(sha)


@pytest.mark.parametrize(
    "body",
    [
        {"text": "hi"},
        {"text": "hi", "segments": "none"},
        {"text": "hi", "segments": [{"start": 1, "end": 0, "text": "x"}]},
        {"text": "hi", "segments": [{"start": 0, "end": 1}]},
    ],
)
def test_timed_answer_without_usable_segments_is_unusable(
    fake_api: FakeAPI, transcriber: Transcriber, twelve_seconds: Path, body: object
) -> None:
    """Segments asked for but absent or malformed: an UnusableResponse, like a 200 without text."""
    fake_api.script(Reply(200, body))
    with pytest.raises(UnusableResponse, match="segments"):
        transcriber.transcribe(twelve_seconds, "talk.wav", MODEL, TIMED)


def test_unparsable_subtitles_are_unusable(
    fake_api: FakeAPI, transcriber: Transcriber, twelve_seconds: Path
) -> None:
    """An srt answer that is not subtitles: UnusableResponse."""
    fake_api.script(Reply(200, "<html>nope</html>"))
    request = UploadRequest((FormField("response_format", "srt", "k"),), "srt", timed=True)
    with pytest.raises(UnusableResponse, match="not srt"):
        transcriber.transcribe(twelve_seconds, "talk.wav", MODEL, request)


def test_the_key_is_scrubbed_from_segments(
    fake_api: FakeAPI, transcriber: Transcriber, twelve_seconds: Path
) -> None:
    """A server echoing the key in a segment (even JSON-escaped) never gets it into a file."""
    escaped = "".join(f"\\u{ord(c):04x}" for c in API_KEY)
    body = (
        '{"text": "ok", "segments": [{"start": 0, "end": 1, "text": "k=' + escaped + '\\u001b"}]}'
    ).encode()
    fake_api.script(Reply(200, body, content_type="application/json"))
    result = transcriber.transcribe(twelve_seconds, "talk.wav", MODEL, TIMED)
    assert result.segments == (Segment(0.0, 1.0, "k=[REDACTED]\ufffd"),)


def test_a_rejected_field_names_its_config_key(
    fake_api: FakeAPI, transcriber: Transcriber, twelve_seconds: Path
) -> None:
    """The fake's OpenAI-style 400 with param 'language': FieldRejected with the key path."""
    fake_api.reject_field("language")
    with pytest.raises(FieldRejected) as info:
        transcriber.transcribe(twelve_seconds, "talk.wav", MODEL, UploadRequest((LANGUAGE,)))
    assert (info.value.field, info.value.key) == ("language", "watch[0].request.language")
    assert info.value.reason == "field_rejected"
    assert info.value.http_status == 400
    assert "'language'" in (info.value.api_message or "")


@pytest.mark.parametrize(
    ("status", "body", "field"),
    [
        (
            400,
            {"error": {"message": "bad", "param": "timestamp_granularities[]"}},
            "timestamp_granularities",
        ),
        (422, {"detail": [{"loc": ["body", "temperature"], "msg": "not a float"}]}, "temperature"),
        (400, {"error": {"message": "Unknown language code 'xx'."}}, "language"),
        (400, "prompt is too long: 1000 > 896", "prompt"),
    ],
)
def test_classify_finds_the_field_in_param_detail_or_message(
    status: int, body: object, field: str
) -> None:
    """OpenAI's param, FastAPI's detail[].loc, or the field's name as a word in the message."""
    request = UploadRequest(
        (
            LANGUAGE,
            FormField("prompt", "p", "api.request.prompt"),
            FormField("temperature", "0.5", "api.request.temperature"),
            *TIMED.fields,
        )
    )
    raw = Reply(status, body).encode()[0]
    error = classify(status, httpx.Headers(), raw, request)
    assert isinstance(error, FieldRejected)
    assert error.field == field
    assert error.key == request.key_of(field)


@pytest.mark.parametrize("reply", [R400_OPENAI, R422])
def test_a_file_fault_stays_a_file_fault(reply: Reply) -> None:
    """A 400/422 about the file (or a field we did not send) is still FileRejected."""
    raw = reply.encode()[0]
    error = classify(reply.status, httpx.Headers(), raw, UploadRequest((LANGUAGE,)))
    assert isinstance(error, FileRejected)
    assert isinstance(classify(reply.status, httpx.Headers(), raw), FileRejected)


def test_the_fake_reads_durations_of_wav_and_mp3(twelve_seconds: Path) -> None:
    """The fake's duration guess: a WAV's header, an MP3 frame's bitrate; else unknown."""
    data = twelve_seconds.read_bytes()
    assert audio_seconds(data[:4096], len(data)) == pytest.approx(12.0)
    mpeg2_32k = bytes([0xFF, 0xF3, 0x40, 0xC4]) + bytes(60)  # MPEG-2 Layer III, 32 kbit/s
    assert audio_seconds(mpeg2_32k, 40_000) == pytest.approx(10.0)
    assert audio_seconds(b"not audio", 1000) is None
