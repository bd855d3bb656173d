"""Reading and checking the config file (docs/design.md §9).

The YAML file is the user-facing contract, so this module is strict: unknown keys,
wrong types and impossible values are errors whose text starts with the full key
path (``watch[0].settle_seconds: must be > 0``), never silent defaults. A ``null``
value means "the default". Relative paths are relative to the config file's folder,
so a config works the same whatever the daemon's working directory is.

The API key is not part of :class:`Config`: :func:`load_api_key` reads it when it
is needed and wraps it in a :class:`Secret`, which never prints its value.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from sfwatch.config_extras import (
    EVENTS,
    HooksConfig,
    MetricsConfig,
    NotifyConfig,
    WebhookConfig,
    listen_address,
    parse_hooks,
    parse_listen,
    parse_metrics,
    parse_notify,
    parse_webhooks,
)
from sfwatch.config_folders import check_folders, check_state_dir
from sfwatch.config_request import (
    DEFAULT_OUTPUTS,
    DEFAULT_TRANSCRIPT_NAME,
    PROMPT_WARN_CHARS,
    REQUEST_KEYS,
    RequestConfig,
    UploadRequest,
    build_request,
    check_answer_fits,
    merge_request,
    parse_outputs,
    parse_request,
    parse_transcript_name,
    upload_request,
)
from sfwatch.config_section import HOOK_PATH, Section, show, shown_url
from sfwatch.errors import ConfigError

DEFAULT_BASE_URL = "https://api.siliconflow.cn/v1"
DEFAULT_MODEL = "FunAudioLLM/SenseVoiceSmall"
DEFAULT_INCLUDE = (
    *("*.mp3", "*.wav", "*.m4a", "*.flac", "*.ogg", "*.opus", "*.aac"),
    *("*.amr", "*.wma", "*.webm", "*.mp4", "*.mkv", "*.mov"),
)
LOG_FORMATS = ("json", "console", "auto")
TRANSCODE_MODES = ("auto", "always", "never")
LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_CONCURRENCY = 256
#: the config file's top-level keys; a reload applies ``watch``, the rest need a restart
TOP_KEYS = (
    "api",
    "state_dir",
    "log",
    "prepare",
    "metrics",
    "hooks",
    "webhooks",
    "notify",
    "workers",
    "watch",
)
#: the most worker processes one ``sfwatch run`` starts
MAX_WORKERS = 64
SYSTEM_CONFIG = Path("/etc/sfwatch/config.yaml")
NO_KEY_MESSAGE = (
    "no API key: set $SILICONFLOW_API_KEY, api.api_key_file, or a systemd credential named api_key"
)

# WatchConfig's "not given" marker for done_dir/failed_dir: parse_config always stores
# absolute paths, so the relative Path() can only mean "derive it from path".
_DERIVED = Path()


class Secret:
    """The API key; it prints as ``Secret('***')`` so it cannot reach a log by accident."""

    __slots__ = ("_value",)
    # Hashing by value would let anyone holding the hash test guesses; nothing needs it.
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the key itself; call this only where it goes into a request header."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        # Constant time, so comparing keys does not leak how much of one matched.
        return hmac.compare_digest(self._value.encode(), other._value.encode())


@dataclass(frozen=True)
class ApiConfig:
    """How to reach the transcription endpoint."""

    base_url: str = DEFAULT_BASE_URL
    model: str = DEFAULT_MODEL
    api_key_file: Path | None = None
    concurrency: int = 4
    timeout_seconds: float = 600.0
    max_attempts: int = 8
    requests_per_minute: float | None = None
    max_upload_bytes: int = 50_000_000
    max_audio_seconds: float = 3600.0
    # The watches' defaults (docs/design.md §9). Each watch holds the merged result, so
    # a reload applies them like a watch's own keys: they are left out of ==, which is
    # how the daemon tells the api changes that need a restart.
    #: the api's own ``request`` keys, as parsed (``watch[].request`` overrides them)
    request: dict[str, Any] = field(default_factory=dict, compare=False)
    outputs: tuple[str, ...] = field(default=DEFAULT_OUTPUTS, compare=False)
    transcript_name: str = field(default=DEFAULT_TRANSCRIPT_NAME, compare=False)


@dataclass(frozen=True)
class PrepareConfig:
    """When audio is re-encoded before upload."""

    transcode: str = "auto"  # auto | always | never


@dataclass(frozen=True)
class LogConfig:
    """Where log lines go and how much of them."""

    format: str = "auto"
    level: str = "info"


@dataclass(frozen=True)
class WatchConfig:
    """One watched folder; ``done_dir``/``failed_dir`` default to subfolders of ``path``."""

    path: Path
    recursive: bool = True
    settle_seconds: float = 3.0
    poll: bool | None = None
    done_dir: Path = _DERIVED
    failed_dir: Path = _DERIVED
    transcript_dir: Path | None = None
    model: str | None = None
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = ()
    rescan_seconds: float = 60.0
    #: hooks for this folder's files (argv); None: ``hooks.on_done``/``on_failed``; (): none
    on_done: tuple[str, ...] | None = None
    on_failed: tuple[str, ...] | None = None
    #: the form fields of its uploads, merged over ``api.request`` (config_request.py)
    request: RequestConfig = RequestConfig()  # noqa: RUF009 - frozen
    #: the files written per recording: txt, srt, vtt, json
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS
    #: the outputs' name before the extension: {stem}, {lang}, {date}, {model}
    transcript_name: str = DEFAULT_TRANSCRIPT_NAME

    def __post_init__(self) -> None:
        # Lets tests and callers write WatchConfig(path=...) and get docs/design.md §3.
        if self.done_dir == _DERIVED:
            object.__setattr__(self, "done_dir", self.path / "done")
        if self.failed_dir == _DERIVED:
            object.__setattr__(self, "failed_dir", self.path / "failed")

    @property
    def upload(self) -> UploadRequest:
        """Exactly the form fields its uploads send besides file and model."""
        return upload_request(self.request, self.outputs)

    @functools.cached_property  # (asked a few times a file; a frozen record never changes)
    def work_dir(self) -> Path:
        """The claim area; inside ``path`` so that claiming is a same-filesystem rename."""
        return self.path / ".sfwatch"


@dataclass(frozen=True)
class Config:
    """The whole validated config file."""

    api: ApiConfig
    state_dir: Path
    log: LogConfig
    watch: tuple[WatchConfig, ...]
    source: Path | None = None
    prepare: PrepareConfig = PrepareConfig()
    metrics: MetricsConfig = MetricsConfig()  # noqa: RUF009 - frozen (config_extras.py)
    hooks: HooksConfig = HooksConfig()  # noqa: RUF009 - frozen (config_extras.py)
    webhooks: tuple[WebhookConfig, ...] = ()
    notify: NotifyConfig = NotifyConfig()  # noqa: RUF009 - frozen (config_extras.py)
    #: processes in one ``sfwatch run`` (workers.py); ``workers: auto`` is one per allowed CPU
    workers: int = 1


# The YAML keys are the dataclasses' field names, so a new field is a new key.
_API_KEYS = tuple(f.name for f in fields(ApiConfig))
_WATCH_KEYS = tuple(f.name for f in fields(WatchConfig))


def default_config_dict() -> dict[str, Any]:
    """Every key with its default, watching ``./inbox``; the example config mirrors it."""
    watch = asdict(WatchConfig(path=Path("inbox")))
    watch.update(path="./inbox", poll="auto", done_dir=None, failed_dir=None)
    watch.update(include=list(DEFAULT_INCLUDE), exclude=[])
    # null: the api's value (every key of a watch's request falls back to the api's)
    watch.update(request=None, outputs=None, transcript_name=None)
    api = asdict(ApiConfig())
    api.update(request=dict.fromkeys(REQUEST_KEYS), outputs=list(DEFAULT_OUTPUTS))
    notify = NotifyConfig()
    return {
        "api": api,
        "state_dir": None,
        "log": asdict(LogConfig()),
        "prepare": asdict(PrepareConfig()),
        "metrics": asdict(MetricsConfig()),
        "hooks": asdict(HooksConfig()),
        "webhooks": [],
        "notify": {**asdict(notify), "urls": list(notify.urls), "on": list(notify.on)},
        "workers": 1,
        "watch": [watch],
    }


def find_config_file(
    explicit: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Path:
    """Return the config file to use: ``-c``, $SFWATCH_CONFIG, ./sfwatch.yaml, /etc/...."""
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else cwd
    # A file the user named is never skipped for a fallback: that would run the daemon
    # on a config they did not mean.
    named = ((explicit, ""), (env.get("SFWATCH_CONFIG") or None, " (from $SFWATCH_CONFIG)"))
    for given, origin in named:
        if given is None:
            continue
        path = cwd / Path(given)
        if not path.exists():
            raise ConfigError("", f"config file {path}{origin} does not exist")
        if not path.is_file():
            raise ConfigError("", f"config file {path}{origin} is not a file")
        return path
    tried = [cwd / "sfwatch.yaml", SYSTEM_CONFIG]
    for path in tried:
        if path.is_file():
            return path
    raise ConfigError(
        "", f"no config file: tried {', '.join(map(str, tried))}; use -c FILE or $SFWATCH_CONFIG"
    )


class _StrictLoader(yaml.SafeLoader):
    """safe_load's loader, but a repeated key is an error instead of "last one wins"."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        # Merge keys (<<) may legitimately be overridden, so only plain scalars count.
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            key = loader.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_config(path: Path, env: Mapping[str, str] | None = None) -> Config:
    """Read, parse and check the config file at *path*."""
    path = Path(path).absolute()
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        # Reading starts in the constructor, so it too may raise (bytes that are not UTF-8).
        loader = _StrictLoader(text)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        # PyYAML splits its message: "while parsing a flow sequence" + "expected ','".
        problem = ", ".join(part for part in (exc.context, exc.problem) if part)
        where = f" at line {exc.problem_mark.line + 1}" if exc.problem_mark else ""
        raise ConfigError("", f"{path}: invalid YAML: {problem}{where}") from exc
    except yaml.YAMLError as exc:  # e.g. bytes that are not UTF-8: no line to name
        raise ConfigError("", f"{path}: invalid YAML: {' '.join(str(exc).split())}") from exc
    if data is None:
        raise ConfigError("", f"{path}: config file is empty")
    # The folder the user sees the file in (not a symlink's target) anchors relative paths.
    return parse_config(data, path.parent, env, source=path)


