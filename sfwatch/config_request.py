"""What a watch sends besides the file, what it writes, and how its files are named.

Three keys, each allowed under ``api`` (the default of every watch) and under a
watch (which overrides the api's value key by key; docs/design.md §9):

- ``request``: ``language``, ``prompt`` or ``prompt_file``, ``temperature``,
  ``response_format`` and ``extra_fields``: multipart form fields sent with each
  upload, each only when set. SiliconFlow takes ``file`` and ``model`` alone, so
  the default sends nothing else.
- ``outputs``: which of ``txt``, ``srt``, ``vtt``, ``json`` to write beside the
  audio. A timed one (srt, vtt, json) asks the server for segments:
  ``response_format=verbose_json`` and ``timestamp_granularities[]=segment``,
  unless ``request.response_format`` says ``srt`` or ``vtt`` (servers that answer
  only subtitles).
- ``transcript_name``: the outputs' name before the extension, a template of
  ``{stem}``, ``{lang}``, ``{date}`` and ``{model}``.

The effective request remembers which config key every form field came from
(``RequestConfig.origins``), so a field the server rejects is reported by the key
to change (``watch[0].request.language``), not by a form field name.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sfwatch.config_section import Section, show
from sfwatch.errors import ConfigError
from sfwatch.subtitles import OUTPUT_FORMATS, TIMED_OUTPUTS

REQUEST_KEYS = (
    "language",
    "prompt",
    "prompt_file",
    "temperature",
    "response_format",
    "extra_fields",
)
#: what ``request.response_format`` may ask for
RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
#: the formats that carry segment times (the only ones fit for timed outputs)
TIMED_FORMATS = ("verbose_json", "srt", "vtt")
#: form fields sfwatch sends itself: an ``extra_fields`` entry may not take their names
RESERVED_FIELDS = frozenset(
    {"file", "model", "language", "prompt", "temperature", "response_format"}
    | {"timestamp_granularities", "timestamp_granularities[]"}
)
#: Groq refuses longer prompts; OpenAI reads only the last 224 tokens of one
PROMPT_WARN_CHARS = 896
#: the placeholders of ``transcript_name``
NAME_FIELDS = ("stem", "lang", "date", "model")
DEFAULT_TRANSCRIPT_NAME = "{stem}"
DEFAULT_OUTPUTS = ("txt",)
_EXTRA_NAME = re.compile(r"^[A-Za-z0-9_.\[\]-]{1,64}$")
_LANG_SAFE = re.compile(r"[^A-Za-z0-9_-]")

ExtraValue = str | int | float | bool


@dataclass(frozen=True)
class FormField:
    """One multipart form field of an upload, and the config key that asked for it."""

    name: str
    value: str
    key: str


@dataclass(frozen=True)
class RequestConfig:
    """The form fields of a watch's uploads (None: not sent), with where each was set."""

    language: str | None = None
    prompt: str | None = None
    temperature: float | None = None
    response_format: str | None = None
    extra_fields: tuple[tuple[str, ExtraValue], ...] = ()
    #: (what, key path): what is a key of this record (or ``extra:<name>``, ``outputs``);
    #: only for messages, so not part of == (where a value was set changes no upload)
    origins: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def origin(self, what: str) -> str:
        """The config key path ``what`` was set by (``api.request.language``, ...)."""
        return dict(self.origins).get(what, f"request.{what}")


@dataclass(frozen=True)
class UploadRequest:
    """Exactly what one upload sends besides file and model, and how to read its answer."""

    fields: tuple[FormField, ...] = ()
    #: what the 200's body is: json ({"text"}), text, verbose_json, srt or vtt
    answer: str = "json"
    #: segments are needed (a timed output was asked for): an answer without them is unusable
    timed: bool = False

    def key_of(self, name: str) -> str | None:
        """The config key of form field ``name`` (``[]`` ignored), if this request sends it."""
        bare = name.removesuffix("[]")
        for sent in self.fields:
            if sent.name.removesuffix("[]") == bare:
                return sent.key
        return None


