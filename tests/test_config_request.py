"""request, outputs and transcript_name: checked up front, every error naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from sfwatch.config import Config, config_warnings
from sfwatch.config_request import FormField, render_name
from tests.test_config import load, load_error


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    """tmp_path without symlinks, since config paths are stored resolved."""
    return tmp_path.resolve()


def config_with(folder: Path, api: str = "", watch: str = "") -> Config:
    """Load a config whose api and first watch get the given extra YAML lines."""
    return load(folder, _text(api, watch))


def _text(api: str, watch: str) -> str:
    indent_api = "".join(f"  {line}\n" for line in api.splitlines())
    indent_watch = "".join(f"    {line}\n" for line in watch.splitlines())
    return f"api:\n  model: m\n{indent_api}watch:\n  - path: in\n{indent_watch}"


def fields_of(config: Config, index: int = 0) -> dict[str, tuple[str, str]]:
    """The watch's form fields as name -> (value, key path)."""
    return {f.name: (f.value, f.key) for f in config.watch[index].upload.fields}


def test_the_default_sends_nothing_but_file_and_model(tmp: Path) -> None:
    """No request keys, outputs [txt]: no form field at all, the answer read as {"text"}."""
    watch = config_with(tmp).watch[0]
    assert watch.upload.fields == ()
    assert watch.upload.answer == "json"
    assert watch.outputs == ("txt",)
    assert watch.transcript_name == "{stem}"


def test_each_set_key_is_one_field_with_its_key_path(tmp: Path) -> None:
    """language, prompt, temperature and extra_fields are sent as strings, by key path."""
    config = config_with(
        tmp,
        api="request:\n  language: en\n  temperature: 0\n  extra_fields: {vad_filter: true, n: 3}",
    )
    assert fields_of(config) == {
        "language": ("en", "api.request.language"),
        "temperature": ("0.0", "api.request.temperature"),
        "n": ("3", "api.request.extra_fields.n"),
        "vad_filter": ("true", "api.request.extra_fields.vad_filter"),
    }


def test_a_watch_overrides_the_api_key_by_key(tmp: Path) -> None:
    """watch[1] changes only the language; watch[0] keeps every api value."""
    text = (
        "api:\n  request: {language: en, prompt: Names, extra_fields: {a: 1}}\n"
        "watch:\n  - path: in\n  - path: de\n"
        "    request: {language: de, extra_fields: {b: x}}\n"
    )
    config = load(tmp, text)
    assert fields_of(config, 0)["language"] == ("en", "api.request.language")
    second = fields_of(config, 1)
    assert second["language"] == ("de", "watch[1].request.language")
    assert second["prompt"] == ("Names", "api.request.prompt")
    assert second["a"] == ("1", "api.request.extra_fields.a")
    assert second["b"] == ("x", "watch[1].request.extra_fields.b")


def test_timed_outputs_ask_for_verbose_json_with_segments(tmp: Path) -> None:
    """outputs [txt, srt]: response_format=verbose_json and timestamp_granularities[]=segment."""
    watch = config_with(tmp, watch="outputs: [txt, srt]").watch[0]
    assert watch.upload.fields == (
        FormField("response_format", "verbose_json", "watch[0].outputs"),
        FormField("timestamp_granularities[]", "segment", "watch[0].outputs"),
    )
    assert watch.upload.timed


def test_an_srt_only_server_gets_response_format_srt(tmp: Path) -> None:
    """request.response_format srt with timed outputs: sent as srt, no granularities."""
    watch = config_with(tmp, api="outputs: [vtt]\nrequest: {response_format: srt}").watch[0]
    assert watch.upload.fields == (
        FormField("response_format", "srt", "api.request.response_format"),
    )
    assert (watch.upload.answer, watch.upload.timed) == ("srt", True)


def test_prompt_file_is_read_relative_to_the_config(tmp: Path) -> None:
    """prompt_file: read at load from beside the config file; its key names the field."""
    (tmp / "prompt.txt").write_text("  Zoë, Jürgen and 李雷.\n", encoding="utf-8")
    config = config_with(tmp, watch="request: {prompt_file: prompt.txt}")
    assert fields_of(config)["prompt"] == ("Zoë, Jürgen and 李雷.", "watch[0].request.prompt_file")


