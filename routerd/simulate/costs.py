"""The model table: what each model of a trace costs the simulated host.

Per model: the device bytes it holds once loaded; seconds for a load from disk
(warm-up included, as the daemon's ``load`` events time it); seconds to come back
from the host-RAM tier (and as long to go there); and the time a request holds its
lease: ``request_s`` plus ``per_token_s`` per completion token. ``unload_s``, how long
an unload takes, defaults to nothing.

Written by hand, by the generators, or learned from a daemon's store
(``routerd.simulate.learn``). The file is JSON::

    {"models": {"chat-7b": {"bytes": "14GiB", "load_s": 9.5, "host_s": 1.2,
                            "per_token_s": 0.02}}}

``bytes`` takes an integer or a size (``"512MiB"``, ``"14GiB"``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from routerd.config import ConfigError, parse_size
from routerd.simulate.trace import TraceError

_FIELDS = ("bytes", "load_s", "host_s", "per_token_s", "request_s", "unload_s")


@dataclass(frozen=True)
class ModelCost:
    bytes: int
    load_s: float
    host_s: float | None = None  # None: a tenth of ``load_s``
    per_token_s: float = 0.0
    request_s: float = 0.0
    unload_s: float = 0.0

    @property
    def restore_s(self) -> float:
        """Seconds to come back from the host tier (or go there)."""
        return self.load_s / 10 if self.host_s is None else self.host_s

    def serve_s(self, completion_tokens: int) -> float:
        """How long one request holds its lease."""
        return self.request_s + self.per_token_s * completion_tokens


def parse_cost(raw: Any, where: str) -> ModelCost:
    if not isinstance(raw, dict):
        raise TraceError(f"{where}: expected an object, got {type(raw).__name__}")
    unknown = set(raw) - set(_FIELDS)
    if unknown:
        raise TraceError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    if "bytes" not in raw or "load_s" not in raw:
        raise TraceError(f"{where}: 'bytes' and 'load_s' are required")
    try:
        size = parse_size(raw["bytes"], key=f"{where}.bytes")
    except ConfigError as exc:
        raise TraceError(str(exc)) from None
    if size <= 0:
        raise TraceError(f"{where}.bytes: must be more than 0")
    seconds: dict[str, float | None] = {}
    for key in _FIELDS[1:]:
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TraceError(f"{where}.{key}: must be a number of seconds, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise TraceError(f"{where}.{key}: must be finite and >= 0, got {value!r}")
        seconds[key] = float(value)
    return ModelCost(bytes=size, **seconds)  # type: ignore[arg-type]


def parse_table(raw: Any, name: str = "model table") -> dict[str, ModelCost]:
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict):
        raise TraceError(f'{name}: expected {{"models": {{name: {{...}}}}}}')
    if not raw["models"]:
        raise TraceError(f"{name}: no models in it")
    return {
        str(model): parse_cost(entry, f"{name}: models.{model}")
        for model, entry in raw["models"].items()
    }


def read_table(path: Path) -> dict[str, ModelCost]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read the model table: {exc.strerror or exc}") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}: not JSON: {exc.msg} (line {exc.lineno})") from None
    return parse_table(raw, str(path))


def table_json(table: Mapping[str, ModelCost]) -> dict[str, Any]:
    return {
        "models": {
            model: {k: v for k, v in asdict(cost).items() if v is not None}
            for model, cost in sorted(table.items())
        }
    }
