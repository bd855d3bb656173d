"""Tests for sfwatch.config: the config file contract of docs/design.md §9."""

from __future__ import annotations

import traceback
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from sfwatch import config as config_module
from sfwatch.config import (
    DEFAULT_INCLUDE,
    NO_KEY_MESSAGE,
    ApiConfig,
    Config,
    LogConfig,
    Secret,
    WatchConfig,
    config_warnings,
    default_config_dict,
    find_config_file,
    load_api_key,
    load_config,
    parse_config,
)
from sfwatch.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "config.example.yaml"
KEY = "sk-test-0123456789abcdef"  # a fake key; no test may see it in a message


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    """tmp_path without symlinks, since config paths are stored resolved."""
    return tmp_path.resolve()


def write_config(folder: Path, text: str, name: str = "sfwatch.yaml") -> Path:
    """Write a config file into folder and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def load(folder: Path, text: str, env: dict[str, str] | None = None) -> Config:
    """Load config text from a real file in folder, with a hermetic environment."""
    env = {"HOME": str(folder / "home")} if env is None else env
    return load_config(write_config(folder, text), env)


def load_error(folder: Path, text: str) -> str:
    """Load config text that must fail, and return the error's text."""
    with pytest.raises(ConfigError) as info:
        load(folder, text)
    return str(info.value)


# --- the example file and the defaults ---------------------------------------------------


def test_example_config_loads_with_every_default() -> None:
    """config.example.yaml loads, watches ./inbox beside it, and otherwise shows defaults."""
    root = EXAMPLE.parent
    config = load_config(EXAMPLE, {"HOME": "/nonexistent"})
    assert config.source == EXAMPLE
    assert config.state_dir == root / ".state"
    assert config.api == ApiConfig()
    assert config.log == LogConfig()
    assert config.watch == (WatchConfig(path=root / "inbox"),)


def test_example_config_shows_every_key() -> None:
    """Every key the parser accepts appears in the example with its default value."""
    example = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    example["notify"]["on"] = example["notify"].pop(True)  # YAML 1.1 reads `on:` as true
    defaults = default_config_dict()
    assert example.pop("state_dir") == "./.state"
    defaults.pop("state_dir")
    assert example == defaults


def test_defaults_of_a_minimal_config(tmp: Path) -> None:
    """A config naming only a watch path gets every documented default."""
    path = write_config(tmp, "watch:\n  - path: inbox\n")
    config = load_config(path, {"HOME": "/home/u"})
    inbox = tmp / "inbox"
    assert config == Config(
        api=ApiConfig(
            base_url="https://api.siliconflow.cn/v1",
            model="FunAudioLLM/SenseVoiceSmall",
            api_key_file=None,
            concurrency=4,
            timeout_seconds=600,
            max_attempts=8,
            requests_per_minute=None,
        ),
        state_dir=Path("/home/u/.local/state/sfwatch"),
        log=LogConfig(format="auto", level="info"),
        watch=(
            WatchConfig(
                path=inbox,
                recursive=True,
                settle_seconds=3,
                poll=None,
                done_dir=inbox / "done",
                failed_dir=inbox / "failed",
                transcript_dir=None,
                model=None,
                include=DEFAULT_INCLUDE,
                exclude=(),
                rescan_seconds=60,
            ),
        ),
        source=path,
    )
    assert config.watch[0].work_dir == inbox / ".sfwatch"
    assert not inbox.exists()  # a missing inbox is allowed and not created here


def test_default_include_matches_design() -> None:
    """The default include list is the one in docs/design.md §9."""
    assert (
        *("*.mp3", "*.wav", "*.m4a", "*.flac", "*.ogg", "*.opus", "*.aac"),
        *("*.amr", "*.wma", "*.webm", "*.mp4", "*.mkv", "*.mov"),
    ) == DEFAULT_INCLUDE


def test_default_config_dict_parses(tmp: Path) -> None:
    """default_config_dict() is itself a valid config."""
    config = parse_config(default_config_dict(), tmp, {"HOME": str(tmp)})
    assert config.watch == (WatchConfig(path=tmp / "inbox"),)
    assert config.source is None


def test_null_sections_and_values_mean_defaults(tmp: Path) -> None:
    """Empty sections and null values fall back to the defaults."""
    config = load(tmp, "api:\nlog:\nwatch:\n  - path: in\n    settle_seconds:\n    include:\n")
    assert config.api == ApiConfig()
    assert config.log == LogConfig()
    assert config.watch[0].settle_seconds == 3
    assert config.watch[0].include == DEFAULT_INCLUDE


def test_watch_config_derives_done_and_failed_dirs() -> None:
    """WatchConfig(path=...) alone lays out done/ and failed/ as docs/design.md §3 says."""
    watch = WatchConfig(path=Path("/srv/rec/inbox"))
    assert watch.done_dir == Path("/srv/rec/inbox/done")
    assert watch.failed_dir == Path("/srv/rec/inbox/failed")
    assert watch.work_dir == Path("/srv/rec/inbox/.sfwatch")
    other = WatchConfig(path=Path("/in"), done_dir=Path("/d"), failed_dir=Path("/f"))
    assert (other.done_dir, other.failed_dir) == (Path("/d"), Path("/f"))


# --- values that are accepted and normalised ----------------------------------------------


