"""Configuration: embedded defaults, an optional TOML file, then command-line flags.

routerd must run with no file at all (``routerd serve``), so every setting has a
default here. A config file only overrides what it names; unknown keys are errors,
because a misspelt key silently ignored is how a production host ends up running
with settings nobody chose.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from policies import registry as policy_registry
from policies.eviction import DEFAULT_EVICTION
from routerd.config_values import ConfigError as ConfigError
from routerd.config_values import parse_duration as parse_duration
from routerd.config_values import parse_keep_alive as parse_keep_alive
from routerd.config_values import parse_size as parse_size
from state import VersionSpec

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8400
SOCKET_NAME = "routerd.sock"


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where state lives when nobody said: ROUTERD_STATE_DIR, STATE_DIRECTORY, XDG.

    ``STATE_DIRECTORY`` is what systemd sets for ``StateDirectory=``; it may hold
    several colon-separated paths, of which the first is ours.
    """
    env = os.environ if environ is None else environ
    if env.get("ROUTERD_STATE_DIR"):
        return Path(env["ROUTERD_STATE_DIR"]).expanduser()
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    xdg = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME", "~")) / ".local" / "state")
    return Path(xdg).expanduser() / "routerd"


@dataclass(frozen=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_body_bytes: int = 16 * 1024 * 1024
    shutdown_timeout: float = 30.0
    stream_heartbeat: float = 1.0  # a stream waiting for a load gets an SSE comment this often
    # Admin over TCP needs this token; without one, the admin API is on the unix socket only.
    admin_token: str | None = field(default=None, repr=False)
    # Bearer keys the OpenAI API accepts over TCP; empty: no key needed.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    # Folders models may be registered from; None: ``<state_dir>/models``.
    model_roots: tuple[Path, ...] | None = None
    request_timeout: float = 600.0  # a request still unanswered after this gets 504
    max_streams: int = 256  # streaming responses open at once; more get 429
    # Stop strings (and, separately, stop token ids) one request may give; more get 400.
    max_stop_sequences: int = 32


@dataclass(frozen=True)
class SchedulerConfig:
    load_timeout: float = 600.0
    load_wait_timeout: float = 30.0  # waiting for leases to end so room can be made
    min_residency: float = 10.0  # anti-thrash: no eviction before this long resident
    keep_alive: float = 300.0  # idle instances unload after this; inf = never
    release_timeout: float = 10.0  # NVML must show an eviction's memory back by then
    placement: str = "best-fit"
    eviction: str = DEFAULT_EVICTION
    routing: str = "least-outstanding"  # among a version's replicas
    max_queue: int = 256  # requests waiting per version (load or batch queue); 0 = no limit
    max_failures: int = 3  # backend failures in a row before an instance is failed
    stop_timeout: float = 30.0  # cancelled work must stop this soon, or the instance is hung
    history_half_life_requests: float = 1000.0  # aged request counts halve every this many requests


@dataclass(frozen=True)
class DevicesConfig:
    cpu_memory: int | None = None  # None: a share of available memory; 0: no CPU device
    gpus: tuple[int, ...] | None = None  # None: every GPU NVML finds
    poll_interval: float = 2.0
    gpu_headroom: int = 256 * 1024**2  # kept free for the CUDA context and fragmentation
    cpu_headroom: int = 0
    # "exact": glibc maps every allocation of 1 MiB or more on its own and unmaps it when
    # freed, so the process holds what its tensors hold (backends.host_memory);
    # "pooled": glibc's default, faster prefill, but freed memory stays in its heaps.
    cpu_allocation: str = "exact"
    # The host-RAM tier: evicted instances keep their weights here (pinned on a GPU host)
    # and come back without a load. Its own budget, beside ``cpu_memory``; 0: off.
    host_cache: int = 0


CPU_ALLOCATIONS = ("exact", "pooled")
AUDIT_MODES = ("off", "on", "strict")


@dataclass(frozen=True)
class MemoryAuditConfig:
    """``[memory_audit]``: measured use checked against the ledger (routerd.memory_audit)."""

    mode: str = "on"  # "off"; "on": the gauge and warnings; "strict": violations are errors
    interval: float | None = None  # between samples; None: 1s on, 10ms strict
    tolerance: int = 64 * 1024**2  # bytes of use beyond the ledger (and headroom) allowed
    tolerance_ratio: float = 0.05  # plus this share of the accounted bytes


@dataclass(frozen=True)
class RequestLogConfig:
    """``[request_log]``: the per-request log in SQLite (``routerd.request_log``).

    Every key takes effect on a reload (SIGHUP)."""

    enabled: bool = True  # False: nothing is recorded (rows already kept still age out)
    max_rows: int = 1_000_000  # the oldest rows beyond this are deleted; 0: no limit
    max_age: float = 30 * 86400.0  # rows older than this are deleted; inf: no limit
    flush_interval: float = 1.0  # how often the rows in memory are written


@dataclass(frozen=True)
class Config:
    """The whole configuration, immutable; a reload builds a new one."""

    server: ServerConfig = field(default_factory=ServerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    memory_audit: MemoryAuditConfig = field(default_factory=MemoryAuditConfig)
    request_log: RequestLogConfig = field(default_factory=RequestLogConfig)
    state_dir: Path = field(default_factory=default_state_dir)
    log_level: str = "info"
    log_format: str = "text"  # "text" (key=value) or "json"
    demo: bool = False
    models: tuple[VersionSpec, ...] = ()
    pinned: frozenset[str] = frozenset()  # model ids declared ``pinned = true``
    source_file: Path | None = None
    busy_timeout: float = 5.0  # how long a write waits for another process's database lock

    @property
    def database_path(self) -> Path:
        return self.state_dir / "routerd.db"

    @property
    def demo_dir(self) -> Path:
        return self.state_dir / "demo"

    @property
    def socket_path(self) -> Path:
        """The admin unix socket (mode 0600): ``routerctl`` talks to it without a token."""
        return self.state_dir / SOCKET_NAME

    @property
    def allowed_model_roots(self) -> tuple[Path, ...]:
        """Where model folders may live: ``server.model_roots`` (default
        ``<state_dir>/models``), plus the demo folder when ``--demo`` builds it."""
        roots = self.server.model_roots
        chosen = (self.state_dir / "models",) if roots is None else roots
        return (*chosen, self.demo_dir) if self.demo else chosen

    def with_overrides(self, **changes: Any) -> Config:
        """A copy with top-level or ``server.*`` fields replaced (flags win over the file)."""
        server_changes = {
            k: v for k, v in changes.items() if k in {"host", "port"} and v is not None
        }
        top_changes = {
            k: v for k, v in changes.items() if k not in {"host", "port"} and v is not None
        }
        return replace(self, server=replace(self.server, **server_changes), **top_changes)


_LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


def load_config(path: Path | None) -> Config:
    """Read ``path`` (TOML) over the embedded defaults; ``None`` means defaults only."""
    if path is None:
        return Config()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    try:
        return replace(_from_mapping(raw, base_dir=path.parent), source_file=path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _from_mapping(raw: Mapping[str, Any], *, base_dir: Path) -> Config:
    _reject_unknown(
        raw,
        {"server", "scheduler", "devices", "state", "log_level", "log_format", "models"}
        | {"memory_audit", "request_log"},
        where="",
    )
    server = _server(_table(raw, "server"), base_dir)
    scheduler = _scheduler(_table(raw, "scheduler"))
    devices = _devices(_table(raw, "devices"))
    memory_audit = _memory_audit(_table(raw, "memory_audit"))
    request_log = _request_log(_table(raw, "request_log"))
    state = _table(raw, "state")
    _reject_unknown(state, {"dir", "busy_timeout"}, where="state.")
    busy_timeout = parse_duration(state.get("busy_timeout", 5.0), key="state.busy_timeout")
    if busy_timeout < 0:
        raise ConfigError("state.busy_timeout: must not be negative")
    state_dir = (
        _resolve(Path(_str(state["dir"], "state.dir")), base_dir)
        if "dir" in state
        else default_state_dir()
    )
    log_level = _str(raw.get("log_level", "info"), "log_level").lower()
    if log_level not in _LOG_LEVELS:
        raise ConfigError(f"log_level: expected one of {', '.join(_LOG_LEVELS)}, got {log_level!r}")
    log_format = _str(raw.get("log_format", "text"), "log_format").lower()
    if log_format not in LOG_FORMATS:
        raise ConfigError(
            f"log_format: expected one of {', '.join(LOG_FORMATS)}, got {log_format!r}"
        )
    models_raw = raw.get("models", [])
    if not isinstance(models_raw, list):
        raise ConfigError("models: expected an array of tables ([[models]])")
    entries = [_model(entry, i, base_dir) for i, entry in enumerate(models_raw)]
    models = tuple(spec for spec, _ in entries)
    seen: set[tuple[str, str]] = set()
    for spec in models:
        key = (spec.name, spec.version)
        if key in seen:
            raise ConfigError(f"models: {spec.name}@{spec.version} is declared twice")
        seen.add(key)
    return Config(
        server=server,
        scheduler=scheduler,
        devices=devices,
        memory_audit=memory_audit,
        request_log=request_log,
        state_dir=state_dir,
        busy_timeout=busy_timeout,
        log_level=log_level,
        log_format=log_format,
        models=models,
        pinned=frozenset(f"{spec.name}@{spec.version}" for spec, pinned in entries if pinned),
    )


_SERVER_KEYS = {
    "host",
    "port",
    "max_body_bytes",
    "shutdown_timeout",
    "stream_heartbeat",
    "admin_token",
    "admin_token_file",
    "api_keys",
    "api_keys_file",
    "model_roots",
    "request_timeout",
    "max_streams",
    "max_stop_sequences",
}


def _server(raw: Mapping[str, Any], base_dir: Path) -> ServerConfig:
    _reject_unknown(raw, _SERVER_KEYS, where="server.")
    defaults = ServerConfig()
    port = _int(raw.get("port", defaults.port), "server.port")
    if not 0 <= port <= 65535:
        raise ConfigError(f"server.port: {port} is not a TCP port")
    max_body = _int(raw.get("max_body_bytes", defaults.max_body_bytes), "server.max_body_bytes")
    if max_body < 1024:
        raise ConfigError("server.max_body_bytes: must be at least 1024")
    request_timeout = parse_duration(
        raw.get("request_timeout", defaults.request_timeout), key="server.request_timeout"
    )
    if request_timeout <= 0:
        raise ConfigError("server.request_timeout: must be positive")
    max_streams = _int(raw.get("max_streams", defaults.max_streams), "server.max_streams")
    if max_streams < 1:
        raise ConfigError("server.max_streams: must be at least 1")
    max_stop = _int(
        raw.get("max_stop_sequences", defaults.max_stop_sequences), "server.max_stop_sequences"
    )
    if max_stop < 1:
        raise ConfigError("server.max_stop_sequences: must be at least 1")
    roots = None
    if "model_roots" in raw:
        listed = raw["model_roots"]
        if not isinstance(listed, list) or not listed:
            raise ConfigError("server.model_roots: expected a non-empty list of folders")
        roots = tuple(
            _resolve(Path(_str(r, "server.model_roots")).expanduser(), base_dir) for r in listed
        )
    return ServerConfig(
        host=_str(raw.get("host", defaults.host), "server.host"),
        port=port,
        max_body_bytes=max_body,
        shutdown_timeout=parse_duration(
            raw.get("shutdown_timeout", defaults.shutdown_timeout), key="server.shutdown_timeout"
        ),
        stream_heartbeat=_positive_duration(raw, "stream_heartbeat", defaults.stream_heartbeat),
        admin_token=_admin_token(raw, base_dir),
        api_keys=_api_keys(raw, base_dir),
        model_roots=roots,
        request_timeout=request_timeout,
        max_streams=max_streams,
        max_stop_sequences=max_stop,
    )


def _positive_duration(raw: Mapping[str, Any], key: str, default: float) -> float:
    seconds = parse_duration(raw.get(key, default), key=f"server.{key}")
    if seconds <= 0:
        raise ConfigError(f"server.{key}: must be positive")
    return seconds


MIN_SECRET_LEN = 16
"""Tokens and keys shorter than this are refused: they could be guessed."""


def _secret(value: str, key: str) -> str:
    value = value.strip()
    if len(value) < MIN_SECRET_LEN or any(c.isspace() for c in value):
        raise ConfigError(
            f"{key}: a token must be at least {MIN_SECRET_LEN} characters without spaces"
        )
    return value


def _read_secret_file(raw: Mapping[str, Any], key: str, base_dir: Path) -> list[str] | None:
    """The non-empty, non-comment lines of the file ``raw[key]`` names (None: not set)."""
    if key not in raw:
        return None
    path = _resolve(Path(_str(raw[key], f"server.{key}")).expanduser(), base_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"server.{key}: cannot read {path}: {exc.strerror or exc}") from exc
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _admin_token(raw: Mapping[str, Any], base_dir: Path) -> str | None:
    from_file = _read_secret_file(raw, "admin_token_file", base_dir)
    if from_file is not None and "admin_token" in raw:
        raise ConfigError("server: set admin_token or admin_token_file, not both")
    if from_file is not None:
        if len(from_file) != 1:
            raise ConfigError("server.admin_token_file: expected exactly one token in the file")
        return _secret(from_file[0], "server.admin_token_file")
    if "admin_token" in raw:
        return _secret(_str(raw["admin_token"], "server.admin_token"), "server.admin_token")
    return None


def _api_keys(raw: Mapping[str, Any], base_dir: Path) -> tuple[str, ...]:
    keys: list[str] = []
    listed = raw.get("api_keys", [])
    if not isinstance(listed, list):
        raise ConfigError("server.api_keys: expected a list of keys")
    keys += [_secret(_str(k, "server.api_keys"), "server.api_keys") for k in listed]
    from_file = _read_secret_file(raw, "api_keys_file", base_dir) or []
    keys += [_secret(k, "server.api_keys_file") for k in from_file]
    return tuple(dict.fromkeys(keys))


def _scheduler(raw: Mapping[str, Any]) -> SchedulerConfig:
    defaults = SchedulerConfig()
    durations = ("load_timeout", "load_wait_timeout", "min_residency", "release_timeout")
    positive = ("load_timeout", "load_wait_timeout", "stop_timeout")
    _reject_unknown(
        raw,
        {*durations, "keep_alive", "placement", "eviction", "routing", "max_queue"}
        | {"max_failures", "stop_timeout", "history_half_life_requests"},
        where="scheduler.",
    )
    values: dict[str, Any] = {}
    for key in (*durations, "stop_timeout"):
        seconds = parse_duration(raw.get(key, getattr(defaults, key)), key=f"scheduler.{key}")
        if seconds < 0 or (seconds == 0 and key in positive):
            raise ConfigError(f"scheduler.{key}: must be positive")
        values[key] = seconds
    values["max_failures"] = _int(
        raw.get("max_failures", defaults.max_failures), "scheduler.max_failures"
    )
    if values["max_failures"] < 1:
        raise ConfigError("scheduler.max_failures: must be at least 1")
    half_life = raw.get("history_half_life_requests", int(defaults.history_half_life_requests))
    values["history_half_life_requests"] = float(
        _int(half_life, "scheduler.history_half_life_requests")
    )
    if values["history_half_life_requests"] < 1:
        raise ConfigError("scheduler.history_half_life_requests: must be at least 1")
    values["keep_alive"] = parse_keep_alive(
        raw.get("keep_alive", defaults.keep_alive), key="scheduler.keep_alive"
    )
    for kind in ("placement", "eviction", "routing"):
        values[kind] = _policy(raw.get(kind, getattr(defaults, kind)), kind)
    values["max_queue"] = _int(raw.get("max_queue", defaults.max_queue), "scheduler.max_queue")
    if values["max_queue"] < 0:
        raise ConfigError("scheduler.max_queue: must be 0 (no limit) or more")
    return SchedulerConfig(**values)


def _devices(raw: Mapping[str, Any]) -> DevicesConfig:
    defaults = DevicesConfig()
    _reject_unknown(
        raw,
        {
            "cpu_memory",
            "gpus",
            "poll_interval",
            "gpu_headroom",
            "cpu_headroom",
            "cpu_allocation",
            "host_cache",
        },
        where="devices.",
    )
    allocation = _str(
        raw.get("cpu_allocation", defaults.cpu_allocation), "devices.cpu_allocation"
    ).lower()
    if allocation not in CPU_ALLOCATIONS:
        raise ConfigError(
            f"devices.cpu_allocation: expected one of {', '.join(CPU_ALLOCATIONS)}, "
            f"got {allocation!r}"
        )
    cpu_memory = defaults.cpu_memory
    if "cpu_memory" in raw and raw["cpu_memory"] != "auto":
        cpu_memory = parse_size(raw["cpu_memory"], key="devices.cpu_memory")
    gpus_raw = raw.get("gpus", "auto")
    gpus: tuple[int, ...] | None = None
    if gpus_raw != "auto":
        if not isinstance(gpus_raw, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in gpus_raw
        ):
            raise ConfigError('devices.gpus: expected "auto" or a list of GPU indices')
        gpus = tuple(gpus_raw)
    poll = parse_duration(
        raw.get("poll_interval", defaults.poll_interval), key="devices.poll_interval"
    )
    if poll <= 0:
        raise ConfigError("devices.poll_interval: must be positive")
    return DevicesConfig(
        cpu_memory=cpu_memory,
        gpus=gpus,
        poll_interval=poll,
        gpu_headroom=parse_size(
            raw.get("gpu_headroom", defaults.gpu_headroom), key="devices.gpu_headroom"
        ),
        cpu_headroom=parse_size(
            raw.get("cpu_headroom", defaults.cpu_headroom), key="devices.cpu_headroom"
        ),
        cpu_allocation=allocation,
        host_cache=parse_size(raw.get("host_cache", defaults.host_cache), key="devices.host_cache"),
    )


def _memory_audit(raw: Mapping[str, Any]) -> MemoryAuditConfig:
    defaults = MemoryAuditConfig()
    where = "memory_audit."
    _reject_unknown(raw, {"mode", "interval", "tolerance", "tolerance_ratio"}, where=where)
    mode = _str(raw.get("mode", defaults.mode), f"{where}mode").lower()
    if mode not in AUDIT_MODES:
        raise ConfigError(f"{where}mode: expected one of {', '.join(AUDIT_MODES)}, got {mode!r}")
    interval = None
    if "interval" in raw:
        interval = parse_duration(raw["interval"], key=f"{where}interval")
        if interval <= 0:
            raise ConfigError(f"{where}interval: must be positive")
    ratio = raw.get("tolerance_ratio", defaults.tolerance_ratio)
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1:
        raise ConfigError(f"{where}tolerance_ratio: expected a number from 0 to 1, got {ratio!r}")
    return MemoryAuditConfig(
        mode=mode,
        interval=interval,
        tolerance=parse_size(raw.get("tolerance", defaults.tolerance), key=f"{where}tolerance"),
        tolerance_ratio=float(ratio),
    )


def _request_log(raw: Mapping[str, Any]) -> RequestLogConfig:
    defaults = RequestLogConfig()
    where = "request_log."
    _reject_unknown(raw, {"enabled", "max_rows", "max_age", "flush_interval"}, where=where)
    enabled = raw.get("enabled", defaults.enabled)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where}enabled: expected true or false, got {enabled!r}")
    max_rows = _int(raw.get("max_rows", defaults.max_rows), f"{where}max_rows")
    if max_rows < 0:
        raise ConfigError(f"{where}max_rows: must be 0 (no limit) or more")
    max_age = parse_duration(raw.get("max_age", defaults.max_age), key=f"{where}max_age")
    if max_age < 0:
        raise ConfigError(f"{where}max_age: must be 0 (no limit) or a positive duration")
    flush = parse_duration(
        raw.get("flush_interval", defaults.flush_interval), key=f"{where}flush_interval"
    )
    if flush <= 0:
        raise ConfigError(f"{where}flush_interval: must be positive")
    return RequestLogConfig(
        enabled=enabled,
        max_rows=max_rows,
        max_age=max_age or math.inf,
        flush_interval=flush,
    )


def _model(entry: Any, index: int, base_dir: Path) -> tuple[VersionSpec, bool]:
    """One ``[[models]]`` table → its spec and whether it is pinned.

    ``keep_alive`` and ``devices`` are written beside ``name`` for convenience but
    stored with the options, where the scheduler reads them for every version.
    """
    where = f"models[{index}]"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a table")
    known = {"name", "version", "backend", "path", "options", "keep_alive", "devices", "pinned"}
    _reject_unknown(entry, known, where=f"{where}.")
    for required in ("name", "path"):
        if required not in entry:
            raise ConfigError(f"{where}: missing required key {required!r}")
    options = entry.get("options", {})
    if not isinstance(options, Mapping):
        raise ConfigError(f"{where}.options: expected a table")
    options = dict(options)
    if "keep_alive" in entry:
        parse_keep_alive(entry["keep_alive"], key=f"{where}.keep_alive")
        options["keep_alive"] = entry["keep_alive"]
    if "devices" in entry:
        options["devices"] = entry["devices"]
    pinned = entry.get("pinned", False)
    if not isinstance(pinned, bool):
        raise ConfigError(f"{where}.pinned: expected true or false")
    try:
        spec = VersionSpec(
            name=_str(entry["name"], f"{where}.name"),
            version=_str(entry.get("version", "1"), f"{where}.version"),
            backend=_str(entry.get("backend", "transformers"), f"{where}.backend"),
            path=str(_resolve(Path(_str(entry["path"], f"{where}.path")).expanduser(), base_dir)),
            options=options,
        )
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return spec, pinned


def _resolve(path: Path, base_dir: Path) -> Path:
    """Relative paths in a config file are relative to that file, not to the cwd."""
    return path if path.is_absolute() else (base_dir / path).resolve()


def _table(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a table ([{key}])")
    return value


def _reject_unknown(raw: Mapping[str, Any], known: set[str], *, where: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown key {where}{unknown[0]} (known: {', '.join(sorted(known))})")


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    return value


def _policy(value: Any, kind: str) -> str:
    """A policy name known to the registry (built-in or plug-in)."""
    name = _str(value, f"scheduler.{kind}")
    try:
        policy_registry.check(kind, name)
    except ValueError as exc:
        raise ConfigError(f"scheduler.{kind}: {exc}") from None
    return name
