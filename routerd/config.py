"""Configuration: embedded defaults, an optional TOML file, then command-line flags.

routerd must run with no file at all (``routerd serve``), so every setting has a
default here. A config file only overrides what it names; unknown keys are errors,
because a misspelt key silently ignored is how a production host ends up running
with settings nobody chose.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from state import VersionSpec

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8400


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the file and key."""


_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: str | int | float, *, key: str) -> float:
    """Seconds from ``"250ms"``, ``"30s"``, ``"5m"``, ``"1h"`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ConfigError(f'{key}: expected a duration such as "30s", got {value!r}')
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(value)
    if match is None:
        raise ConfigError(f'{key}: expected a duration such as "30s" or "5m", got {value!r}')
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


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


@dataclass(frozen=True)
class SchedulerConfig:
    load_timeout: float = 600.0


@dataclass(frozen=True)
class Config:
    """The whole configuration, immutable; a reload builds a new one."""

    server: ServerConfig = field(default_factory=ServerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    state_dir: Path = field(default_factory=default_state_dir)
    log_level: str = "info"
    demo: bool = False
    models: tuple[VersionSpec, ...] = ()
    source_file: Path | None = None

    @property
    def database_path(self) -> Path:
        return self.state_dir / "routerd.db"

    @property
    def demo_dir(self) -> Path:
        return self.state_dir / "demo"

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
    _reject_unknown(raw, {"server", "scheduler", "state", "log_level", "models"}, where="")
    server = _server(_table(raw, "server"))
    scheduler = _scheduler(_table(raw, "scheduler"))
    state = _table(raw, "state")
    _reject_unknown(state, {"dir"}, where="state.")
    state_dir = (
        _resolve(Path(_str(state["dir"], "state.dir")), base_dir)
        if "dir" in state
        else default_state_dir()
    )
    log_level = _str(raw.get("log_level", "info"), "log_level").lower()
    if log_level not in _LOG_LEVELS:
        raise ConfigError(f"log_level: expected one of {', '.join(_LOG_LEVELS)}, got {log_level!r}")
    models_raw = raw.get("models", [])
    if not isinstance(models_raw, list):
        raise ConfigError("models: expected an array of tables ([[models]])")
    models = tuple(_model(entry, i, base_dir) for i, entry in enumerate(models_raw))
    seen: set[tuple[str, str]] = set()
    for spec in models:
        key = (spec.name, spec.version)
        if key in seen:
            raise ConfigError(f"models: {spec.name}@{spec.version} is declared twice")
        seen.add(key)
    return Config(
        server=server, scheduler=scheduler, state_dir=state_dir, log_level=log_level, models=models
    )


def _server(raw: Mapping[str, Any]) -> ServerConfig:
    _reject_unknown(raw, {"host", "port", "max_body_bytes", "shutdown_timeout"}, where="server.")
    defaults = ServerConfig()
    port = _int(raw.get("port", defaults.port), "server.port")
    if not 0 <= port <= 65535:
        raise ConfigError(f"server.port: {port} is not a TCP port")
    max_body = _int(raw.get("max_body_bytes", defaults.max_body_bytes), "server.max_body_bytes")
    if max_body < 1024:
        raise ConfigError("server.max_body_bytes: must be at least 1024")
    return ServerConfig(
        host=_str(raw.get("host", defaults.host), "server.host"),
        port=port,
        max_body_bytes=max_body,
        shutdown_timeout=parse_duration(
            raw.get("shutdown_timeout", defaults.shutdown_timeout), key="server.shutdown_timeout"
        ),
    )


def _scheduler(raw: Mapping[str, Any]) -> SchedulerConfig:
    _reject_unknown(raw, {"load_timeout"}, where="scheduler.")
    defaults = SchedulerConfig()
    timeout = parse_duration(
        raw.get("load_timeout", defaults.load_timeout), key="scheduler.load_timeout"
    )
    if timeout <= 0:
        raise ConfigError("scheduler.load_timeout: must be positive")
    return SchedulerConfig(load_timeout=timeout)


def _model(entry: Any, index: int, base_dir: Path) -> VersionSpec:
    where = f"models[{index}]"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a table")
    _reject_unknown(entry, {"name", "version", "backend", "path", "options"}, where=f"{where}.")
    for required in ("name", "path"):
        if required not in entry:
            raise ConfigError(f"{where}: missing required key {required!r}")
    options = entry.get("options", {})
    if not isinstance(options, Mapping):
        raise ConfigError(f"{where}.options: expected a table")
    try:
        return VersionSpec(
            name=_str(entry["name"], f"{where}.name"),
            version=_str(entry.get("version", "1"), f"{where}.version"),
            backend=_str(entry.get("backend", "transformers"), f"{where}.backend"),
            path=str(_resolve(Path(_str(entry["path"], f"{where}.path")).expanduser(), base_dir)),
            options=dict(options),
        )
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


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