def _form_value(value: ExtraValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def upload_request(request: RequestConfig, outputs: tuple[str, ...]) -> UploadRequest:
    """The form fields and answer format for ``request`` and ``outputs`` (docs/design.md §9)."""
    fields: list[FormField] = []
    for name in ("language", "prompt", "temperature"):
        value = getattr(request, name)
        if value is not None:
            fields.append(FormField(name, _form_value(value), request.origin(name)))
    timed = bool(TIMED_OUTPUTS.intersection(outputs))
    answer = request.response_format or ("verbose_json" if timed else "json")
    if request.response_format is not None:
        fields.append(FormField("response_format", answer, request.origin("response_format")))
    elif timed:
        fields.append(FormField("response_format", answer, request.origin("outputs")))
    if answer == "verbose_json" and timed:
        # Segment times are what subtitles need; word times would only make answers larger.
        fields.append(FormField("timestamp_granularities[]", "segment", request.origin("outputs")))
    for name, value in request.extra_fields:
        fields.append(FormField(name, _form_value(value), request.origin(f"extra:{name}")))
    return UploadRequest(tuple(fields), answer, timed)


# -- parsing -----------------------------------------------------------------------------


def parse_request(data: object, where: str, base: Path) -> dict[str, Any]:
    """The keys set in one ``request`` mapping, checked; with ``origins`` of each."""
    section = Section(data, where, REQUEST_KEYS)
    found: dict[str, Any] = {}
    origins: dict[str, str] = {}
    language = section.optional_string("language")
    if language is not None:
        if len(language) > 32 or not language.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(section.key("language"), f"must be a language code, got {language!r}")
        found["language"], origins["language"] = language, section.key("language")
    prompt, prompt_file = section.data.get("prompt"), section.data.get("prompt_file")
    if prompt is not None and prompt_file is not None:
        raise ConfigError(
            section.key("prompt_file"), f"set {section.key('prompt')} or this, not both"
        )
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(
                section.key("prompt"), f"must be a non-empty string, got {show(prompt)}"
            )
        found["prompt"], origins["prompt"] = prompt.strip(), section.key("prompt")
    elif prompt_file is not None:
        path = section.optional_path("prompt_file", base)
        assert path is not None  # noqa: S101 - set, so a path or an error
        found["prompt"], origins["prompt"] = _read_prompt(path, section.key("prompt_file"))
    temperature = section.data.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise ConfigError(
                section.key("temperature"), f"must be a number, got {show(temperature)}"
            )
        if not (math.isfinite(temperature) and 0 <= temperature <= 1):
            raise ConfigError(section.key("temperature"), "must be between 0 and 1")
        found["temperature"], origins["temperature"] = (
            float(temperature),
            section.key("temperature"),
        )
    if section.data.get("response_format") is not None:
        found["response_format"] = section.choice("response_format", "json", RESPONSE_FORMATS)
        origins["response_format"] = section.key("response_format")
    extra = section.data.get("extra_fields")
    if extra is not None:
        found["extra_fields"] = _extra_fields(extra, section.key("extra_fields"), origins)
    found["origins"] = origins
    return found


def _read_prompt(path: Path, key: str) -> tuple[str, str]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path} is not UTF-8 text") from None
    if not text:
        raise ConfigError(key, f"{path} is empty")
    return text, key


def _extra_fields(data: object, key: str, origins: dict[str, str]) -> dict[str, ExtraValue]:
    if not isinstance(data, dict):
        raise ConfigError(key, f"must be a mapping of field names to values, got {show(data)}")
    fields: dict[str, ExtraValue] = {}
    for name, value in data.items():
        where = f"{key}.{name}"
        if not isinstance(name, str) or not _EXTRA_NAME.match(name):
            raise ConfigError(where, "a field name is 1-64 letters, digits, _ . - [ ]")
        if name in RESERVED_FIELDS or name.removesuffix("[]") in RESERVED_FIELDS:
            raise ConfigError(where, "is sent by sfwatch itself; use the request key of that name")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(where, "must be a finite number")
        if not isinstance(value, str | int | float | bool):
            raise ConfigError(where, f"must be a string, number or boolean, got {show(value)}")
        fields[name] = value
        origins[f"extra:{name}"] = where
    return fields