def parse_config(
    data: object,
    base_dir: Path,
    env: Mapping[str, str] | None = None,
    source: Path | None = None,
) -> Config:
    """Check the loaded YAML *data* and build a :class:`Config`."""
    env = os.environ if env is None else env
    base_dir = Path(base_dir).absolute()
    if data is None:
        raise ConfigError("", "config file is empty")
    if not isinstance(data, dict):
        raise ConfigError("", f"the config must be a mapping of keys to values, got {show(data)}")
    top = Section(data, "", TOP_KEYS)
    api = _parse_api(top.data.get("api"), base_dir)
    state_dir = top.optional_path("state_dir", base_dir)
    explicit_state = state_dir is not None
    state_dir = state_dir or default_state_dir(env)
    log = _parse_log(top.data.get("log"))
    watches = _parse_watches(top.data.get("watch"), base_dir, api)
    check_state_dir(state_dir, watches, explicit=explicit_state)
    return Config(
        api=api,
        state_dir=state_dir,
        log=log,
        watch=watches,
        source=source,
        prepare=_parse_prepare(top.data.get("prepare")),
        metrics=parse_metrics(top.data.get("metrics")),
        hooks=parse_hooks(top.data.get("hooks"), base_dir),
        webhooks=parse_webhooks(top.data.get("webhooks"), base_dir),
        notify=parse_notify(top.data.get("notify")),
        workers=_parse_workers(top, api),
    )


