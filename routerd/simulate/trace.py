"""Traces: the requests a simulation replays, as JSON lines.

One request per line: ``{"t": seconds, "model": name, "prompt_tokens": n,
"completion_tokens": n}``. ``t`` counts from the trace's start; lines need not be
in order (they are sorted once read). ``model`` is a name, or ``name@version`` to
tell versions of one model apart; the model table (``routerd.simulate.costs``) says
what each costs. A bad line is refused with its number and what is wrong with it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


class TraceError(ValueError):
    """A trace (or model table) that cannot be read: the message names the line."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    t: float  # seconds since the trace began
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 1

    def to_json(self) -> dict[str, Any]:
        return {
            "t": round(self.t, 6),
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


def parse_request(raw: Any, where: str) -> TraceRequest:
    """One trace entry from its decoded JSON; ``TraceError`` naming ``where`` if bad."""
    if not isinstance(raw, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    unknown = set(raw) - {"t", "model", "prompt_tokens", "completion_tokens"}
    if unknown:
        raise TraceError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    t = raw.get("t")
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
        raise TraceError(f"{where}: 't' must be a finite number of seconds >= 0, got {t!r}")
    model = raw.get("model")
    if not isinstance(model, str) or not model.strip():
        raise TraceError(f"{where}: 'model' must be a non-empty string, got {model!r}")
    counts = []
    for key, default in (("prompt_tokens", 0), ("completion_tokens", 1)):
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TraceError(f"{where}: {key!r} must be an integer >= 0, got {value!r}")
        counts.append(value)
    return TraceRequest(float(t), model, counts[0], counts[1])


def read_trace(path: Path) -> list[TraceRequest]:
    """Every request of the JSON-lines file at ``path``, in time order."""
    try:
        with path.open(encoding="utf-8") as lines:
            return load_trace(lines, str(path))
    except OSError as exc:
        raise TraceError(f"{path}: cannot read the trace: {exc.strerror or exc}") from exc


def load_trace(lines: Iterable[str], name: str = "trace") -> list[TraceRequest]:
    requests = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{name} line {number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{where}: not JSON: {exc.msg}") from None
        requests.append(parse_request(raw, where))
    if not requests:
        raise TraceError(f"{name}: no requests in it")
    requests.sort(key=lambda r: r.t)
    return requests


def write_trace(requests: Sequence[TraceRequest], out: IO[str]) -> None:
    for request in requests:
        out.write(json.dumps(request.to_json(), separators=(",", ":")) + "\n")


def scaled(requests: Iterable[TraceRequest], factor: float) -> Iterator[TraceRequest]:
    """The same requests with their times multiplied by ``factor`` (time compression)."""
    for r in requests:
        yield TraceRequest(r.t * factor, r.model, r.prompt_tokens, r.completion_tokens)


def split_model(model: str) -> tuple[str, str]:
    """A trace's model as (name, version): ``name@version``, or version ``1``."""
    name, at, version = model.partition("@")
    return (name, version) if at else (model, "1")
