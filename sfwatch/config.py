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

import difflib
import hmac
import ipaddress
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

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
SYSTEM_CONFIG = Path("/etc/sfwatch/config.yaml")
#: what hooks, webhooks and notifications are told about (docs/design.md §13)
EVENTS = ("done", "failed", "paused", "resumed")
#: a hook's PATH: its environment is built from scratch, never inherited (§13)
HOOK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
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

    def __post_init__(self) -> None:
        # Lets tests and callers write WatchConfig(path=...) and get docs/design.md §3.
        if self.done_dir == _DERIVED:
            object.__setattr__(self, "done_dir", self.path / "done")
        if self.failed_dir == _DERIVED:
            object.__setattr__(self, "failed_dir", self.path / "failed")

    @property
    def work_dir(self) -> Path:
        """The claim area; inside ``path`` so that claiming is a same-filesystem rename."""
        return self.path / ".sfwatch"


@dataclass(frozen=True)
class MetricsConfig:
    """The optional HTTP listener for ``/metrics``, ``/healthz`` and ``/readyz``."""

    #: (IP address, port) to listen on; None: no listener (the default)
    listen: tuple[str, int] | None = None


@dataclass(frozen=True)
class HooksConfig:
    """Commands run for each finished file (docs/design.md §13); watches may override them."""

    on_done: tuple[str, ...] | None = None
    on_failed: tuple[str, ...] | None = None
    timeout_seconds: float = 60.0
    concurrency: int = 2
    max_attempts: int = 8

    def for_watch(self, watch: WatchConfig, event: str) -> tuple[str, ...]:
        """The argv of ``event``'s hook for ``watch``'s files; () when there is none."""
        own = watch.on_done if event == "done" else watch.on_failed
        default = self.on_done if event == "done" else self.on_failed
        chosen = own if own is not None else default
        return chosen or ()


@dataclass(frozen=True)
class WebhookConfig:
    """One receiver of JSON POSTs, signed Standard-Webhooks style when it has a secret."""

    url: str
    events: tuple[str, ...] = EVENTS
    secret_file: Path | None = None
    timeout_seconds: float = 10.0
    max_attempts: int = 12
    max_text_bytes: int = 262_144


@dataclass(frozen=True)
class NotifyConfig:
    """Messages to people through Apprise (``sfwatch[notify]``), gathered and rate-limited."""

    urls: tuple[str, ...] = ()
    on: tuple[str, ...] = ("failed", "paused")
    gather_seconds: float = 10.0
    min_interval_seconds: float = 60.0


@dataclass(frozen=True)
class Config:
    """The whole validated config file."""

    api: ApiConfig
    state_dir: Path
    log: LogConfig
    watch: tuple[WatchConfig, ...]
    source: Path | None = None
    prepare: PrepareConfig = PrepareConfig()
    metrics: MetricsConfig = MetricsConfig()
    hooks: HooksConfig = HooksConfig()
    webhooks: tuple[WebhookConfig, ...] = ()
    notify: NotifyConfig = NotifyConfig()


# The YAML keys are the dataclasses' field names, so a new field is a new key.
_API_KEYS = tuple(f.name for f in fields(ApiConfig))
_WATCH_KEYS = tuple(f.name for f in fields(WatchConfig))
_HOOKS_KEYS = tuple(f.name for f in fields(HooksConfig))
_WEBHOOK_KEYS = tuple(f.name for f in fields(WebhookConfig))
_NOTIFY_KEYS = tuple(f.name for f in fields(NotifyConfig))


