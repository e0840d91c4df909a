"""Why is a model version resident, or not? One paragraph for an operator, from the event log.

``explain`` reads the events of one version (newest first, as ``Store.events``
returns them) and describes its most recent load, failed load or eviction in plain
English: when, on which device, why, what it cost or freed. It is pure — no I/O, no
clock of its own (``now`` is passed in) — so ``routerctl why`` and the tests get the
same text from the same events.
"""

from __future__ import annotations

from collections.abc import Sequence

from routerd.model_ids import split_model_id
from routerd.units import human_bytes
from state import Event

_DECISIVE = ("load", "load_failed", "evict")
"""The kinds that change (or fail to change) whether a version is resident."""

# Why an instance was evicted (``state.records.EVICT_REASONS``), as a clause that
# follows "… was evicted from DEVICE WHEN". ``admin`` means what ``manual`` means: event
# logs kept from older routerd releases give it, and they should read as well.
# The eviction policies' reasons: what made this instance the one to go.
_CHOSEN_AS = {
    "lru": "the least recently used model there",
    "lfu": "the model there with the fewest recent requests",
    "gdsf": (
        "the model there least worth keeping by GDSF "
        "(recent requests × reload time ÷ size, aged by the device's clock)"
    ),
    "cost": (
        "the model there whose eviction cost the least reloading for the memory it "
        "frees (recent requests × measured reload time ÷ size)"
    ),
}

_EVICT_BECAUSE = {
    **{
        policy: f"because it was {chosen} and its memory was needed"
        for policy, chosen in _CHOSEN_AS.items()
    },
    "ttl": "because it had been idle for longer than its keep_alive",
    "manual": "because an operator asked for it (routerctl evict)",
    "admin": "because an operator asked for it (routerctl evict)",
    "pressure": "because the device was running short of memory",
    "shutdown": "because routerd was shutting down",
    "reload": "because a config reload changed or removed it",
    "oom-retry": ("because a load ran out of device memory and routerd freed room to try it again"),
    "retired": "because it lost its traffic (a route change or a finished rollout) and drained",
    "failed": (
        "because it failed (its backend kept erroring, hung or crashed); "
        "the next request loads it afresh"
    ),
}

_LOAD_BECAUSE = {
    "request": "because a request needed it",
    "manual": "because an operator asked for it (routerctl load)",
    "admin": "because an operator asked for it (routerctl load)",
    "restore": "to restore what was resident before routerd restarted",
    "pin": "because it is pinned",
    "route": "because a route change was about to send it traffic",
    "rollout": "because a rollout was about to send it traffic",
}


def explain(model_id: str, events: Sequence[Event], now: float) -> str:
    """One paragraph on ``model_id``'s latest load or eviction in ``events`` (newest first).

    ``model_id`` is ``name@version``; events of other versions are ignored (a bare
    ``name`` considers every version of it). ``now`` is the wall-clock time the
    events' ``ts`` are measured against. ValueError for a malformed ``model_id``.
    """
    name, version = split_model_id(model_id)
    mine = [e for e in events if e.model == name and (version is None or e.version == version)]
    index = next((i for i, e in enumerate(mine) if e.kind in _DECISIVE), None)
    if index is None:
        return f"{model_id} has never been loaded since the event log began."
    event, newer, older = mine[index], mine[:index], mine[index + 1 :]
    if event.kind == "evict":
        return _explain_evict(model_id, event, newer, older, now)
    if event.kind == "load":
        return _explain_load(model_id, event, now)
    return _explain_load_failed(model_id, event, now)


# -- the three stories -------------------------------------------------------------


def _explain_evict(
    model_id: str, evict: Event, newer: Sequence[Event], older: Sequence[Event], now: float
) -> str:
    trigger = evict.trigger
    reason = evict.reason
    first = f"{model_id} was evicted{_from(evict.device)} {_ago(evict.ts, now)}"
    if reason is None:
        first += " (no reason was recorded)"
    elif reason in _CHOSEN_AS and trigger:
        first += f" because it was {_CHOSEN_AS[reason]}, to make room for loading {trigger}"
    elif reason == "oom-retry" and trigger:
        first += (
            f" because loading {trigger} ran out of device memory "
            "and routerd freed room to try it again"
        )
    elif reason in _EVICT_BECAUSE:
        first += " " + _EVICT_BECAUSE[reason]
        if trigger:
            first += f", while {trigger} was being loaded"
    else:
        first += f" (reason: {_clause(reason)})"
        if trigger:
            first += f", to make room for loading {trigger}"
    sentences = [first + "."]

    load = _matching_load(older)
    resident_s = _number(evict.detail.get("resident_s"))
    if load is not None:
        sentences.append(
            f"It had been resident for {_span(evict.ts - load.ts)}, since it was loaded"
            f"{_on(load.device)} {_ago(load.ts, now)}."
        )
    elif resident_s is not None:  # its load is no longer in the log; the scheduler timed it
        sentences.append(f"It had been resident for {_span(resident_s)}.")

    freed = _bytes_of(evict)
    took = evict.duration_ms
    held = None if load is None else _bytes_of(load)
    if freed is not None and took is not None:
        sentences.append(f"Draining and unloading it took {_took(took)} and freed {_size(freed)}.")
    elif freed is not None:
        sentences.append(f"Evicting it freed {_size(freed)}.")
    elif took is not None:
        sentences.append(f"Draining and unloading it took {_took(took)}.")
    elif held is not None:
        sentences.append(f"It held {_size(held)} when it was loaded.")

    leak = next((e for e in reversed(newer) if e.kind == "leak"), None)  # the first after it
    if leak is not None:
        size = _bytes_of(leak)
        what = "that memory" if size is None else f"the {_size(size)}"
        why = f": {_clause(leak.reason)}" if leak.reason else ""
        sentences.append(
            f"Afterwards the device did not show {what} as free again (recorded as a leak{why})."
        )
    return " ".join(sentences)


