"""One typed Settings object: defaults < TOML file < EDGECOW_* environment < command-line flags.

    settings = load_settings(config_file=Path("edgecow.toml"), overrides={"listen": "127.0.0.1:9000"})
    settings.model_repository, settings.listen, settings.max_inflight_per_model
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shm_client.shared.errors import InvalidArgument

ENV_PREFIX = "EDGECOW_"
EXAMPLES = Path(__file__).parent / "examples" / "models"


class ConfigError(InvalidArgument):
    """A setting or configuration file that cannot be used; the message names the file or variable."""


def default_socket_path() -> Path:
    """/run/edgecow/edgecow.sock when that directory is writable, else $XDG_RUNTIME_DIR, else /tmp."""
    system = Path("/run/edgecow")
    if system.is_dir() and os.access(system, os.W_OK):
        return system / "edgecow.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.access(runtime, os.W_OK):
        return Path(runtime) / "edgecow.sock"
    return Path(f"/tmp/edgecow-{os.getuid()}") / "edgecow.sock"


@dataclass
class Settings:
    """Everything the server can be told; each field is a flag, an EDGECOW_ variable and a TOML key."""

    model_repository: Path = EXAMPLES
    models: list[str] = field(default_factory=list)  # load only these; empty = every model
    socket: Path | None = None  # None = default_socket_path(); "none" in a file/env/flag disables it
    listen: str = "0.0.0.0:8001"  # "none" disables TCP
    metrics_listen: str = "127.0.0.1:8002"  # Prometheus metrics over HTTP; "none" disables them
    tls_cert: Path | None = None
    tls_key: Path | None = None
    log_level: str = "info"
    poll_interval: float = 0.0  # seconds between repository scans; 0 = never
    grace_period: float = 30.0  # seconds calls in flight get to finish on SIGTERM
    workers: int = 32  # gRPC handler threads
    require_gpu: bool = False
    providers: list[str] = field(default_factory=lambda: ["auto"])
    intra_op_threads: int = 0  # 0 = onnxruntime's choice
    # onnxruntime's intra-op workers busy-wait after each run for the next one; a daemon shared by the box's
    # processes must not burn their CPU between calls, so they sleep unless this is set.
    intra_op_spinning: bool = False
    # Limits.
    max_request_bytes: int = 2**31 - 1
    max_tensor_bytes: int = 2**31 - 1
    max_elements: int = 2**31 - 1
    max_inflight_per_model: int = 8
    max_queue_per_model: int = 64
    # Shared memory.
    shm_enabled: bool = True
    local_lane: bool = True  # ModelInfer on a plain unix socket beside the gRPC one, for shm callers
    shm_allow_remote: bool = False
    # Who may use shared memory and repository control. "unix": callers on the socket, whose mode (0660,
    # the edgecow group) is how the server knows their rights. "loopback" would extend that to ANY local
    # user who can reach 127.0.0.1, acting with the server's rights; opt in only where all are trusted.
    local_peers: list[str] = field(default_factory=lambda: ["unix"])
    shm_max_regions: int = 1024
    shm_max_mapped_bytes: int = 32 * 2**30
    shm_reap_interval: float = 2.0
    # Transports. A stream holds a gRPC worker while it is open: the stream bounds keep workers free for
    # unary calls and health checks.
    max_streams: int = 0  # ModelStreamInfer streams open at once; 0 = half the workers
    max_streams_per_peer: int = 0  # streams one peer address may hold (unix callers count as one); 0 = half
    lane_max_connections: int = 256  # local-lane connections; more are closed and those callers use gRPC
    lane_read_timeout: float = 10.0  # seconds a local-lane request may take to arrive once it has begun
    lane_max_buffered_bytes: int = 256 * 2**20  # request bytes all local-lane connections hold at once
    # Where each value that is not a default came from ("flag --listen", "environment variable
    # EDGECOW_LISTEN", "configuration file edgecow.toml"); not a setting itself.
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False, metadata={"setting": False})

    def source(self, name: str) -> str:
        """Where setting `name` came from, for error messages: its flag, variable or file, or "the default"."""
        return self.sources.get(name, "the default")

    def socket_path(self) -> Path | None:
        # "none" is stored as Path(""), which Python turns into Path("."): compare paths, not strings.
        return default_socket_path() if self.socket is None else (None if self.socket == Path("") else self.socket)

    def stream_limits(self) -> tuple[int, int]:
        """(streams in total, streams per peer), with 0 in either setting replaced by its default."""
        total = self.max_streams or self.workers // 2
        per_peer = self.max_streams_per_peer or (max(1, total // 2) if total else 0)
        return total, per_peer


_FIELDS = {f.name: f for f in dataclasses.fields(Settings) if f.metadata.get("setting", True)}
_DISABLED = {"", "none", "off"}

# The settings table: each setting's help, shown by `edgecow serve --help` and in README's table. A field of
# Settings is a setting; its flag, environment variable, TOML key and default follow from its name and value.
HELP = {
    "model_repository": "directory of <name>/<version>/model.onnx",
    "models": "comma-separated models to load (TOML: a list); empty loads every model",
    "socket": "unix socket path; 'none' turns it off",
    "listen": "TCP HOST:PORT; 'none' turns it off; HOST:0 picks a free port",
    "metrics_listen": "HOST:PORT serving Prometheus metrics over HTTP (GET /metrics); 'none' turns it off; "
                      "HOST:0 picks a free port",
    "tls_cert": "PEM certificate for TCP (with tls_key); the unix socket stays plain",
    "tls_key": "PEM private key for TCP (with tls_cert)",
    "log_level": "debug, info, warning, error or critical",
    "poll_interval": "seconds between repository scans for new versions; 0 = never",
    "grace_period": "seconds calls in flight get to finish on SIGTERM",
    "workers": "gRPC handler threads",
    "require_gpu": "fail to start instead of running on CPU when no GPU provider can start",
    "providers": "comma-separated execution providers for models without their own list, or 'auto'",
    "intra_op_threads": "onnxruntime's intra-op threads per model; 0 = its choice",
    "intra_op_spinning": "let onnxruntime's intra-op threads busy-wait between runs (faster back-to-back runs "
                         "of large models; burns CPU the box's other processes need)",
    "max_request_bytes": "largest request message, and the most one request's inputs may take decoded "
                         "(RESOURCE_EXHAUSTED above)",
    "max_tensor_bytes": "largest input tensor; a BYTES element counts its data plus 128 bytes",
    "max_elements": "most elements one input tensor may have",
    "max_inflight_per_model": "calls one model runs at once",
    "max_queue_per_model": "calls that may wait for a model; beyond that RESOURCE_EXHAUSTED",
    "shm_enabled": "shared memory; off makes every client use gRPC",
    "local_lane": "offer shared-memory callers the local lane (ModelInfer on a unix socket beside the gRPC one)",
    "shm_allow_remote": "let non-local peers register shared memory and load/unload models (only behind a "
                        "trusted proxy)",
    "local_peers": "who may use shared memory and repository control: 'unix' (the socket's group), or "
                   "'unix,loopback' (every local user on 127.0.0.1 then acts with the server's rights)",
    "shm_max_regions": "registered shared-memory regions allowed (RESOURCE_EXHAUSTED above)",
    "shm_max_mapped_bytes": "bytes of registered shared memory the server maps at most",
    "shm_reap_interval": "seconds between sweeps that drop regions whose object or owner is gone",
    "max_streams": "ModelStreamInfer streams open at once, below workers; 0 = half the workers",
    "max_streams_per_peer": "streams one peer address may hold (unix callers count as one); 0 = half of "
                            "max_streams",
    "lane_max_connections": "local-lane connections at once; callers beyond it use gRPC",
    "lane_read_timeout": "seconds a local-lane request may take to arrive once it has begun",
    "lane_max_buffered_bytes": "request bytes all local-lane connections may hold at once",
}
# Flags that are not --name-with-dashes (a true-by-default switch is turned off with its --no- flag).
_FLAG_NAMES = {"shm_enabled": "--no-shm", "local_lane": "--no-local-lane"}
# Defaults that are computed rather than one value.
_DEFAULT_TEXT = {
    "model_repository": "the bundled example models",
    "models": "every model",
    "socket": "/run/edgecow/edgecow.sock, else $XDG_RUNTIME_DIR/edgecow.sock, else /tmp/edgecow-UID/edgecow.sock",
}


@dataclass(frozen=True)
class SettingInfo:
    """One row of the settings table."""

    name: str  # the TOML key
    kind: str  # path, bool, int, float, list or str
    flag: str  # a bool's flag is a switch to the non-default value
    env: str
    default: str  # as the README and --help show it
    help: str


def _kind(name: str) -> str:
    kind = str(_FIELDS[name].type)
    for prefix, short in (("Path", "path"), ("list", "list"), ("bool", "bool"), ("int", "int"), ("float", "float")):
        if kind.startswith(prefix):
            return short
    return "str"


def _default_text(name: str, value: Any) -> str:
    if name in _DEFAULT_TEXT:
        return _DEFAULT_TEXT[name]
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def settings_table() -> list[SettingInfo]:
    """Every setting Settings has, in field order, with its flag, variable, default and help."""
    defaults = Settings()
    rows = []
    for name in _FIELDS:
        kind = _kind(name)
        default = getattr(defaults, name)
        if name in _FLAG_NAMES:
            flag = _FLAG_NAMES[name]
        elif kind == "bool" and default is True:
            flag = "--no-" + name.replace("_", "-")
        else:
            flag = "--" + name.replace("_", "-")
        rows.append(SettingInfo(name, kind, flag, ENV_PREFIX + name.upper(), _default_text(name, default),
                                HELP.get(name, name.replace("_", " "))))
    return rows


def flag_of(name: str) -> str:
    """The command-line flag of setting `name`."""
    return next(row.flag for row in settings_table() if row.name == name)


def _convert(name: str, value: Any, source: str) -> Any:
    """Turn a raw value from TOML, the environment or a flag into the field's type."""
    kind = str(_FIELDS[name].type)
    try:
        if kind.startswith("Path"):
            if value is None:
                return None
            if name == "socket" and str(value).strip().lower() in _DISABLED:
                return Path("")
            return Path(os.path.expanduser(str(value)))
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError("expected true or false")
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if kind == "list[str]":
            if isinstance(value, str):
                return [part.strip() for part in value.split(",") if part.strip()]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return list(value)
            raise ValueError("expected a list of strings")
        if not isinstance(value, str):
            raise ValueError("expected a string")
        return value
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: setting {name!r} has a bad value {value!r} ({err})") from None