def test_explicit_values_are_kept(tmp: Path) -> None:
    """Every key set explicitly is stored, normalised where the contract says so."""
    config = load(
        tmp,
        """
api:
  base_url: http://localhost:8000/v1/
  model: whisper-1
  concurrency: 256
  timeout_seconds: 12.5
  max_attempts: 1
  requests_per_minute: 30
log: {format: JSON, level: DEBUG}
watch:
  - path: in
    recursive: false
    settle_seconds: 0.5
    poll: true
    model: other/model
    include: ["*.MP3"]
    exclude: ["draft-*"]
    rescan_seconds: 5
""",
    )
    assert config.api == ApiConfig(
        base_url="http://localhost:8000/v1",
        model="whisper-1",
        concurrency=256,
        timeout_seconds=12.5,
        max_attempts=1,
        requests_per_minute=30.0,
    )
    assert config.log == LogConfig(format="json", level="debug")
    watch = config.watch[0]
    assert (watch.recursive, watch.settle_seconds, watch.poll) == (False, 0.5, True)
    assert (watch.model, watch.include, watch.exclude) == ("other/model", ("*.MP3",), ("draft-*",))
    assert watch.rescan_seconds == 5


@pytest.mark.parametrize(
    ("value", "expected"),
    [("auto", None), ("AUTO", None), ("null", None), ("true", True), ("false", False)],
)
def test_poll_values(tmp: Path, value: str, expected: bool | None) -> None:
    """poll: auto (or null) means autodetect; true/false force it."""
    config = load(tmp, f"watch:\n  - path: in\n    poll: {value}\n")
    assert config.watch[0].poll is expected


def test_relative_paths_resolve_against_the_config_folder(tmp: Path) -> None:
    """Relative paths are relative to the config file's folder, not the working directory."""
    folder = tmp / "etc"
    config = load(
        folder,
        """
api: {api_key_file: secrets/key}
state_dir: ../state
watch:
  - path: ../inbox
    done_dir: archive/./done
    failed_dir: /abs/failed
    transcript_dir: ../texts
""",
    )
    assert config.api.api_key_file == folder / "secrets" / "key"
    assert config.state_dir == tmp / "state"
    watch = config.watch[0]
    assert watch.path == tmp / "inbox"
    assert watch.done_dir == folder / "archive" / "done"
    assert watch.failed_dir == Path("/abs/failed")
    assert watch.transcript_dir == tmp / "texts"


