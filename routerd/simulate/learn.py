"""A host's own traffic and costs, read from its store: what ``--from-state`` replays.

The trace is the request log (``state.requests``): each request that reached a
model, at the time it arrived, with its tokens. The model table comes from the same
store:

- ``bytes``: the footprint measured on the host's GPUs (or, on a CPU-only host, on
  its CPU);
- ``load_s``: the mean duration of its loads from disk (``load`` events), as the
  daemon timed them — warm-up and waiting for victims to leave included;
- ``host_s``: the mean of its returns from the host tier, if it made any;
- ``request_s`` and ``per_token_s``: a least-squares line through the time its
  requests held their lease (duration less the wait for a load) against their
  completion tokens.

A model the log names but the store cannot cost (never loaded here, say) is left out,
with its requests; the notes say so. ``costs_for_trace`` costs another trace's models
from a store the same way (``--trace`` without ``--models``), and refuses one it
cannot cost.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from routerd.simulate.costs import ModelCost
from routerd.simulate.trace import TraceRequest, split_model
from routerd.version_options import SCHEDULER_OPTIONS
from state import Event, RequestEntry, Store

_EVENT_LIMIT = 1 << 62  # every event: the store keeps what its retention keeps
# What a simulated version keeps of its stored options: placement is the simulator's.
_KEPT_OPTIONS = SCHEDULER_OPTIONS - {"device", "devices"}


@dataclass
class Learned:
    trace: list[TraceRequest]
    costs: dict[str, ModelCost]
    options: dict[str, dict[str, Any]]  # per model: the stored version's scheduler options
    notes: list[str] = field(default_factory=list)


def learn(store: Store, *, since: float | None = None, until: float | None = None) -> Learned:
    """The trace of ``store``'s request log (wall-clock bounds) and its model table."""
    entries = [e for e in store.requests(since=since, until=until) if e.model and e.version]
    if not entries:
        window = "" if since is None else " in that window"
        raise ValueError(f"the request log at {store.path} holds no requests{window}")
    by_model: dict[str, list[RequestEntry]] = {}
    for entry in entries:
        by_model.setdefault(f"{entry.model}@{entry.version}", []).append(entry)
    learned = Learned([], {}, {})
    for model, served in sorted(by_model.items()):
        name, version = split_model(model)
        events = store.events(limit=_EVENT_LIMIT, model=name, version=version)
        cost, why = model_cost(store, name, version, events, served, since=since)
        if cost is None:
            learned.notes.append(f"{model} left out with its {len(served)} requests: {why}")
            continue
        learned.costs[model] = cost
        record = store.get_version(name, version)
        if record is not None:
            learned.options[model] = {k: v for k, v in record.options.items() if k in _KEPT_OPTIONS}
    start = entries[0].ts
    learned.trace = [
        TraceRequest(e.ts - start, f"{e.model}@{e.version}", e.prompt_tokens, e.completion_tokens)
        for e in entries
        if f"{e.model}@{e.version}" in learned.costs
    ]
    if not learned.trace:
        raise ValueError(
            "no request in the log is of a model the store can cost: " + "; ".join(learned.notes)
        )
    return learned


def costs_for_trace(store: Store, models: Iterable[str]) -> dict[str, ModelCost]:
    """The model table for a trace's models (``name`` or ``name@version``) from
    ``store``: what ``--trace`` without ``--models`` uses. ``ValueError`` naming every
    model the store cannot cost."""
    wanted = {model: split_model(model) for model in set(models)}
    served: dict[tuple[str, str], list[RequestEntry]] = {v: [] for v in wanted.values()}
    for entry in store.iter_requests():  # one pass, however many models
        rows = served.get((entry.model or "", entry.version or ""))
        if rows is not None:
            rows.append(entry)
    costs: dict[str, ModelCost] = {}
    missing: list[str] = []
    for model, (name, version) in sorted(wanted.items()):
        events = store.events(limit=_EVENT_LIMIT, model=name, version=version)
        cost, why = model_cost(store, name, version, events, served[(name, version)])
        if cost is None:
            missing.append(f"{model}: {why}")
        else:
            costs[model] = cost
    if missing:
        raise ValueError(f"the store at {store.path} cannot cost " + "; ".join(missing))
    return costs


def model_cost(
    store: Store,
    name: str,
    version: str,
    events: Sequence[Event],
    served: Sequence[RequestEntry],
    *,
    since: float | None = None,
) -> tuple[ModelCost | None, str]:
    """One model's costs from its events and requests; (None, why) if it cannot be costed."""
    footprint = store.measured_footprint(name, version, "cuda") or store.measured_footprint(
        name, version, "cpu"
    )
    if footprint is None:
        return None, "no footprint was measured for it (it never loaded here)"
    loads = [e for e in events if e.kind == "load" and e.duration_ms is not None]
    recent = [e for e in loads if since is None or e.ts >= since] or loads
    from_disk = [e.duration_ms / 1000 for e in recent if _source(e) == "disk" and e.duration_ms]
    from_host = [e.duration_ms / 1000 for e in recent if _source(e) != "disk" and e.duration_ms]
    if not from_disk:
        return None, "no load of it from disk is in the event log"
    request_s, per_token_s = fit_service(served)
    return (
        ModelCost(
            bytes=footprint.measured_bytes,
            load_s=round(statistics.fmean(from_disk), 4),
            host_s=round(statistics.fmean(from_host), 4) if from_host else None,
            per_token_s=round(per_token_s, 6),
            request_s=round(request_s, 6),
        ),
        "",
    )


def _source(event: Event) -> str:
    return str(event.detail.get("source", "disk"))


def fit_service(served: Iterable[RequestEntry]) -> tuple[float, float]:
    """(request_s, per_token_s): the least-squares line of lease time on completion
    tokens over the requests that succeeded, neither part below 0."""
    points = [
        (e.completion_tokens, max(e.duration_ms - (e.waited_ms or 0.0), 0.0) / 1000)
        for e in served
        if e.status < 400
    ]
    if not points:
        return 0.0, 0.0
    xs = [float(x) for x, _ in points]
    ys = [y for _, y in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:  # one token count: all of it per token, or per request without tokens
        return (0.0, mean_y / mean_x) if mean_x else (mean_y, 0.0)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    slope = max(slope, 0.0)
    intercept = mean_y - slope * mean_x
    if intercept < 0:  # a line through the origin instead
        return 0.0, sum(x * y for x, y in points) / sum(x * x for x in xs)
    return intercept, slope
