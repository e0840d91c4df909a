"""What a replay did, summed up the same way for the simulator and for a daemon.

Both write the same records: ``load`` and ``evict`` events in their store's event
log, and one outcome per request (its status and how long it waited for a load). The
simulator's come from its own store and its requests; a daemon's from its store's
event log and request log. ``summarize`` reads either, so a figure of one means what
it means for the other.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from routerd.units import human_bytes
from state import Event


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request as it ended: ``waited_ms`` is None when its model was ready."""

    status: int
    waited_ms: float | None


@dataclass(frozen=True)
class PolicyResult:
    policy: str
    requests: int
    served: int
    errors: Mapping[str, int]  # by HTTP status
    hits: int  # requests that found their model resident (no wait for a load)
    hit_ratio: float
    loads: int  # from disk
    host_loads: int  # back from the host-RAM tier (or an engine's sleep)
    bytes_moved: int  # copied onto devices (loads, wake-ups) and into the host tier
    load_seconds: float  # summed over loads and wake-ups, as their events time them
    waited: int  # requests that waited for a load or wake-up
    waited_p50_ms: float | None
    waited_p95_ms: float | None
    thrash: int  # loads of a model within the window after its eviction
    evictions: int
    virtual_seconds: float = 0.0
    wall_seconds: float = 0.0
    notes: Sequence[str] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["errors"] = dict(self.errors)
        out["notes"] = list(self.notes)
        return out


def summarize(
    policy: str,
    events: Iterable[Event],
    outcomes: Sequence[Outcome],
    *,
    thrash_window: float,
) -> PolicyResult:
    """Sum up ``events`` (any order) and ``outcomes``; see ``PolicyResult``."""
    loads = host_loads = moved = evictions = thrash = 0
    load_seconds = 0.0
    evicted_at: dict[str, float] = {}
    for event in sorted(events, key=lambda e: (e.ts, e.id)):
        if event.kind == "load":
            source = event.detail.get("source", "disk")
            if source == "disk":
                loads += 1
            else:
                host_loads += 1
            moved += event.bytes or 0
            load_seconds += (event.duration_ms or 0.0) / 1000
            left = evicted_at.pop(event.model_id, None)
            if left is not None and event.ts - left <= thrash_window:
                thrash += 1
        elif event.kind == "evict":
            evictions += 1
            evicted_at[event.model_id] = event.ts
            if event.detail.get("tier") in ("host", "sleep"):  # weights copied to host RAM
                moved += int(event.detail.get("host_bytes", 0))
    served = [o for o in outcomes if o.status < 400]
    waits = sorted(o.waited_ms for o in served if o.waited_ms is not None)
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.status >= 400:
            errors[str(o.status)] = errors.get(str(o.status), 0) + 1
    hits = len(served) - len(waits)
    return PolicyResult(
        policy=policy,
        requests=len(outcomes),
        served=len(served),
        errors=dict(sorted(errors.items())),
        hits=hits,
        hit_ratio=hits / len(outcomes) if outcomes else 0.0,
        loads=loads,
        host_loads=host_loads,
        bytes_moved=moved,
        load_seconds=round(load_seconds, 3),
        waited=len(waits),
        waited_p50_ms=_percentile(waits, 0.50),
        waited_p95_ms=_percentile(waits, 0.95),
        thrash=thrash,
        evictions=evictions,
    )


def _percentile(ordered: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted values (None for none)."""
    if not ordered:
        return None
    rank = max(math.ceil(q * len(ordered)) - 1, 0)
    return round(ordered[rank], 1)


def render(results: Sequence[PolicyResult], *, reference: str | None = None) -> str:
    """A table for people: one column per policy."""
    rows: list[tuple[str, list[str]]] = [
        ("requests", [str(r.requests) for r in results]),
        ("hit ratio", [f"{r.hit_ratio:.3f}" for r in results]),
        ("loads (disk)", [str(r.loads) for r in results]),
        ("loads (host tier)", [str(r.host_loads) for r in results]),
        ("bytes moved", [human_bytes(r.bytes_moved) for r in results]),
        ("seconds loading", [f"{r.load_seconds:.1f}" for r in results]),
        ("waited for a load", [str(r.waited) for r in results]),
        ("  added latency p50", [_ms(r.waited_p50_ms) for r in results]),
        ("  added latency p95", [_ms(r.waited_p95_ms) for r in results]),
        ("thrash", [str(r.thrash) for r in results]),
        ("evictions", [str(r.evictions) for r in results]),
        ("errors", [_errors(r.errors) for r in results]),
        ("simulated in", [f"{r.wall_seconds:.1f}s" for r in results]),
    ]
    names = [r.policy + (" (reference)" if r.policy == reference else "") for r in results]
    label = max(len(name) for name, _ in rows)
    widths = [max(len(n), *(len(v[i]) for _, v in rows)) for i, n in enumerate(names)]
    lines = ["  ".join([" " * label, *(n.rjust(w) for n, w in zip(names, widths, strict=True))])]
    for name, values in rows:
        cells = (v.rjust(w) for v, w in zip(values, widths, strict=True))
        lines.append("  ".join([name.ljust(label), *cells]))
    for r in results:
        lines.extend(f"{r.policy}: {note}" for note in r.notes)
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _errors(errors: Mapping[str, int]) -> str:
    return ", ".join(f"{count}×{status}" for status, count in errors.items()) or "0"