def test_home_is_expanded_in_paths(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A leading ~ in a path means the home directory."""
    monkeypatch.setenv("HOME", str(tmp / "home"))
    config = load(tmp, "watch:\n  - path: ~/inbox\n")
    assert config.watch[0].path == tmp / "home" / "inbox"


def test_separate_watch_folders_are_fine(tmp: Path) -> None:
    """Sibling folders with a common prefix are not nested."""
    config = load(tmp, "watch:\n  - path: a\n  - path: ab\n  - path: c/a\n")
    assert [w.path for w in config.watch] == [tmp / "a", tmp / "ab", tmp / "c" / "a"]


# --- state_dir ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"STATE_DIRECTORY": "/var/lib/sfwatch", "XDG_STATE_HOME": "/x"}, "/var/lib/sfwatch"),
        ({"STATE_DIRECTORY": "/var/lib/one:/var/lib/two"}, "/var/lib/one"),
        ({"STATE_DIRECTORY": "", "XDG_STATE_HOME": "/x", "HOME": "/h"}, "/x/sfwatch"),
        ({"XDG_STATE_HOME": "relative", "HOME": "/h"}, "/h/.local/state/sfwatch"),
        ({"HOME": "/h"}, "/h/.local/state/sfwatch"),
    ],
)
def test_state_dir_default_from_environment(tmp: Path, env: dict[str, str], expected: str) -> None:
    """$STATE_DIRECTORY, else $XDG_STATE_HOME/sfwatch, else ~/.local/state/sfwatch."""
    assert load(tmp, "watch: [{path: in}]\n", env).state_dir == Path(expected)


def test_explicit_state_dir_beats_environment(tmp: Path) -> None:
    """state_dir in the file wins over $STATE_DIRECTORY."""
    env = {"STATE_DIRECTORY": "/var/lib/sfwatch"}
    assert load(tmp, "state_dir: st\nwatch: [{path: in}]\n", env).state_dir == tmp / "st"


# --- errors name the key ------------------------------------------------------------------

W = "watch:\n  - path: in\n"  # a valid watch section, for tests about other sections


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # unknown keys, at every level, with a hint when one is close
        ("api: {concurency: 4}\n" + W, "api.concurency: unknown key (did you mean 'concurrency'?)"),
        ("api: {zzz: 1}\n" + W, "api.zzz: unknown key"),
        ("wach: []\n" + W, "wach: unknown key (did you mean 'watch'?)"),
        ("log: {lvl: info}\n" + W, "log.lvl: unknown key (did you mean 'level'?)"),
        (
            "watch: [{path: in, setle_seconds: 3}]",
            "watch[0].setle_seconds: unknown key (did you mean 'settle_seconds'?)",
        ),
        ("1: x\n" + W, "1: unknown key"),
        # api
        ("api: [1]\n" + W, "api: must be a mapping, got a list"),
        ("api: {concurrency: four}\n" + W, "api.concurrency: must be an integer, got 'four'"),
        ("api: {concurrency: true}\n" + W, "api.concurrency: must be an integer, got True"),
        ("api: {concurrency: 4.5}\n" + W, "api.concurrency: must be an integer, got 4.5"),
        ("api: {concurrency: 0}\n" + W, "api.concurrency: must be between 1 and 256"),
        ("api: {concurrency: 257}\n" + W, "api.concurrency: must be between 1 and 256"),
        ("api: {max_attempts: 0}\n" + W, "api.max_attempts: must be >= 1"),
        ("api: {timeout_seconds: 0}\n" + W, "api.timeout_seconds: must be > 0"),
        ("api: {timeout_seconds: -1.5}\n" + W, "api.timeout_seconds: must be > 0"),
        ("api: {timeout_seconds: .nan}\n" + W, "api.timeout_seconds: must be > 0"),
        ("api: {timeout_seconds: .inf}\n" + W, "api.timeout_seconds: must be a finite number"),
        ("api: {timeout_seconds: ten}\n" + W, "api.timeout_seconds: must be a number, got 'ten'"),
        ("api: {timeout_seconds: no}\n" + W, "api.timeout_seconds: must be a number, got False"),
        ("api: {requests_per_minute: 0}\n" + W, "api.requests_per_minute: must be > 0"),
        (
            "api: {base_url: 'ftp://x/v1'}\n" + W,
            "api.base_url: must be an http(s) URL, got 'ftp://x/v1'",
        ),
        (
            "api: {base_url: api.x.cn/v1}\n" + W,
            "api.base_url: must be an http(s) URL, got 'api.x.cn/v1'",
        ),
        ("api: {model: ''}\n" + W, "api.model: must not be empty"),
        ("api: {model: 5}\n" + W, "api.model: must be a string, got 5"),
        ("api: {api_key_file: [a]}\n" + W, "api.api_key_file: must be a path, got a list"),
        # state_dir and log
        ("state_dir: 5\n" + W, "state_dir: must be a path, got 5"),
        ("state_dir: ''\n" + W, "state_dir: must be a path, got ''"),
        ("log: {format: xml}\n" + W, "log.format: must be one of json, console, auto; got 'xml'"),
        (
            "log: {level: verbose}\n" + W,
            "log.level: must be one of debug, info, warning, error; got 'verbose'",
        ),
        ("log: json\n" + W, "log: must be a mapping, got 'json'"),
        # watch as a whole
        ("api: {}\n", "watch: required: list at least one folder to watch"),
        ("watch: []\n", "watch: must list at least one folder to watch"),
        ("watch: in\n", "watch: must be a list of folders, got 'in'"),
        ("watch: {path: in}\n", "watch: must be a list of folders, got a mapping"),
        ("watch: [in]\n", "watch[0]: must be a mapping with a 'path' key, got 'in'"),
        # one watch entry
        ("watch: [{recursive: true}]\n", "watch[0].path: required: the folder to watch"),
        ("watch: [{path: 5}]\n", "watch[0].path: must be a path, got 5"),
        (W + "    settle_seconds: 0\n", "watch[0].settle_seconds: must be > 0"),
        (W + "    rescan_seconds: -5\n", "watch[0].rescan_seconds: must be > 0"),
        (W + "    recursive: maybe\n", "watch[0].recursive: must be true or false, got 'maybe'"),
        (
            W + "    poll: sometimes\n",
            "watch[0].poll: must be true, false or auto, got 'sometimes'",
        ),
        (W + "    poll: 1\n", "watch[0].poll: must be true, false or auto, got 1"),
        (W + "    include: '*.mp3'\n", "watch[0].include: must be a list of patterns, got '*.mp3'"),
        (W + "    include: []\n", "watch[0].include: must list at least one pattern"),
        (W + "    include: ['*.mp3', 5]\n", "watch[0].include[1]: must be a pattern, got 5"),
        (W + "    exclude: ['']\n", "watch[0].exclude[0]: must be a pattern, got ''"),
        (W + "    model: ''\n", "watch[0].model: must not be empty"),
        (
            W + "    done_dir: ~no-such-user-x/d\n",
            "watch[0].done_dir: no home directory for '~no-such-user-x/d'",
        ),
        (W + "    done_dir: in\n", "watch[0].done_dir: must not be the watched folder itself"),
        (
            W + "    failed_dir: ./in/\n",
            "watch[0].failed_dir: must not be the watched folder itself",
        ),
        (
            W + "    done_dir: x\n    failed_dir: x\n",
            "watch[0].failed_dir: must differ from done_dir",
        ),
        (
            W + "  - path: in\n    recursive: false\n",
            "watch[1].path: same folder as watch[0].path ({tmp}/in)",
        ),
        (W + "  - path: in/sub\n", "watch[1].path: is inside watch[0].path ({tmp}/in)"),
        (W + "  - path: .\n", "watch[1].path: contains watch[0].path ({tmp}/in)"),
        (
            W + "  - path: b\n  - path: ./b/../in/x\n",
            "watch[2].path: is inside watch[0].path ({tmp}/in)",
        ),
        # the document as a whole
        ("- watch\n", "the config must be a mapping of keys to values, got a list"),
        ("hello\n", "the config must be a mapping of keys to values, got 'hello'"),
    ],
)
def test_invalid_config_names_the_key(tmp: Path, text: str, message: str) -> None:
    """Each invalid value gives an error whose text starts with the full key path."""
    assert load_error(tmp, text) == message.format(tmp=tmp)


def test_long_values_are_shortened_in_messages(tmp: Path) -> None:
    """A huge wrong value does not flood the message."""
    message = load_error(tmp, f"api: {{concurrency: {'x' * 500}}}\n" + W)
    assert message.startswith("api.concurrency: must be an integer, got 'xxx")
    assert message.endswith("...")
    assert len(message) < 120


def test_config_error_carries_key_and_message(tmp: Path) -> None:
    """ConfigError exposes the key path and the bare message separately."""
    with pytest.raises(ConfigError) as info:
        load(tmp, W + "    settle_seconds: 0\n")
    assert (info.value.key, info.value.message) == ("watch[0].settle_seconds", "must be > 0")


def test_watch_path_that_is_a_file(tmp: Path) -> None:
    """A watch path that exists but is not a directory is an error."""
    (tmp / "in").write_text("not a folder", encoding="utf-8")
    assert load_error(tmp, W) == f"watch[0].path: {tmp / 'in'} is not a directory"


def test_watch_paths_compare_after_resolving_symlinks(tmp: Path) -> None:
    """Two names for one folder (via a symlink) are the same watch."""
    (tmp / "real").mkdir()
    (tmp / "link").symlink_to(tmp / "real")
    message = load_error(tmp, "watch: [{path: real}, {path: link}]\n")
    assert message == f"watch[1].path: same folder as watch[0].path ({tmp / 'real'})"


# --- folders that would feed a watch, hide one, or expose the ledger (§9) -----------------

A, B = "  - path: a\n", "  - path: b\n"  # two separate watched folders
IGNORE_ALL = "the daemon never looks into it, so every file there would be ignored"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # a folder the originals go to is a watched folder, or holds one
        (
            "watch: [{path: ., done_dir: .}]\n",
            "watch[0].done_dir: must not be the watched folder itself",
        ),
        (
            "watch: [{path: in, done_dir: .}]\n",
            (
                "watch[0].done_dir: must not contain a watched folder: "
                f"watch[0].path ({{tmp}}/in); {IGNORE_ALL}"
            ),
        ),
        (
            "watch: [{path: in/x, failed_dir: in}]\n",
            (
                f"watch[0].failed_dir: must not contain a watched folder: watch[0].path "
                f"({{tmp}}/in/x); {IGNORE_ALL}"
            ),
        ),
        (
            "watch:\n  - {path: a, done_dir: b}\n" + B,
            "watch[0].done_dir: must not be a watched folder: watch[1].path ({tmp}/b)",
        ),
        (
            "watch:\n" + A + "  - {path: b, failed_dir: a}\n",
            "watch[1].failed_dir: must not be a watched folder: watch[0].path ({tmp}/a)",
        ),
        (
            "watch:\n  - {path: a/in, done_dir: a/done}\n  - {path: b, done_dir: a}\n",
            (
                "watch[1].done_dir: must not contain a watched folder: watch[0].path ({tmp}/a/in); "
                "files moved here could land in it and be taken again"
            ),
        ),
        # inside another watch, where it looks: every file moved there comes back
        (
            "watch:\n  - {path: a, done_dir: b/done-a}\n  - {path: b, done_dir: a/done-b}\n",
            (
                "watch[0].done_dir: is inside watch[1].path ({tmp}/b), which would take every file "
                "moved here as a new one; move it out, or add 'done-a' to watch[1].exclude"
            ),
        ),
        (
            "watch:\n  - {path: a, failed_dir: b/bad}\n" + B,
            (
                "watch[0].failed_dir: is inside watch[1].path ({tmp}/b), which would take every "
                "file moved here as a new one; move it out, or add 'bad' to watch[1].exclude"
            ),
        ),
        (
            "watch:\n" + A + "  - {path: b, done_dir: a/sub/done}\n",
            (
                "watch[1].done_dir: is inside watch[0].path ({tmp}/a), which would take every file "
                "moved here as a new one; move it out, or add 'done' to watch[0].exclude"
            ),
        ),
        # the daemon's work area
        (
            "watch: [{path: in, done_dir: in/.sfwatch/done}]\n",
            (
                "watch[0].done_dir: must not be inside the daemon's work area {tmp}/in/.sfwatch "
                "(watch[0].path)"
            ),
        ),
        (
            "watch:\n" + A + "  - {path: b, transcript_dir: a/.sfwatch}\n",
            (
                "watch[1].transcript_dir: must not be inside the daemon's work area "
                "{tmp}/a/.sfwatch (watch[0].path)"
            ),
        ),
        # transcripts
        (
            "watch: [{path: in, transcript_dir: ./in}]\n",
            "watch[0].transcript_dir: must not be the watched folder itself",
        ),
        (
            "watch:\n  - {path: a, transcript_dir: b}\n" + B,
            "watch[0].transcript_dir: must not be a watched folder: watch[1].path ({tmp}/b)",
        ),
        # done and failed of one watch
        (
            "watch: [{path: in, done_dir: x, failed_dir: x}]\n",
            "watch[0].failed_dir: must differ from done_dir",
        ),
        (
            "watch: [{path: in, done_dir: out, failed_dir: out/failed}]\n",
            "watch[0].failed_dir: must not be inside done_dir ({tmp}/out)",
        ),
        (
            "watch: [{path: in, done_dir: out/done, failed_dir: out}]\n",
            "watch[0].done_dir: must not be inside failed_dir ({tmp}/out)",
        ),
        # failed_dirs of several watches: retry must know which inbox a file goes back to
        (
            "watch:\n  - {path: a, failed_dir: f}\n  - {path: b, failed_dir: f}\n",
            "watch[1].failed_dir: same folder as watch[0].failed_dir ({tmp}/f)",
        ),
        (
            "watch:\n  - {path: a, failed_dir: f}\n  - {path: b, failed_dir: f/b}\n",
            "watch[1].failed_dir: is inside watch[0].failed_dir ({tmp}/f)",
        ),
        (
            "watch:\n  - {path: a, failed_dir: b/failed/a}\n" + B,
            "watch[1].failed_dir: contains watch[0].failed_dir ({tmp}/b/failed/a)",
        ),
        (
            "watch:\n  - {path: a, done_dir: x}\n  - {path: b, failed_dir: x}\n",
            "watch[1].failed_dir: same folder as watch[0].done_dir ({tmp}/x)",
        ),
        (
            "watch:\n  - {path: a, failed_dir: x}\n  - {path: b, done_dir: x/done}\n",
            "watch[1].done_dir: is inside watch[0].failed_dir ({tmp}/x)",
        ),
        # the ledger
        (
            "state_dir: in/.state\n" + W,
            (
                "state_dir: {tmp}/in/.state must not be inside a watched folder: watch[0].path "
                "({tmp}/in); whoever may write there could reach the ledger"
            ),
        ),
        (
            "state_dir: .\nwatch: [{path: .}]\n",
            (
                "state_dir: {tmp} must not be inside a watched folder: watch[0].path ({tmp}); "
                "whoever may write there could reach the ledger"
            ),
        ),
    ],
)
def test_overlapping_folders_are_refused(tmp: Path, text: str, message: str) -> None:
    """Each dangerous overlap is an error naming its key path (and the other one's)."""
    assert load_error(tmp, text) == message.format(tmp=tmp)


def test_default_state_dir_inside_a_watched_folder_is_refused(tmp: Path) -> None:
    """The default state_dir ($HOME/.local/state/sfwatch) inside a watch: say to set it."""
    with pytest.raises(ConfigError) as info:
        load(tmp, "watch: [{path: home}]\n", {"HOME": str(tmp / "home")})
    assert info.value.key == "state_dir"
    assert info.value.message.startswith(
        f"{tmp}/home/.local/state/sfwatch (the default; set state_dir) must not be inside "
        f"a watched folder: watch[0].path ({tmp}/home)"
    )


@pytest.mark.parametrize(
    "text",
    [
        # one archive outside every inbox, shared
        "watch:\n  - {path: a, done_dir: archive}\n  - {path: b, done_dir: archive}\n",
        # inside another watch, where that watch never looks
        "watch:\n  - {path: a, done_dir: b/archive}\n  - {path: b, exclude: [archive]}\n",
        "watch:\n  - {path: a, done_dir: b/done/a}\n" + B,
        "watch:\n  - {path: a, done_dir: b/x/done}\n  - {path: b, recursive: false}\n",
        "watch:\n  - {path: a, done_dir: b/.archive}\n" + B,
        (
            "watch:\n  - {path: a, done_dir: d}\n  - {path: b, done_dir: b/incoming, "
            "exclude: [incoming]}\n"
        ),
        # transcripts beside the originals, or into another inbox (text is not audio)
        "watch: [{path: a, done_dir: out, transcript_dir: out}]\n",
        "watch:\n  - {path: a, transcript_dir: b/texts}\n" + B,
        # the ledger beside the inbox
        "state_dir: ./.state\n" + W,
        "state_dir: a-state\nwatch: [{path: a}]\n",
    ],
)
def test_overlaps_that_are_fine(tmp: Path, text: str) -> None:
    """Overlaps that cannot feed a file back in or hide an inbox are accepted."""
    assert load(tmp, text).watch


@pytest.mark.parametrize(
    ("base_url", "warned"),
    [
        ("https://api.siliconflow.cn/v1", False),
        ("https://10.0.0.5/v1", False),
        ("http://127.0.0.1:8080/v1", False),
        ("http://127.5.6.7/v1", False),
        ("http://localhost:8000/v1", False),
        ("http://LocalHost./v1", False),
        ("http://[::1]:9000/v1", False),
        ("http://[::ffff:127.0.0.1]/v1", False),
        ("http://api.example.com/v1", True),
        ("http://10.0.0.5:8000/v1", True),
        ("http://127.0.0.1.example.com/v1", True),
        ("http://[2001:db8::1]/v1", True),
    ],
)
def test_plain_http_to_another_host_is_a_warning(tmp: Path, base_url: str, warned: bool) -> None:
    """http:// to a host that is not loopback loads, with a warning naming api.base_url."""
    config = load(tmp, f"api: {{base_url: '{base_url}'}}\n" + W)
    warnings = config_warnings(config)
    if not warned:
        assert warnings == []
        return
    (warning,) = warnings
    host = urlsplit(base_url).hostname
    assert warning.startswith(f"api.base_url: plain http:// to {host}, which is not this machine")
    assert "use https://" in warning


# --- the file itself ------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file_is_an_error(tmp: Path, text: str) -> None:
    """An empty config file is an error, not a config of defaults."""
    assert load_error(tmp, text) == f"{tmp / 'sfwatch.yaml'}: config file is empty"


def test_parse_config_rejects_none(tmp: Path) -> None:
    """parse_config(None) reports an empty config."""
    with pytest.raises(ConfigError, match=r"^config file is empty$"):
        parse_config(None, tmp)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "api: [1, 2\nwatch: x\n",
            "while parsing a flow sequence, expected ',' or ']', but got ':' at line 2",
        ),
        (
            "watch:\n  - path: a\n   bad: 1\n",
            (
                "while parsing a block collection, expected <block end>, "
                "but found '<block mapping start>' at line 3"
            ),
        ),
        (
            "a: 1\n\tb: 2\n",
            (
                "while scanning for the next token, found character '\\t' "
                "that cannot start any token at line 2"
            ),
        ),
        ("watch: [{path: a}]\nwatch: [{path: b}]\n", "duplicate key 'watch' at line 2"),
        ("watch:\n  - path: a\n    path: b\n", "duplicate key 'path' at line 3"),
        (
            "a: 1\n---\nb: 2\n",
            "expected a single document in the stream, but found another document at line 2",
        ),
    ],
)
def test_invalid_yaml_names_file_and_line(tmp: Path, text: str, problem: str) -> None:
    """A YAML syntax error (or a repeated key) names the file and the line."""
    assert load_error(tmp, text) == f"{tmp / 'sfwatch.yaml'}: invalid YAML: {problem}"