def merge_request(api: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """A watch's request: its own keys over the api's, key by key (extra_fields by name)."""
    merged = {**api, **own}
    merged["origins"] = {**api.get("origins", {}), **own.get("origins", {})}
    if "extra_fields" in api and "extra_fields" in own:
        merged["extra_fields"] = {**api["extra_fields"], **own["extra_fields"]}
        # A watch's own entry replaces the api's: that key is where to look.
    return merged


def build_request(parts: dict[str, Any], outputs_key: str) -> RequestConfig:
    """The ``RequestConfig`` of merged ``parse_request`` results."""
    origins = {**parts.get("origins", {}), "outputs": outputs_key}
    return RequestConfig(
        language=parts.get("language"),
        prompt=parts.get("prompt"),
        temperature=parts.get("temperature"),
        response_format=parts.get("response_format"),
        extra_fields=tuple(sorted(parts.get("extra_fields", {}).items())),
        origins=tuple(sorted(origins.items())),
    )


def parse_outputs(section: Section) -> tuple[str, ...] | None:
    """``outputs``: a non-empty list of txt, srt, vtt, json without repeats; None if unset."""
    return section.choices("outputs", OUTPUT_FORMATS, noun="format")


def check_answer_fits(request: RequestConfig, outputs: tuple[str, ...], outputs_key: str) -> None:
    """Timed outputs need a timed answer: refuse ``response_format: json`` with ``srt``."""
    fmt = request.response_format
    if fmt is not None and TIMED_OUTPUTS.intersection(outputs) and fmt not in TIMED_FORMATS:
        raise ConfigError(
            request.origin("response_format"),
            f"{outputs_key} asks for timed outputs, which need response_format "
            f"{', '.join(TIMED_FORMATS)}; got {fmt}",
        )


def parse_transcript_name(section: Section) -> str | None:
    """``transcript_name``: a template of {stem}, {lang}, {date}, {model}; None if unset."""
    value = section.data.get("transcript_name")
    if value is None:
        return None
    key = section.key("transcript_name")
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, got {show(value)}")
    if "/" in value or "\0" in value:
        raise ConfigError(key, "must be a file name, without / (transcript_dir sets the folder)")
    try:
        parsed = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise ConfigError(key, f"is not a valid template: {exc}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in NAME_FIELDS:
            raise ConfigError(
                key,
                f"unknown placeholder {{{name}}}; use {', '.join(f'{{{n}}}' for n in NAME_FIELDS)}",
            )
        if spec or conversion:
            raise ConfigError(key, f"placeholder {{{name}}} takes no format or conversion")
    sample = render_name(value, stem="a", lang="und", date="2000-01-01", model="m")
    if not sample.strip() or sample in (".", ".."):
        raise ConfigError(key, "gives an empty file name")
    if sample.startswith("."):
        raise ConfigError(key, "gives a hidden file name (starting with .)")
    return value


def safe_language(language: str | None) -> str:
    """A language for a file name: letters, digits, _ and - only (a server's is untrusted)."""
    cleaned = _LANG_SAFE.sub("", language or "")[:32]
    return cleaned or "und"


def render_name(template: str, *, stem: str, lang: str, date: str, model: str) -> str:
    """``template`` filled in; ``model``'s ``/`` becomes ``_`` (a name is not a path)."""
    return template.format(stem=stem, lang=lang, date=date, model=model.replace("/", "_"))


__all__ = [
    "DEFAULT_OUTPUTS",
    "DEFAULT_TRANSCRIPT_NAME",
    "PROMPT_WARN_CHARS",
    "FormField",
    "RequestConfig",
    "UploadRequest",
    "build_request",
    "check_answer_fits",
    "merge_request",
    "parse_outputs",
    "parse_request",
    "parse_transcript_name",
    "render_name",
    "safe_language",
    "upload_request",
]