def config_warnings(config: Config) -> list[str]:
    """What is allowed but probably a mistake, each as ``key.path: why``.

    ``check`` prints these on stderr and ``run`` logs them; neither refuses to go on.
    """
    warnings: list[str] = []
    parts = urlsplit(config.api.base_url)
    if parts.scheme == "http" and not _is_loopback(parts.hostname or ""):
        warnings.append(
            f"api.base_url: plain http:// to {parts.hostname}, which is not this machine: "
            "the API key and every recording cross the network unencrypted; use https://"
        )
    if config.metrics.listen is not None and not _is_loopback(config.metrics.listen[0]):
        shown = listen_address(*config.metrics.listen)
        warnings.append(
            f"metrics.listen: {shown} is not a loopback address: anyone who can reach this "
            "host on that port can read the metrics and health (counts and states, never "
            "file names or the key); firewall it, or listen on 127.0.0.1"
        )
    warnings.extend(_prompt_warnings(config))
    for index, hook in enumerate(config.webhooks):
        parts = urlsplit(hook.url)
        if parts.scheme == "http" and not _is_loopback(parts.hostname or ""):
            warnings.append(
                f"webhooks[{index}].url: plain http:// to {parts.hostname}, which is not this "
                "machine: transcripts cross the network unencrypted; use https://"
            )
    return warnings