def test_not_utf8_is_invalid_yaml(tmp: Path) -> None:
    """Bytes that are not UTF-8 give a one-line invalid-YAML error."""
    path = tmp / "sfwatch.yaml"
    path.write_bytes(b"watch: [{path: \xff}]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(info.value).startswith(f"{path}: invalid YAML: ")
    assert "\n" not in str(info.value)


def test_merge_keys_may_be_overridden(tmp: Path) -> None:
    """A YAML merge (<<) followed by an override is not a duplicate key."""
    config = load(tmp, "watch:\n  - &a {path: a, settle_seconds: 5}\n  - {<<: *a, path: b}\n")
    assert [(w.path.name, w.settle_seconds) for w in config.watch] == [("a", 5), ("b", 5)]


def test_unreadable_config_file(tmp: Path) -> None:
    """A config path that cannot be read names the file and the reason."""
    with pytest.raises(ConfigError) as info:
        load_config(tmp, {})
    assert str(info.value) == f"cannot read {tmp}: Is a directory"


# --- the API key ------------------------------------------------------------------------------


def key_config(tmp: Path, key_file: str | None = None) -> Config:
    """A config whose api.api_key_file is key_file (relative to tmp), if given."""
    api = f"api: {{api_key_file: {key_file}}}\n" if key_file else ""
    return load(tmp, api + W)


@pytest.mark.parametrize(
    ("env_key", "file_key", "credential", "expected"),
    [
        (KEY, "from-file", "from-credential", KEY),
        (f"  {KEY}\n", None, None, KEY),
        (None, f"{KEY}\n", "from-credential", KEY),
        ("", f"\n {KEY} \r\n", None, KEY),
        (" \n", None, KEY, KEY),
        (None, None, f"{KEY}\n", KEY),
        (None, "  \n", KEY, KEY),  # an empty key file counts as no key
    ],
)
def test_api_key_precedence(
    tmp: Path,
    env_key: str | None,
    file_key: str | None,
    credential: str | None,
    expected: str,
) -> None:
    """$SILICONFLOW_API_KEY, else api.api_key_file, else $CREDENTIALS_DIRECTORY/api_key."""
    env: dict[str, str] = {}
    if env_key is not None:
        env["SILICONFLOW_API_KEY"] = env_key
    if file_key is not None:
        (tmp / "key.txt").write_text(file_key, encoding="utf-8")
    if credential is not None:
        (tmp / "creds").mkdir()
        (tmp / "creds" / "api_key").write_text(credential, encoding="utf-8")
        env["CREDENTIALS_DIRECTORY"] = str(tmp / "creds")
    config = key_config(tmp, "key.txt" if file_key is not None else None)
    assert load_api_key(config, env) == Secret(expected)


@pytest.mark.parametrize(
    "env",
    [{}, {"SILICONFLOW_API_KEY": ""}, {"CREDENTIALS_DIRECTORY": "/nonexistent/creds"}],
)
def test_no_api_key_anywhere(tmp: Path, env: dict[str, str]) -> None:
    """No key in any of the three places gives one message naming all three."""
    with pytest.raises(ConfigError) as info:
        load_api_key(key_config(tmp), env)
    assert str(info.value) == (
        "api.api_key_file: no API key: set $SILICONFLOW_API_KEY, api.api_key_file, "
        "or a systemd credential named api_key"
    )
    assert info.value.message == NO_KEY_MESSAGE


@pytest.mark.parametrize(
    ("is_dir", "reason"), [(False, "No such file or directory"), (True, "Is a directory")]
)
def test_unreadable_key_file(tmp: Path, is_dir: bool, reason: str) -> None:
    """A configured key file that is missing or unreadable is an error naming it."""
    if is_dir:
        (tmp / "key.txt").mkdir()
    with pytest.raises(ConfigError) as info:
        load_api_key(key_config(tmp, "key.txt"), {})
    assert str(info.value) == f"api.api_key_file: cannot read {tmp / 'key.txt'}: {reason}"


def test_key_file_that_is_not_utf8(tmp: Path) -> None:
    """A key file that is not UTF-8 is refused without quoting its bytes."""
    (tmp / "key.txt").write_bytes(b"sk-\xfe\xff-secret")
    with pytest.raises(ConfigError) as info:
        load_api_key(key_config(tmp, "key.txt"), {})
    assert str(info.value) == f"api.api_key_file: cannot read {tmp / 'key.txt'}: not UTF-8 text"
    assert "secret" not in "".join(traceback.format_exception(info.value))


@pytest.mark.parametrize("bad", [f"{KEY} {KEY}", f"{KEY}\n{KEY}", f"{KEY}\x00", f"{KEY}é"])
@pytest.mark.parametrize("source", ["env", "file"])
def test_malformed_key_is_refused_without_showing_it(tmp: Path, bad: str, source: str) -> None:
    """A key an HTTP header cannot carry is refused, and the message does not quote it."""
    env: dict[str, str] = {}
    if source == "env":
        env["SILICONFLOW_API_KEY"] = bad
        config = key_config(tmp)
        where = "$SILICONFLOW_API_KEY"
    else:
        (tmp / "key.txt").write_text(bad, encoding="utf-8")
        config = key_config(tmp, "key.txt")
        where = "api.api_key_file"
    with pytest.raises(ConfigError) as info:
        load_api_key(config, env)
    assert str(info.value) == (
        f"{where}: the API key contains spaces, control or non-ASCII characters"
    )
    assert KEY not in "".join(traceback.format_exception(info.value))


def test_key_never_appears_in_config_or_secret_text(tmp: Path) -> None:
    """Neither the Config nor the Secret shows the key when printed."""
    (tmp / "key.txt").write_text(KEY, encoding="utf-8")
    config = key_config(tmp, "key.txt")
    secret = load_api_key(config, {})
    assert secret.reveal() == KEY
    for text in (repr(config), str(config), repr(secret), str(secret), f"{secret}", f"{[secret]}"):
        assert KEY not in text
    assert repr(secret) == str(secret) == "Secret('***')"


def test_secret_compares_by_value_and_is_unhashable() -> None:
    """Secrets compare by value, never equal a plain string, and cannot be hashed."""
    assert Secret("a") == Secret("a")
    assert Secret("a") != Secret("b")
    assert Secret("a") != "a"
    with pytest.raises(TypeError):
        hash(Secret("a"))


# --- finding the config file ------------------------------------------------------------------


@pytest.fixture
def places(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A config file in each place find_config_file looks, with /etc redirected to tmp."""
    paths = {
        "explicit": write_config(tmp / "explicit", "x", "my.yaml"),
        "env": write_config(tmp / "env", "x", "env.yaml"),
        "cwd": write_config(tmp / "cwd", "x"),
        "system": write_config(tmp / "etc", "x", "config.yaml"),
    }
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG", paths["system"])
    return paths


@pytest.mark.parametrize(
    ("present", "expected"),
    [
        (["explicit", "env", "cwd", "system"], "explicit"),
        (["env", "cwd", "system"], "env"),
        (["cwd", "system"], "cwd"),
        (["system"], "system"),
    ],
)
def test_find_config_file_order(
    tmp: Path, places: dict[str, Path], present: list[str], expected: str
) -> None:
    """-c, else $SFWATCH_CONFIG, else ./sfwatch.yaml, else /etc/sfwatch/config.yaml."""
    for name, path in places.items():
        if name not in present and name not in ("explicit", "env"):
            path.unlink()
    explicit = places["explicit"] if "explicit" in present else None
    env = {"SFWATCH_CONFIG": str(places["env"])} if "env" in present else {}
    assert find_config_file(explicit, env, cwd=tmp / "cwd") == places[expected]


def test_find_config_file_relative_names(tmp: Path, places: dict[str, Path]) -> None:
    """Relative -c and $SFWATCH_CONFIG values are relative to the working directory."""
    assert find_config_file("explicit/my.yaml", {}, cwd=tmp) == places["explicit"]
    assert find_config_file(None, {"SFWATCH_CONFIG": "env/env.yaml"}, cwd=tmp) == places["env"]
    assert find_config_file(None, {"SFWATCH_CONFIG": ""}, cwd=tmp / "cwd") == places["cwd"]


@pytest.mark.parametrize(
    ("explicit", "env", "message"),
    [
        ("missing.yaml", {}, "config file {tmp}/missing.yaml does not exist"),
        (
            None,
            {"SFWATCH_CONFIG": "missing.yaml"},
            "config file {tmp}/missing.yaml (from $SFWATCH_CONFIG) does not exist",
        ),
        ("cwd", {}, "config file {tmp}/cwd is not a file"),
    ],
)
def test_named_config_file_must_exist(
    tmp: Path, places: dict[str, Path], explicit: str | None, env: dict[str, str], message: str
) -> None:
    """A named config file that is missing is an error, never a fallback to another one."""
    with pytest.raises(ConfigError) as info:
        find_config_file(explicit, env, cwd=tmp)
    assert str(info.value) == message.format(tmp=tmp)


def test_no_config_file_lists_what_was_tried(tmp: Path, places: dict[str, Path]) -> None:
    """With no config anywhere the error lists each place looked in."""
    places["system"].unlink()
    with pytest.raises(ConfigError) as info:
        find_config_file(None, {}, cwd=tmp)
    assert str(info.value) == (
        f"no config file: tried {tmp}/sfwatch.yaml, {places['system']}; "
        "use -c FILE or $SFWATCH_CONFIG"
    )


# --- hooks, webhooks, notify (docs/design.md §13) --------------------------------------------


def test_integration_keys_parse(tmp: Path) -> None:
    """hooks, webhooks and notify: argv resolved, defaults filled, a bare `on:` is "on"."""
    tool = tmp / "bin" / "tool"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    config = load(
        tmp,
        "hooks:\n  on_done: [bin/tool, --quiet]\n  on_failed: [echo, x]\n  timeout_seconds: 5\n"
        "webhooks:\n  - url: https://hooks.example.org/a\n    secret_file: s\n"
        "  - url: http://127.0.0.1:8080/b\n    events: [paused]\n"
        "notify:\n  urls: ['ntfy://topic']\n  on: [failed]\n"
        "watch:\n  - path: in\n    on_done: []\n    on_failed: [/bin/sh, -c, 'exit 0']\n",
    )
    assert config.hooks.on_done == (str(tool), "--quiet")
    assert config.hooks.on_failed is not None
    assert config.hooks.on_failed[0].endswith("/echo")
    assert (config.hooks.timeout_seconds, config.hooks.max_attempts) == (5, 8)
    first, second = config.webhooks
    assert (first.events, first.secret_file, first.max_attempts) == (
        ("done", "failed", "paused", "resumed"),
        tmp / "s",
        12,
    )
    assert second.events == ("paused",)
    assert (config.notify.urls, config.notify.on) == (("ntfy://topic",), ("failed",))
    watch = config.watch[0]
    assert config.hooks.for_watch(watch, "done") == ()
    assert config.hooks.for_watch(watch, "failed") == ("/bin/sh", "-c", "exit 0")
    assert config_warnings(config) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hooks:\n  on_done: /bin/true --x\n", "hooks.on_done: must be a list of arguments"),
        ("hooks:\n  on_done: [no-such-tool-x]\n", "hooks.on_done[0]: 'no-such-tool-x' is not"),
        ("hooks:\n  on_failed: [./missing.sh]\n", "hooks.on_failed[0]: "),
        ("hooks:\n  on_done: ['']\n", "hooks.on_done[0]: must be a string"),
        ("hooks:\n  on_done: [/bin/true, 3]\n", "hooks.on_done[1]: must be a string"),
        ("hooks:\n  timeout_seconds: 0\n", "hooks.timeout_seconds: must be > 0"),
        ("hooks:\n  concurrency: 100\n", "hooks.concurrency: must be between 1 and 64"),
        ("hooks:\n  on_sucess: [/bin/true]\n", "hooks.on_sucess: unknown key"),
        ("webhooks: {url: x}\n", "webhooks: must be a list of receivers"),
        ("webhooks:\n  - events: [done]\n", "webhooks[0].url: required"),
        ("webhooks:\n  - url: ftp://u:pw@h/x\n", "webhooks[0].url: must be an http(s) URL"),
        (
            "webhooks:\n  - url: http://a/x\n  - url: http://a/x\n",
            "webhooks[1].url: same URL as webhooks[0].url",
        ),
        ("webhooks:\n  - url: http://a/x\n    events: [done, dne]\n", "webhooks[0].events[1]"),
        ("webhooks:\n  - url: http://a/x\n    events: []\n", "webhooks[0].events: must list"),
        ("notify:\n  urls: ntfy://t\n", "notify.urls: must be a list of Apprise URLs"),
        ("notify:\n  urls: [topic]\n", "notify.urls[0]: must be an Apprise URL"),
        ("notify:\n  on: [done, done]\n", "notify.on: names an event twice"),
        ("notify:\n  on: [failed]\n  'on': [done]\n", "notify.on: given twice"),
        ("watch_x: 1\n", "watch_x: unknown key"),
    ],
)
def test_integration_errors_name_the_key(tmp: Path, text: str, message: str) -> None:
    """Every wrong hooks/webhooks/notify value is an error naming its key path."""
    error = load_error(tmp, text + ("" if "watch_x" in text else "watch:\n  - path: in\n"))
    assert message in error
    assert "pw" not in error


def test_watch_hook_errors_name_the_watch(tmp: Path) -> None:
    """A watch's on_done that is not executable names watch[N].on_done[0]."""
    (tmp / "notes.sh").write_text("echo\n")  # not executable
    error = load_error(tmp, "watch:\n  - path: a\n  - path: b\n    on_done: [./notes.sh]\n")
    assert error == f"watch[1].on_done[0]: {tmp / 'notes.sh'} is not an executable file"


def test_plain_http_webhook_elsewhere_is_a_warning(tmp: Path) -> None:
    """Transcripts over plain http to another host: a warning naming the webhook."""
    config = load(tmp, "webhooks:\n  - url: http://hooks.example.org/x\nwatch:\n  - path: in\n")
    (warning,) = config_warnings(config)
    assert warning.startswith("webhooks[0].url: plain http:// to hooks.example.org")
