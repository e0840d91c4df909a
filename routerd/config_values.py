"""The value syntax of routerd's config: durations, sizes and keep-alives, and the one
error every bad value raises.

Kept apart from ``routerd.config`` (the tables and their defaults), which re-exports
these names: request fields (``keep_alive``), model options and admin queries
(``since``) are read with the same syntax as the file.
"""

from __future__ import annotations

import math
import re


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the file and key."""


_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: str | int | float, *, key: str) -> float:
    """Seconds from ``"250ms"``, ``"30s"``, ``"5m"``, ``"1h"``, ``"30d"`` or a bare number of
    seconds."""
    if isinstance(value, bool):
        raise ConfigError(f'{key}: expected a duration such as "30s", got {value!r}')
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int past a double's range (JSON allows any length)
            seconds = math.inf
        if not math.isfinite(seconds):
            raise ConfigError(f'{key}: expected a duration such as "30s", got {value!r}')
        return seconds
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f'{key}: expected a duration such as "30s" or "5m", got {value!r}')
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not math.isfinite(seconds):  # hundreds of digits
        raise ConfigError(f"{key}: {value[:40]!r}... is longer than any duration")
    return seconds


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_size(value: str | int, *, key: str) -> int:
    """Bytes from ``"8GiB"``, ``"512MiB"``, ``"2GB"`` or a bare number of bytes."""
    if isinstance(value, bool):
        raise ConfigError(f'{key}: expected a size such as "8GiB", got {value!r}')
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{key}: a size cannot be negative")
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f'{key}: expected a size such as "8GiB" or "512MiB", got {value!r}')
    unit = (match.group(2) or "b").lower()
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_keep_alive(value: str | int | float, *, key: str) -> float:
    """Seconds an idle instance stays loaded: a duration, ``0`` (unload when idle) or
    ``-1`` (never unload), the values Ollama users already know. Never is ``inf``."""
    seconds = parse_duration(value, key=key)
    if seconds < 0:
        if seconds != -1:
            raise ConfigError(f"{key}: use -1 for never, or a duration >= 0, got {value!r}")
        return math.inf
    return seconds