def read_toml(path: Path, label: str | None = None) -> dict[str, Any]:
    """Parse a TOML file; a ConfigError that names the file (as `label`, if given) when it is missing or
    malformed."""
    # Imported here: the settings table is read by `edgecow --help` on client-only installs, where
    # Python 3.10 has no tomli.
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    shown = label or str(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {shown} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"configuration file {shown} is not valid TOML: {err}") from None
    except OSError as err:
        raise ConfigError(f"configuration file {shown} cannot be read: {err.strerror}") from None


def load_settings(
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Settings from defaults, then `config_file`, then EDGECOW_* variables, then `overrides` (flags)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    config_file = config_file or (Path(environ["EDGECOW_CONFIG"]) if environ.get("EDGECOW_CONFIG") else None)
    if config_file is not None:
        for key, value in read_toml(config_file).items():
            if key not in _FIELDS:
                raise ConfigError(f"{config_file}: unknown setting {key!r}; known: {', '.join(sorted(_FIELDS))}")
            sources[key] = f"configuration file {config_file}"
            values[key] = _convert(key, value, sources[key])
    for key in _FIELDS:
        env_name = ENV_PREFIX + key.upper()
        if env_name in environ:
            sources[key] = f"environment variable {env_name}"
            values[key] = _convert(key, environ[env_name], sources[key])
    for key, value in (overrides or {}).items():
        if value is not None:
            sources[key] = f"flag {flag_of(key)}"
            values[key] = _convert(key, value, sources[key])
    settings = Settings(**values, sources=sources)
    _validate(settings)
    return settings


def _refuse(settings: Settings, names: str | tuple[str, ...], text: str) -> ConfigError:
    """A ConfigError for `text` that names where the settings `names` were set (flag, variable or file)."""
    where = sorted({settings.sources[n] for n in ((names,) if isinstance(names, str) else names)
                    if n in settings.sources})
    return ConfigError(f"{'; '.join(where)}: {text}" if where else text)


def _validate(settings: Settings) -> None:
    if settings.log_level.lower() not in {"debug", "info", "warning", "error", "critical"}:
        raise _refuse(settings, "log_level",
                      f"log level {settings.log_level!r} is not one of debug, info, warning, error, critical")
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise _refuse(settings, ("tls_cert", "tls_key"), "TLS needs both --tls-cert and --tls-key")
    unknown = set(settings.local_peers) - {"unix", "loopback"}
    if unknown:
        raise _refuse(settings, "local_peers",
                      f"local_peers may hold 'unix' and 'loopback', not {sorted(unknown)[0]!r}")
    for name in ("listen", "metrics_listen"):
        listen = getattr(settings, name).strip()
        if listen.lower() not in _DISABLED:
            host, _, port = listen.rpartition(":")
            if not host or not port.isdigit() or int(port) > 65535:
                raise _refuse(settings, name, f"{name} {listen!r} is not HOST:PORT (or 'none')")
    for name in ("workers", "max_inflight_per_model", "shm_max_regions"):
        if getattr(settings, name) < 1:
            raise _refuse(settings, name, f"setting {name!r} must be at least 1")
    for name in ("poll_interval", "grace_period", "max_queue_per_model", "shm_reap_interval", "max_streams",
                 "max_streams_per_peer", "intra_op_threads"):
        if getattr(settings, name) < 0:
            raise _refuse(settings, name, f"setting {name!r} must not be negative")
    _validate_transports(settings)


def _validate_transports(settings: Settings) -> None:
    total, per_peer = settings.stream_limits()
    if total >= settings.workers:
        raise _refuse(
            settings, ("max_streams", "workers"),
            f"max_streams ({total}) must be below workers ({settings.workers}), so unary calls and health checks "
            "always find a free worker"
        )
    if per_peer > total:
        raise _refuse(settings, ("max_streams_per_peer", "max_streams"),
                      f"max_streams_per_peer ({per_peer}) must not exceed max_streams ({total})")
    for name in ("lane_max_connections", "lane_max_buffered_bytes"):
        if getattr(settings, name) < 1:
            raise _refuse(settings, name, f"setting {name!r} must be at least 1")
    if not 0 < settings.lane_read_timeout < 86_400:  # also refuses NaN and infinity, which sockets cannot take
        raise _refuse(settings, "lane_read_timeout",
                      "setting 'lane_read_timeout' must be a positive number of seconds, below a day")