def default_config_dict() -> dict[str, Any]:
    """Every key with its default, watching ``./inbox``; the example config mirrors it."""
    watch = asdict(WatchConfig(path=Path("inbox")))
    watch.update(path="./inbox", poll="auto", done_dir=None, failed_dir=None)
    watch.update(include=list(DEFAULT_INCLUDE), exclude=[])
    notify = NotifyConfig()
    return {
        "api": asdict(ApiConfig()),
        "state_dir": None,
        "log": asdict(LogConfig()),
        "prepare": asdict(PrepareConfig()),
        "metrics": asdict(MetricsConfig()),
        "hooks": asdict(HooksConfig()),
        "webhooks": [],
        "notify": {**asdict(notify), "urls": list(notify.urls), "on": list(notify.on)},
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


def _show(value: object) -> str:
    """Describe a wrong value briefly for a message (a list could be huge)."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Section:
    """One mapping of the config plus its key path, so every error names the key."""

    def __init__(self, data: object, where: str, known: tuple[str, ...]) -> None:
        if data is None:  # "api:" with every child commented out
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(where, f"must be a mapping, got {_show(data)}")
        for name in data:
            if name not in known:
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(self._key(where, str(name)), f"unknown key{hint}")
        self.data: dict[str, object] = data
        self.where = where

    @staticmethod
    def _key(where: str, name: str) -> str:
        return f"{where}.{name}" if where else name

    def key(self, name: str) -> str:
        return self._key(self.where, name)

    def optional_string(self, name: str) -> str | None:
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigError(self.key(name), f"must be a string, got {_show(value)}")
        if not value.strip():
            raise ConfigError(self.key(name), "must not be empty")
        return value.strip()

    def string(self, name: str, default: str) -> str:
        value = self.optional_string(name)
        return default if value is None else value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.string(name, default).lower()
        if value not in choices:
            wanted = ", ".join(choices)
            raise ConfigError(self.key(name), f"must be one of {wanted}; got {self.data[name]!r}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(self.key(name), f"must be true or false, got {_show(value)}")
        return value

    def integer(self, name: str, default: int, low: int, high: int | None = None) -> int:
        value = self.data.get(name)
        if value is None:
            return default
        # bool is an int subclass, but "concurrency: yes" is surely a mistake.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.key(name), f"must be an integer, got {_show(value)}")
        if high is not None and not low <= value <= high:
            raise ConfigError(self.key(name), f"must be between {low} and {high}")
        if value < low:
            raise ConfigError(self.key(name), f"must be >= {low}")
        return value

    def optional_positive(self, name: str) -> float | None:
        """A positive, finite number (YAML ints are fine), or None when unset."""
        value = self.data.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(self.key(name), f"must be a number, got {_show(value)}")
        if math.isinf(value):  # .inf would mean "never settle" or "wait forever"
            raise ConfigError(self.key(name), "must be a finite number")
        if not value > 0:  # also rejects .nan
            raise ConfigError(self.key(name), "must be > 0")
        return float(value)

    def positive(self, name: str, default: float) -> float:
        value = self.optional_positive(name)
        return default if value is None else value

    def optional_path(self, name: str, base: Path) -> Path | None:
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(self.key(name), f"must be a path, got {_show(value)}")
        if "\0" in value:
            raise ConfigError(self.key(name), "must not contain a NUL character")
        try:
            return (base / Path(value.strip()).expanduser()).resolve(strict=False)
        except RuntimeError:  # "~someone/..." for a user this system does not know
            raise ConfigError(self.key(name), f"no home directory for {value!r}") from None

    def patterns(self, name: str, default: tuple[str, ...], *, empty_ok: bool) -> tuple[str, ...]:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, list):
            raise ConfigError(self.key(name), f"must be a list of patterns, got {_show(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise ConfigError(
                    f"{self.key(name)}[{index}]", f"must be a pattern, got {_show(item)}"
                )
        if not value and not empty_ok:
            raise ConfigError(self.key(name), "must list at least one pattern")
        return tuple(value)

    def argv(self, name: str, base: Path) -> tuple[str, ...] | None:
        """A command as an argv list (never a shell string); its program must exist.

        A program with a ``/`` is a path (relative to the config's folder), any other
        is looked up in ``HOOK_PATH``, the PATH hooks run with. The result names the
        program by its absolute path. ``[]`` is "no command"; None is "not set".
        """
        value = self.data.get(name)
        if value is None:
            return None
        key = self.key(name)
        if isinstance(value, str):
            raise ConfigError(
                key,
                "must be a list of arguments, e.g. [/usr/local/bin/notes-hook, --quiet]; "
                "nothing runs through a shell unless you write [sh, -c, '...']",
            )
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list of arguments, got {_show(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, str) or (index == 0 and not item.strip()):
                raise ConfigError(f"{key}[{index}]", f"must be a string, got {_show(item)}")
            if "\0" in item:
                raise ConfigError(f"{key}[{index}]", "must not contain a NUL character")
        if not value:
            return ()
        program = value[0].strip()
        if "/" in program:
            # Not resolved: a link (/opt/tool/current/hook) is followed at each run.
            path = Path(os.path.normpath(base / Path(program).expanduser()))
            if not (path.is_file() and os.access(path, os.X_OK)):
                raise ConfigError(f"{key}[0]", f"{path} is not an executable file")
            return (str(path), *value[1:])
        found = shutil.which(program, path=HOOK_PATH)
        if found is None:
            raise ConfigError(
                f"{key}[0]", f"{program!r} is not found in the hooks' PATH ({HOOK_PATH})"
            )
        return (found, *value[1:])

    def events(
        self, name: str, default: tuple[str, ...], allowed: tuple[str, ...]
    ) -> tuple[str, ...]:
        """A list of event names, each one of ``allowed``, at least one, no repeats."""
        value = self.data.get(name)
        if value is None:
            return default
        key = self.key(name)
        if not isinstance(value, list) or not value:
            raise ConfigError(key, f"must list events out of {', '.join(allowed)}")
        for index, item in enumerate(value):
            if item not in allowed:
                raise ConfigError(
                    f"{key}[{index}]", f"must be one of {', '.join(allowed)}; got {_show(item)}"
                )
        if len(set(value)) != len(value):
            raise ConfigError(key, "names an event twice")
        return tuple(value)


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
        raise ConfigError("", f"the config must be a mapping of keys to values, got {_show(data)}")
    top = _Section(
        data,
        "",
        ("api", "state_dir", "log", "prepare", "metrics", "hooks", "webhooks", "notify", "watch"),
    )
    api = _parse_api(top.data.get("api"), base_dir)
    state_dir = top.optional_path("state_dir", base_dir)
    explicit_state = state_dir is not None
    state_dir = state_dir or default_state_dir(env)
    log = _parse_log(top.data.get("log"))
    watches = _parse_watches(top.data.get("watch"), base_dir)
    _check_state_dir(state_dir, watches, explicit=explicit_state)
    return Config(
        api=api,
        state_dir=state_dir,
        log=log,
        watch=watches,
        source=source,
        prepare=_parse_prepare(top.data.get("prepare")),
        metrics=_parse_metrics(top.data.get("metrics")),
        hooks=_parse_hooks(top.data.get("hooks"), base_dir),
        webhooks=_parse_webhooks(top.data.get("webhooks"), base_dir),
        notify=_parse_notify(top.data.get("notify")),
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
    for index, hook in enumerate(config.webhooks):
        parts = urlsplit(hook.url)
        if parts.scheme == "http" and not _is_loopback(parts.hostname or ""):
            warnings.append(
                f"webhooks[{index}].url: plain http:// to {parts.hostname}, which is not this "
                "machine: transcripts cross the network unencrypted; use https://"
            )
    return warnings


def listen_address(host: str, port: int) -> str:
    """``host:port`` as written in the config (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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


def shown_url(url: str) -> str:
    """``url`` fit to print: without the ``user:password@`` it may carry."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _parse_api(data: object, base_dir: Path) -> ApiConfig:
    api = _Section(data, "api", _API_KEYS)
    base_url = api.string("base_url", DEFAULT_BASE_URL).rstrip("/")
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            api.key("base_url"), f"must be an http(s) URL, got {shown_url(base_url)!r}"
        )
    return ApiConfig(
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


def _parse_prepare(data: object) -> PrepareConfig:
    prepare = _Section(data, "prepare", ("transcode",))
    return PrepareConfig(transcode=prepare.choice("transcode", "auto", TRANSCODE_MODES))


def _parse_metrics(data: object) -> MetricsConfig:
    metrics = _Section(data, "metrics", ("listen",))
    value = metrics.data.get("listen")
    if value is None:
        return MetricsConfig()
    return MetricsConfig(listen=parse_listen(value, metrics.key("listen")))


_LISTEN_EXAMPLE = (
    "HOST:PORT with HOST an IP address or localhost, e.g. 127.0.0.1:9790 or [::1]:9790"
)


def parse_listen(value: object, key: str) -> tuple[str, int]:
    """``"127.0.0.1:9790"``, ``"[::1]:9790"`` or ``"localhost:9790"`` as (address, port).

    The host must be an IP address (``localhost`` is 127.0.0.1): a name would
    depend on DNS when the daemon starts. Port 0 takes any free port (the one
    taken is logged).
    """
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f"must be {_LISTEN_EXAMPLE}; got {_show(value)}")
    text = value.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ConfigError(key, f"must be [IPv6]:PORT, e.g. [::1]:9790; got {text!r}")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ConfigError(key, f"must be {_LISTEN_EXAMPLE}; got {text!r}")
        if ":" in host:
            raise ConfigError(
                key, f"an IPv6 address goes in brackets, e.g. [::1]:9790; got {text!r}"
            )
    if host.lower() == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            key, f"{host!r} is not an IP address; must be {_LISTEN_EXAMPLE}"
        ) from None
    if not port_text.isascii() or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(key, f"the port must be a number from 0 to 65535; got {port_text!r}")
    return str(address), int(port_text)


def _parse_hooks(data: object, base_dir: Path) -> HooksConfig:
    hooks = _Section(data, "hooks", _HOOKS_KEYS)
    return HooksConfig(
        on_done=hooks.argv("on_done", base_dir) or None,
        on_failed=hooks.argv("on_failed", base_dir) or None,
        timeout_seconds=hooks.positive("timeout_seconds", 60.0),
        concurrency=hooks.integer("concurrency", 2, 1, 64),
        max_attempts=hooks.integer("max_attempts", 8, 1),
    )


def _parse_webhooks(data: object, base_dir: Path) -> tuple[WebhookConfig, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ConfigError("webhooks", f"must be a list of receivers, got {_show(data)}")
    found: list[WebhookConfig] = []
    for index, entry in enumerate(data):
        where = f"webhooks[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(where, f"must be a mapping with a 'url' key, got {_show(entry)}")
        hook = _Section(entry, where, _WEBHOOK_KEYS)
        url = hook.optional_string("url")
        if url is None:
            raise ConfigError(hook.key("url"), "required: where to POST the events")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(hook.key("url"), f"must be an http(s) URL, got {shown_url(url)!r}")
        for earlier_index, earlier in enumerate(found):
            if earlier.url == url:
                raise ConfigError(hook.key("url"), f"same URL as webhooks[{earlier_index}].url")
        found.append(
            WebhookConfig(
                url=url,
                events=hook.events("events", EVENTS, EVENTS),
                secret_file=hook.optional_path("secret_file", base_dir),
                timeout_seconds=hook.positive("timeout_seconds", 10.0),
                max_attempts=hook.integer("max_attempts", 12, 1),
                max_text_bytes=hook.integer("max_text_bytes", 262_144, 0),
            )
        )
    return tuple(found)


def _parse_notify(data: object) -> NotifyConfig:
    if isinstance(data, dict) and True in data:
        # YAML 1.1 (PyYAML) reads a bare `on:` as the boolean true: it means the key "on".
        if "on" in data:
            raise ConfigError("notify.on", "given twice")
        data = {("on" if name is True else name): value for name, value in data.items()}
    notify = _Section(data, "notify", _NOTIFY_KEYS)
    urls = notify.data.get("urls")
    if urls is None:
        urls = []
    if not isinstance(urls, list):
        raise ConfigError(notify.key("urls"), f"must be a list of Apprise URLs, got {_show(urls)}")
    for index, url in enumerate(urls):
        # (The URL itself is never shown: an Apprise URL carries its service's token.)
        if not isinstance(url, str) or "://" not in url:
            raise ConfigError(
                f"{notify.key('urls')}[{index}]", "must be an Apprise URL such as ntfy://topic"
            )
    return NotifyConfig(
        urls=tuple(u.strip() for u in urls),
        on=notify.events("on", NotifyConfig.on, EVENTS),
        gather_seconds=notify.positive("gather_seconds", 10.0),
        min_interval_seconds=notify.positive("min_interval_seconds", 60.0),
    )


def _parse_log(data: object) -> LogConfig:
    log = _Section(data, "log", ("format", "level"))
    return LogConfig(
        format=log.choice("format", "auto", LOG_FORMATS),
        level=log.choice("level", "info", LOG_LEVELS),
    )


def _parse_watches(data: object, base_dir: Path) -> tuple[WatchConfig, ...]:
    if data is None:
        raise ConfigError("watch", "required: list at least one folder to watch")
    if not isinstance(data, list):
        raise ConfigError("watch", f"must be a list of folders, got {_show(data)}")
    if not data:
        raise ConfigError("watch", "must list at least one folder to watch")
    watches: list[WatchConfig] = []
    for index, entry in enumerate(data):
        where = f"watch[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(where, f"must be a mapping with a 'path' key, got {_show(entry)}")
        watch = _parse_watch(_Section(entry, where, _WATCH_KEYS), base_dir)
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
    _check_folders(watches)
    return tuple(watches)


def _check_folders(watches: list[WatchConfig]) -> None:
    """Where originals and transcripts go must not feed a watch or hide one (§9).

    Rules, for every watch W and every watch V (W itself included):
    W's done_dir and failed_dir neither are nor contain V's path (a file moved
    there would be taken again, or every file of V would count as done and be
    ignored), and lie inside V's path only where V never looks (V's own done/,
    failed/, an ``exclude``d or ignored folder name, or V not recursive); no
    folder lies in V's work area (``.sfwatch/``); transcript_dir is not V's path;
    failed_dirs do not overlap each other or any done_dir (``retry`` must know
    which inbox a failed file goes back to). done_dirs may be shared.
    """
    for index, watch in enumerate(watches):
        where = f"watch[{index}]"
        for name in ("done_dir", "failed_dir", "transcript_dir"):
            folder: Path | None = getattr(watch, name)
            if folder is not None:
                _check_one_folder(f"{where}.{name}", folder, index, watches)
        if watch.failed_dir.is_relative_to(watch.done_dir):
            raise ConfigError(
                f"{where}.failed_dir", f"must not be inside done_dir ({watch.done_dir})"
            )
        if watch.done_dir.is_relative_to(watch.failed_dir):
            raise ConfigError(
                f"{where}.done_dir", f"must not be inside failed_dir ({watch.failed_dir})"
            )
    # Pairs within one watch were checked by _parse_watch, with their own messages.
    moved = [
        (index, f"watch[{index}].{name}", getattr(watch, name))
        for index, watch in enumerate(watches)
        for name in ("done_dir", "failed_dir")
    ]
    for later, (index, key, folder) in enumerate(moved):
        for other_index, other_key, other in moved[:later]:
            if other_index == index or not (
                key.endswith(".failed_dir") or other_key.endswith(".failed_dir")
            ):
                continue  # done_dirs may be shared
            if folder == other:
                raise ConfigError(key, f"same folder as {other_key} ({other})")
            if folder.is_relative_to(other):
                raise ConfigError(key, f"is inside {other_key} ({other})")
            if other.is_relative_to(folder):
                raise ConfigError(key, f"contains {other_key} ({other})")


def _check_one_folder(key: str, folder: Path, index: int, watches: list[WatchConfig]) -> None:
    """One watch's done_dir, failed_dir or transcript_dir against every watched path."""
    from sfwatch.watch import never_looks_into  # noqa: PLC0415 - watch imports this module

    moved_here = not key.endswith(".transcript_dir")
    for other_index, other in enumerate(watches):
        path_key = f"watch[{other_index}].path"
        if folder == other.path:
            if other_index == index:
                raise ConfigError(key, "must not be the watched folder itself")
            raise ConfigError(key, f"must not be a watched folder: {path_key} ({other.path})")
        if folder.is_relative_to(other.work_dir):
            raise ConfigError(
                key, f"must not be inside the daemon's work area {other.work_dir} ({path_key})"
            )
        if not moved_here:
            continue  # transcripts (*.txt) are not audio: beside or under an inbox is fine
        if other.path.is_relative_to(folder):
            why = (
                "the daemon never looks into it, so every file there would be ignored"
                if other_index == index
                else "files moved here could land in it and be taken again"
            )
            raise ConfigError(
                key, f"must not contain a watched folder: {path_key} ({other.path}); {why}"
            )
        if (
            other_index != index
            and folder.is_relative_to(other.path)
            and not never_looks_into(folder, other)
        ):
            raise ConfigError(
                key,
                f"is inside {path_key} ({other.path}), which would take every file moved "
                f"here as a new one; move it out, or add {folder.name!r} to "
                f"watch[{other_index}].exclude",
            )


def _check_state_dir(state_dir: Path, watches: tuple[WatchConfig, ...], *, explicit: bool) -> None:
    """The ledger is the daemon's alone: never inside a folder others write to."""
    for index, watch in enumerate(watches):
        if state_dir == watch.path or state_dir.is_relative_to(watch.path):
            origin = "" if explicit else " (the default; set state_dir)"
            raise ConfigError(
                "state_dir",
                f"{state_dir}{origin} must not be inside a watched folder: "
                f"watch[{index}].path ({watch.path}); whoever may write there could "
                "reach the ledger",
            )


def _parse_watch(watch: _Section, base_dir: Path) -> WatchConfig:
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
        raise ConfigError(watch.key("poll"), f"must be true, false or auto, got {_show(poll)}")
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
    )


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