def _prompt_warnings(config: Config) -> list[str]:
    """A prompt longer than Groq takes: said once per key that set it."""
    said: dict[str, str] = {}
    for watch in config.watch:
        prompt = watch.request.prompt
        key = watch.request.origin("prompt")
        if prompt is not None and len(prompt) > PROMPT_WARN_CHARS and key not in said:
            said[key] = (
                f"{key}: the prompt is {len(prompt)} characters; Groq refuses prompts over "
                f"{PROMPT_WARN_CHARS} (a 400) and OpenAI reads only its last 224 tokens"
            )
    return list(said.values())


def _is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (also as an IPv4-mapped IPv6 address)."""
    host = host.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def default_state_dir(env: Mapping[str, str]) -> Path:
    """$STATE_DIRECTORY (systemd's StateDirectory=), else the XDG state dir."""
    if state := env.get("STATE_DIRECTORY"):
        # systemd joins several StateDirectory= entries with ':'; ours is the first.
        return Path(state.split(":")[0]).resolve(strict=False)
    xdg = env.get("XDG_STATE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec says to ignore relative values
        return Path(xdg) / "sfwatch"
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return home / ".local" / "state" / "sfwatch"


def _parse_api(data: object, base_dir: Path) -> ApiConfig:
    api = Section(data, "api", _API_KEYS)
    base_url = api.string("base_url", DEFAULT_BASE_URL).rstrip("/")
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            api.key("base_url"), f"must be an http(s) URL, got {shown_url(base_url)!r}"
        )
    return ApiConfig(
        request=parse_request(api.data.get("request"), api.key("request"), base_dir),
        outputs=parse_outputs(api) or DEFAULT_OUTPUTS,
        transcript_name=parse_transcript_name(api) or DEFAULT_TRANSCRIPT_NAME,
        base_url=base_url,
        model=api.string("model", DEFAULT_MODEL),
        api_key_file=api.optional_path("api_key_file", base_dir),
        concurrency=api.integer("concurrency", 4, 1, MAX_CONCURRENCY),
        timeout_seconds=api.positive("timeout_seconds", 600.0),
        max_attempts=api.integer("max_attempts", 8, 1),
        requests_per_minute=api.optional_positive("requests_per_minute"),
        max_upload_bytes=api.integer("max_upload_bytes", 50_000_000, 1024),
        max_audio_seconds=api.positive("max_audio_seconds", 3600.0),
    )


def _parse_workers(top: Section, api: ApiConfig) -> int:
    """``workers``: 1 to ``MAX_WORKERS`` processes, or ``auto`` (one per CPU we may use).

    They share ``api.concurrency`` (each takes at least one upload), so ``auto`` takes
    no more of them than that.
    """
    value = top.data.get("workers")
    if value == "auto":
        return max(1, min(MAX_WORKERS, api.concurrency, len(os.sched_getaffinity(0))))
    if isinstance(value, str):
        raise ConfigError("workers", f"must be an integer or auto, got {show(value)}")
    workers = top.integer("workers", 1, 1, MAX_WORKERS)
    if workers > api.concurrency:
        raise ConfigError(
            "workers",
            f"{workers} workers need at least one upload each: "
            f"api.concurrency is {api.concurrency}",
        )
    return workers


def _parse_prepare(data: object) -> PrepareConfig:
    prepare = Section(data, "prepare", ("transcode",))
    return PrepareConfig(transcode=prepare.choice("transcode", "auto", TRANSCODE_MODES))


def _parse_log(data: object) -> LogConfig:
    log = Section(data, "log", ("format", "level"))
    return LogConfig(
        format=log.choice("format", "auto", LOG_FORMATS),
        level=log.choice("level", "info", LOG_LEVELS),
    )


def _parse_watches(data: object, base_dir: Path, api: ApiConfig) -> tuple[WatchConfig, ...]:
    if data is None:
        raise ConfigError("watch", "required: list at least one folder to watch")
    if not isinstance(data, list):
        raise ConfigError("watch", f"must be a list of folders, got {show(data)}")
    if not data:
        raise ConfigError("watch", "must list at least one folder to watch")
    watches: list[WatchConfig] = []
    for index, entry in enumerate(data):
        where = f"watch[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(where, f"must be a mapping with a 'path' key, got {show(entry)}")
        watch = _parse_watch(Section(entry, where, _WATCH_KEYS), base_dir, api)
        # Nested watches would see each other's files, done/ and work areas twice over.
        for earlier_index, earlier in enumerate(watches):
            other = f"watch[{earlier_index}].path"
            if watch.path == earlier.path:
                raise ConfigError(f"{where}.path", f"same folder as {other} ({earlier.path})")
            if watch.path.is_relative_to(earlier.path):
                raise ConfigError(f"{where}.path", f"is inside {other} ({earlier.path})")
            if earlier.path.is_relative_to(watch.path):
                raise ConfigError(f"{where}.path", f"contains {other} ({earlier.path})")
        watches.append(watch)
    check_folders(watches)
    return tuple(watches)


def _parse_watch(watch: Section, base_dir: Path, api: ApiConfig) -> WatchConfig:
    path = watch.optional_path("path", base_dir)
    if path is None:
        raise ConfigError(watch.key("path"), "required: the folder to watch")
    try:
        # A missing folder is fine (the daemon creates it); a file in its place is not.
        if path.exists() and not path.is_dir():
            raise ConfigError(watch.key("path"), f"{path} is not a directory")
    except OSError:
        pass  # cannot look (permissions): the daemon reports it when it starts watching
    poll = watch.data.get("poll")
    if isinstance(poll, str) and poll.lower() == "auto":
        poll = None
    if poll is not None and not isinstance(poll, bool):
        raise ConfigError(watch.key("poll"), f"must be true, false or auto, got {show(poll)}")
    done_dir = watch.optional_path("done_dir", base_dir) or path / "done"
    failed_dir = watch.optional_path("failed_dir", base_dir) or path / "failed"
    # Moving originals into the inbox itself would feed them straight back in.
    for name, folder in (("done_dir", done_dir), ("failed_dir", failed_dir)):
        if folder == path:
            raise ConfigError(watch.key(name), "must not be the watched folder itself")
    if failed_dir == done_dir:
        raise ConfigError(watch.key("failed_dir"), "must differ from done_dir")
    return WatchConfig(
        path=path,
        recursive=watch.boolean("recursive", True),
        settle_seconds=watch.positive("settle_seconds", 3.0),
        poll=poll,
        done_dir=done_dir,
        failed_dir=failed_dir,
        transcript_dir=watch.optional_path("transcript_dir", base_dir),
        model=watch.optional_string("model"),
        include=watch.patterns("include", DEFAULT_INCLUDE, empty_ok=False),
        exclude=watch.patterns("exclude", (), empty_ok=True),
        rescan_seconds=watch.positive("rescan_seconds", 60.0),
        on_done=watch.argv("on_done", base_dir),
        on_failed=watch.argv("on_failed", base_dir),
        **_watch_outputs(watch, base_dir, api),
    )


def _watch_outputs(watch: Section, base_dir: Path, api: ApiConfig) -> dict[str, Any]:
    """A watch's request, outputs and transcript_name, each key over the api's."""
    own = parse_request(watch.data.get("request"), watch.key("request"), base_dir)
    outputs = parse_outputs(watch)
    outputs_key = watch.key("outputs") if outputs is not None else "api.outputs"
    request = build_request(merge_request(api.request, own), outputs_key)
    outputs = outputs if outputs is not None else api.outputs
    check_answer_fits(request, outputs, outputs_key)
    name = parse_transcript_name(watch)
    return {
        "request": request,
        "outputs": outputs,
        "transcript_name": name if name is not None else api.transcript_name,
    }


def load_api_key(config: Config, env: Mapping[str, str] | None = None) -> Secret:
    """Find the API key: $SILICONFLOW_API_KEY, api.api_key_file, then systemd's credential."""
    env = os.environ if env is None else env
    if key := env.get("SILICONFLOW_API_KEY", "").strip():
        return _checked(key, "$SILICONFLOW_API_KEY")
    files: list[tuple[Path, bool]] = []
    if config.api.api_key_file is not None:
        files.append((config.api.api_key_file, True))
    if env.get("CREDENTIALS_DIRECTORY"):
        files.append((Path(env["CREDENTIALS_DIRECTORY"]) / "api_key", False))
    for path, configured in files:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) and not configured:
                continue  # a credential that was not passed in is simply absent
            # "from None": the OSError adds nothing, and key material never rides along.
            raise ConfigError("api.api_key_file", f"cannot read {path}: {exc.strerror}") from None
        try:
            key = raw.decode().strip()
        except UnicodeDecodeError:
            # The codec's own message quotes the offending byte: part of the key.
            raise ConfigError("api.api_key_file", f"cannot read {path}: not UTF-8 text") from None
        if key:
            return _checked(key, "api.api_key_file")
    raise ConfigError("api.api_key_file", NO_KEY_MESSAGE)


def _checked(key: str, origin: str) -> Secret:
    # An HTTP library rejecting a bad header value quotes the value in its exception,
    # which would print the key; refuse such a key here, without quoting it.
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise ConfigError(origin, "the API key contains spaces, control or non-ASCII characters")
    return Secret(key)


# Also what moved to config_extras.py and config_section.py, so callers import it from here.
__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_INCLUDE",
    "DEFAULT_MODEL",
    "EVENTS",
    "HOOK_PATH",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MAX_CONCURRENCY",
    "NO_KEY_MESSAGE",
    "SYSTEM_CONFIG",
    "TRANSCODE_MODES",
    "ApiConfig",
    "Config",
    "HooksConfig",
    "LogConfig",
    "MetricsConfig",
    "NotifyConfig",
    "PrepareConfig",
    "RequestConfig",
    "Secret",
    "UploadRequest",
    "WatchConfig",
    "WebhookConfig",
    "config_warnings",
    "default_config_dict",
    "default_state_dir",
    "find_config_file",
    "listen_address",
    "load_api_key",
    "load_config",
    "parse_config",
    "parse_listen",
    "shown_url",
]
