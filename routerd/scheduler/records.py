"""What the lifecycle writes down as instances move: events in the journal, log lines
and stored footprints. Kept apart from the moves themselves, which stay in
``routerd.scheduler.lifecycle``; nothing here changes an instance or the table."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from backends.base import Footprint
from contract.errors import LoadCancelled
from routerd.instance import Instance
from routerd.scheduler.context import Context
from routerd.scheduler.history import Comeback
from state import StoreError

log = logging.getLogger("routerd.scheduler")


def loaded(
    context: Context, instance: Instance, why: str, comeback: Comeback | None = None
) -> None:
    """A ``load`` event for an instance read from disk and made ready; ``comeback``:
    how soon after its eviction (``thrashed`` says what a quick one means)."""
    record = instance.record
    measured = instance.measured
    assert measured is not None and instance.load_ms is not None
    fields: dict[str, Any] = {
        "device": instance.device,
        "reason": why,
        "bytes": measured.total,
        "duration_ms": round(instance.load_ms, 1),
    }
    context.journal.record(
        "load",
        record,
        **fields,
        detail={
            "estimated_bytes": instance.estimated_bytes,
            "weights": measured.weights,
            "runtime": measured.runtime,
            "working": measured.working,
            # "stored": the backend was given the footprint measured at an earlier
            # load and may skip its profile; "measured": it profiled this load.
            "profile": "stored" if instance.profile_known else "measured",
            "source": "disk",
            **thrashed(instance, comeback),
        },
    )
    log.info(
        "loaded %s on %s: %d bytes (estimated %d) in %.0f ms",
        record.model_id,
        instance.device,
        measured.total,
        instance.estimated_bytes,
        instance.load_ms,
        extra={
            "event": "load",
            "model": record.model_id,
            "estimated_bytes": instance.estimated_bytes,
            **fields,
        },
    )


def back(
    context: Context,
    instance: Instance,
    source: str | None,
    why: str,
    nbytes: int,
    seconds: float,
    comeback: Comeback | None = None,
) -> None:
    """A ``load`` event for an instance brought back from the host tier (``source``:
    ``sleep`` or ``host``), ``nbytes`` returned to its device in ``seconds``."""
    record = instance.record
    duration_ms = round(seconds * 1000, 1)
    context.journal.record(
        "load",
        record,
        device=instance.device,
        reason=why,
        bytes=nbytes,
        duration_ms=duration_ms,
        detail={"source": source, **thrashed(instance, comeback)},
    )
    log.info(
        "%s back on %s from the host tier (%s) in %.0f ms",
        record.model_id,
        instance.device,
        source,
        duration_ms,
        extra={"event": "load", "model": record.model_id, "source": source},
    )


def thrashed(instance: Instance, comeback: Comeback | None) -> dict[str, Any]:
    """What a load event says of a return soon after eviction: ``reloaded_after_s``
    and ``thrash`` (within ``THRASH_WINDOW_S``: counted by ``routerd_thrash_total``).
    Two versions that keep evicting each other get a warning with the figure (a pair at
    most once every ``RIVALRY_LOG_S``, however often it happens)."""
    if comeback is None:
        return {}
    if comeback.rival is not None and comeback.first_in_a_while:
        log.warning(
            "%s reloaded %.0f s after it was evicted for %s, which had itself been evicted "
            "for it: the two keep displacing each other on %s (more memory, a host tier, "
            "or pinning one of them would stop it)",
            instance.model_id,
            comeback.after_s,
            comeback.rival,
            instance.device,
            extra={"event": "thrash", "model": instance.model_id, "rival": comeback.rival},
        )
    detail: dict[str, Any] = {"reloaded_after_s": round(comeback.after_s, 1)}
    if comeback.thrash:
        detail["thrash"] = True
        if comeback.rival is not None:
            detail["displaced_by"] = comeback.rival
    return detail


def rested(
    context: Context, instance: Instance, reason: str, trigger: str | None, seconds: float
) -> None:
    """An ``evict`` event for an instance that went to the host tier (``tier``)."""
    now = context.clock.now()
    context.journal.record(
        "evict",
        instance.record,
        device=instance.device,
        reason=reason,
        bytes=instance.wake_bytes,
        trigger=trigger,
        duration_ms=round(seconds * 1000, 1),
        detail={
            "tier": instance.tier,
            "host_bytes": instance.host_bytes,
            "resident_s": round(now - instance.loaded_at, 1),
        },
    )
    log.info(
        "%s left %s for the host tier (%s), %d bytes kept in host RAM",
        instance.model_id,
        instance.device,
        instance.tier,
        instance.host_bytes,
        extra={"event": "evict", "model": instance.model_id, "tier": instance.tier},
    )


def evicted(
    context: Context,
    instance: Instance,
    reason: str,
    trigger: str | None,
    freed: int,
    host_bytes: int,
    resident_s: float,
) -> None:
    """An ``evict`` event for an instance unloaded (``tier``: ``gone``); ``host_bytes``:
    what it freed in the host tier, if it rested there."""
    fields: dict[str, Any] = {
        "device": instance.device,
        "reason": reason,
        "bytes": freed,
        "trigger": trigger,
    }
    detail: dict[str, Any] = {"resident_s": round(resident_s, 1), "tier": "gone"}
    if host_bytes:
        detail["host_bytes"] = host_bytes
    context.journal.record("evict", instance.record, **fields, detail=detail)
    log.info(
        "evicted %s from %s (%s%s) after %.0fs, %d bytes",
        instance.model_id,
        instance.device,
        reason,
        f", for {trigger}" if trigger else "",
        resident_s,
        freed,
        extra={
            "event": "evict",
            "model": instance.model_id,
            "resident_s": round(resident_s, 1),
            **fields,
        },
    )


def load_failed(context: Context, instance: Instance, doing: str, exc: BaseException) -> None:
    """A ``load_failed`` event for a failed (or cancelled) load or wake-up."""
    record = instance.record
    if isinstance(exc, asyncio.CancelledError | LoadCancelled):
        reason = "cancelled: nobody waits for it any more"
    else:
        reason = reason_of(exc)
    context.journal.record("load_failed", record, device=instance.device, reason=reason)
    log.warning(
        "%s %s on %s failed: %s",
        doing,
        record.model_id,
        instance.device,
        reason,
        extra={"event": "load_failed", "model": record.model_id, "device": instance.device},
    )


def remember_footprint(context: Context, instance: Instance, measured: Footprint) -> None:
    """Store the measurement for later placements; a database that cannot take it
    now (locked) costs only the measurement, never the load.

    What is stored is what the instance needed (``Footprint.needed``): later loads
    are granted it, and one granted only what this instance holds might not start.
    """
    record = instance.record
    measured = measured.needed()
    kind = instance.device.split(":")[0]
    try:
        stored = context.store.measured_footprint(record.name, record.version, kind)
        if stored is not None and (
            stored.weights_bytes,
            stored.runtime_bytes,
            stored.working_bytes,
            stored.estimated_bytes,
        ) == (measured.weights, measured.runtime, measured.working, instance.estimated_bytes):
            return  # a reload measured what was stored: nothing to write
        context.store.record_footprint(
            record.name,
            record.version,
            kind,
            measured={
                "weights": measured.weights,
                "runtime": measured.runtime,
                "working": measured.working,
            },
            estimated_bytes=instance.estimated_bytes,
        )
    except StoreError as exc:
        log.warning("%s: footprint not stored: %s", record.model_id, exc)


def reason_of(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