@pytest.mark.parametrize(
    ("api", "watch", "key", "says"),
    [
        ("request: {language: 7}", "", "api.request.language", "must be a string"),
        ("", "request: {language: 'e n'}", "watch[0].request.language", "language code"),
        ("", "request: {temperature: 1.5}", "watch[0].request.temperature", "between 0 and 1"),
        ("request: {temperature: hot}", "", "api.request.temperature", "must be a number"),
        ("", "request: {temperature: .nan}", "watch[0].request.temperature", "between"),
        ("", "request: {prompt: ''}", "watch[0].request.prompt", "non-empty"),
        (
            "request: {prompt: a, prompt_file: p.txt}",
            "",
            "api.request.prompt_file",
            "api.request.prompt or this, not both",
        ),
        ("", "request: {prompt_file: missing.txt}", "watch[0].request.prompt_file", "cannot read"),
        ("", "request: {response_format: xml}", "watch[0].request.response_format", "one of"),
        ("", "request: {langauge: en}", "watch[0].request.langauge", "did you mean 'language'"),
        ("", "request: [en]", "watch[0].request", "must be a mapping"),
        ("", "request: {extra_fields: [a]}", "watch[0].request.extra_fields", "mapping"),
        (
            "",
            "request: {extra_fields: {a: {b: 1}}}",
            "watch[0].request.extra_fields.a",
            "string, number or boolean",
        ),
        ("", "request: {extra_fields: {a: [1]}}", "watch[0].request.extra_fields.a", "string"),
        ("", "request: {extra_fields: {model: x}}", "watch[0].request.extra_fields.model", "sent"),
        (
            "request: {extra_fields: {language: x}}",
            "",
            "api.request.extra_fields.language",
            "sent by sfwatch itself",
        ),
        ("", "request: {extra_fields: {file: x}}", "watch[0].request.extra_fields.file", "itself"),
        (
            "",
            "request: {extra_fields: {'timestamp_granularities[]': word}}",
            "watch[0].request.extra_fields.timestamp_granularities[]",
            "itself",
        ),
        ("", "request: {extra_fields: {'a b': 1}}", "watch[0].request.extra_fields.a b", "name"),
        ("", "outputs: []", "watch[0].outputs", "at least one"),
        ("outputs: txt", "", "api.outputs", "at least one"),
        ("", "outputs: [txt, pdf]", "watch[0].outputs[1]", "one of txt, srt, vtt, json"),
        ("", "outputs: [srt, srt]", "watch[0].outputs", "twice"),
        (
            "request: {response_format: json}",
            "outputs: [srt]",
            "api.request.response_format",
            "watch[0].outputs asks for timed outputs",
        ),
    ],
)
def test_every_bad_value_names_its_key(
    tmp: Path, api: str, watch: str, key: str, says: str
) -> None:
    """Each wrong request/outputs value is a ConfigError starting with its key path."""
    message = load_error(tmp, _text(api, watch))
    assert message.startswith(f"{key}: "), message
    assert says in message


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{stem}", "Foo"),
        ("{stem}.{lang}", "Foo.en"),
        ("{date} {stem}", "2026-12-06 Foo"),
        ("{stem} [{model}]", "Foo [FunAudioLLM_SenseVoiceSmall]"),
        ("notes", "notes"),
    ],
)
def test_transcript_name_templates_fill_in(tmp: Path, template: str, expected: str) -> None:
    """The placeholders fill in; a model's / becomes _ (a name is not a path)."""
    watch = config_with(tmp, watch=f"transcript_name: '{template}'").watch[0]
    filled = render_name(
        watch.transcript_name,
        stem="Foo",
        lang="en",
        date="2026-12-06",
        model="FunAudioLLM/SenseVoiceSmall",
    )
    assert filled == expected


@pytest.mark.parametrize(
    ("template", "says"),
    [
        ("{stem}.{language}", "unknown placeholder {language}"),
        ("{}", "unknown placeholder {}"),
        ("{stem!r}", "takes no format"),
        ("{stem:>10}", "takes no format"),
        ("sub/{stem}", "without /"),
        ("", "empty file name"),
        ("  ", "empty file name"),
        (".{stem}", "hidden"),
        ("{stem", "not a valid template"),
        ("7", "must be a string"),
    ],
)
def test_bad_transcript_names_are_config_errors(tmp: Path, template: str, says: str) -> None:
    """Unknown placeholders, a /, an empty or hidden result: refused, naming the key."""
    value = template if template == "7" else f"'{template}'"
    message = load_error(tmp, _text(f"transcript_name: {value}", ""))
    assert message.startswith("api.transcript_name: "), message
    assert says in message


def test_a_long_prompt_is_a_warning_naming_its_key(tmp: Path) -> None:
    """Over 896 characters (Groq's cap): one warning for the key that set it, not an error."""
    config = config_with(tmp, api=f"request: {{prompt: '{'x' * 900}'}}")
    warnings = [w for w in config_warnings(config) if "prompt" in w]
    assert len(warnings) == 1
    assert warnings[0].startswith("api.request.prompt: the prompt is 900 characters")


def test_api_defaults_apply_on_reload_not_restart(tmp: Path) -> None:
    """api.request/outputs/transcript_name are the watches' defaults: api == ignores them."""
    before = config_with(tmp, api="request: {language: en}")
    after = config_with(tmp, api="request: {language: de}\noutputs: [srt]")
    assert before.api == after.api, "a change here is applied by a reload (no restart needed)"
    assert before.watch != after.watch