def _explain_load(model_id: str, load: Event, now: float) -> str:
    first = f"{model_id} was loaded{_on(load.device)} {_ago(load.ts, now)}"
    if load.reason in _LOAD_BECAUSE:
        first += " " + _LOAD_BECAUSE[load.reason]
    elif load.reason:
        first += f" (reason: {_clause(load.reason)})"
    sentences = [first + "."]
    took = _duration_of(load)
    size = _bytes_of(load)
    if took is not None and size is not None:
        sentences.append(
            f"Loading and warming it up took {_took(took)}; it occupies {_size(size)}."
        )
    elif took is not None:
        sentences.append(f"Loading and warming it up took {_took(took)}.")
    elif size is not None:
        sentences.append(f"It occupies {_size(size)}.")
    after = _number(load.detail.get("reloaded_after_s"))
    if after is not None:
        came_back = f"It was reloaded {_span(after)} after its eviction"
        rival = load.detail.get("displaced_by")
        if rival:
            came_back += (
                f", which had made room for {rival}; the two keep displacing each other "
                "(more memory, a host tier, or pinning one of them would stop it)"
            )
        elif load.detail.get("thrash"):
            came_back += ": thrash, counted in routerd_thrash_total"
        sentences.append(came_back + ".")
    sentences.append("It has not been evicted since.")
    return " ".join(sentences)


def _explain_load_failed(model_id: str, failed: Event, now: float) -> str:
    first = f"Loading {model_id}{_on(failed.device)} failed {_ago(failed.ts, now)}"
    took = failed.duration_ms
    if took is not None:
        first += f" after {_took(took)}"
    if failed.reason:
        first += f": {_clause(failed.reason)}"
    else:
        first += " (no reason was recorded)"
    return first + ". It is not resident; the next request for it will try to load it again."


# -- pieces ------------------------------------------------------------------------


def _matching_load(older: Sequence[Event]) -> Event | None:
    """The load that made the evicted instance resident: the latest load before it,
    unless another eviction comes first (then that load is not in the log)."""
    for event in older:
        if event.kind == "load":
            return event
        if event.kind == "evict":
            return None
    return None


def _bytes_of(event: Event) -> int | None:
    """``event.bytes``; events written before it existed kept it in ``detail``."""
    if event.bytes is not None:
        return event.bytes
    value = event.detail.get("bytes")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _duration_of(event: Event) -> float | None:
    """``event.duration_ms``; older load events kept it as ``detail["load_ms"]``."""
    if event.duration_ms is not None:
        return event.duration_ms
    return _number(event.detail.get("load_ms"))


def _number(value: object) -> float | None:
    """A number read from ``detail`` (free-form JSON), or None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _from(device: str | None) -> str:
    return f" from {device}" if device else ""


def _on(device: str | None) -> str:
    return f" on {device}" if device else ""


def _clause(text: str) -> str:
    """Free text (a backend's message) fitted into a sentence: no trailing period."""
    return text.strip().rstrip(".") or "(empty)"


def _ago(ts: float, now: float) -> str:
    seconds = now - ts
    if seconds < 1:
        return "just now"
    return f"{_span(seconds)} ago"


def _span(seconds: float) -> str:
    """A length of time, rounded down to its two largest units: 45s, 3m, 2h 5m, 3d 4h."""
    total = int(max(0.0, seconds))
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m" + (f" {secs}s" if secs and minutes < 10 else "")
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h" + (f" {minutes}m" if minutes else "")
    days, hours = divmod(hours, 24)
    return f"{days}d" + (f" {hours}h" if hours else "")


def _took(ms: float) -> str:
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    return _span(ms / 1000)


def _size(n: int) -> str:
    return human_bytes(n, spelled_out=True)
