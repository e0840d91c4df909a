"""The path of a swap: bringing a version onto a device (DESIGN.md, "The path of a swap").

``load`` runs it top to bottom, once per load (the coordinator shares one load
among every request that waits for it):

1. estimate — bytes per device kind, from the checkpoint; the stored measurement,
   where there is one, is what gets claimed, never less than the backend's minimum
   to start (planning).
2. plan and reserve — the placement policy picks a device and victims; the plan is
   committed at once: the instance is ``waiting`` with its bytes claimed, its
   victims ``draining`` (planning, lifecycle).
3. victims leave — each drains (live leases finish), then sleeps or unloads, and
   its memory is verified back; the load waits for that (``_wait_for_room``).
4. load, warm up, measure — on the instance's own thread (lifecycle).
5. overrun — measured larger than claimed and the device has no room for the
   difference: idle instances there are evicted (``pressure``); failing that, or
   out of memory during the load, the load is discarded and planned once more with
   a larger claim (``RetryLoad``); a second failure is 503.
6. ready — a batcher is attached, the footprint stored, the event logged; waiting
   requests take their leases (the coordinator).

A load nobody waits for any more is cancelled (the coordinator): wherever the
cancellation finds it, the instance is discarded, and a backend call in flight is
first waited for to return (``Lifecycle._settled``), so the reservation is given back
only once no thread may still allocate and the memory is verified free.

``wake`` is the same path for a ``sleeping`` instance: claim room on its own
device, wait for the victims, wake it (no warm-up, no measuring).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import replace

from backends.base import Backend, Footprint
from contract.errors import OutOfMemory
from routerd.errors import LoadFailed, Unavailable
from routerd.instance import Instance
from routerd.scheduler.admission import Admission
from routerd.scheduler.context import Context
from routerd.scheduler.lifecycle import Lifecycle, until_done
from routerd.scheduler.planning import Planner
from routerd.scheduler.residency import Residency
from routerd.states import InstanceState
from routerd.version_options import options_of
from state import VersionRecord

log = logging.getLogger("routerd.scheduler")

ROOM_POLL_S = 0.1
"""How often a load waiting for its victims' memory re-reads the ledger unprompted."""


class RetryLoad(Exception):
    """The attempt failed for lack of memory; plan again with ``need``."""

    def __init__(self, need: Mapping[str, int], reason: str) -> None:
        super().__init__(reason)
        self.need = need
        self.reason = reason


class Swap:
    """Loads and wakes instances; see the module docstring."""

    def __init__(
        self,
        context: Context,
        residency: Residency,
        admission: Admission,
        planner: Planner,
        lifecycle: Lifecycle,
    ) -> None:
        self._context = context
        self._residency = residency
        self._admission = admission
        self._planner = planner
        self._lifecycle = lifecycle

    async def load(
        self,
        record: VersionRecord,
        device: str | None,
        why: str,
        *,
        replica: int = 0,
        reprofile: bool = False,
    ) -> Instance:
        """Estimate, place, wait for victims, load, warm up, measure; retry once on OOM.

        A footprint measured before under the same estimate spares the warm-up its
        profile (``Planner.known``), unless ``reprofile`` asks for a new one."""
        try:
            backend = self._context.backends.get(record.backend)
        except ValueError as exc:
            self._context.journal.record("load_failed", record, reason=str(exc))
            raise LoadFailed(f"cannot load {record.model_id}: {exc}") from exc
        preferences = [device] if device else list(options_of(record).devices)
        estimates = await self._planner.estimates(record, backend)
        need = self._planner.need(record, estimates)
        retried: str | None = None
        while True:
            instance = await self._planner.place(
                record,
                preferences,
                need,
                estimates,
                "oom-retry" if retried else None,
                replica=replica,
            )
            try:
                known = None
                if not reprofile:
                    kind = instance.device.split(":")[0]
                    known = self._planner.known(record, instance.device, estimates[kind])
                return await self._bring_up(instance, backend, need, why, known)
            except RetryLoad as retry:
                if retried is not None:
                    self._context.journal.record(
                        "load_failed", record, device=instance.device, reason=retry.reason
                    )
                    raise LoadFailed(
                        f"loading {record.model_id} failed: {retry.reason} (after one retry)"
                    ) from None
                log.warning(
                    "%s: %s; evicting more and retrying once", record.model_id, retry.reason
                )
                retried = retry.reason
                need = dict(retry.need)

    async def _bring_up(
        self,
        instance: Instance,
        backend: Backend,
        need: Mapping[str, int],
        why: str,
        known: Footprint | None,
    ) -> Instance:
        try:
            await self._wait_for_room(instance, need)
        except asyncio.CancelledError:
            await until_done(self._lifecycle.discard(instance))
            raise
        spec = replace(self._planner.spec(instance.record, instance.device), known=known)
        try:
            measured = await self._lifecycle.load(instance, backend, spec)
        except OutOfMemory as exc:
            raise RetryLoad(_grown(need, instance.device, 1.5), f"out of memory: {exc}") from None
        row = self._residency.row(instance.device)
        if row is not None and row.over_budget > 0:
            leaving = self._planner.claim_overrun(instance, row.over_budget)
            if leaving is not None:
                try:
                    await asyncio.gather(*(v.vacated.wait() for v in leaving))
                except asyncio.CancelledError:
                    await until_done(self._lifecycle.discard(instance))
                    raise
                row = self._residency.row(instance.device)  # a victim's bytes may have leaked
            if leaving is None or (row is not None and row.over_budget > 0):
                await self._lifecycle.discard(instance)
                raise RetryLoad(
                    _grown(need, instance.device, 1.0, at_least=measured.total),
                    f"measured {measured.total} bytes, more than the {instance.reserved_bytes} "
                    f"planned, and {instance.device} has no room for the difference",
                )
        self._lifecycle.ready(instance, why)
        assert instance.load_ms is not None
        self._admission.loaded(instance.model_id, instance.load_ms / 1000)
        return instance

    async def _wait_for_room(
        self, instance: Instance, need: Mapping[str, int], claim: int | None = None
    ) -> None:
        """Wait for this load's victims to leave, then until its bytes fit the device.

        Other loads' victims may still be leaving, and a leak may have kept bytes:
        allocation starts only once used + this reservation (``claim``, by default the
        instance's reserved bytes) fits the capacity.
        """
        victims = [i for i in self._residency.instances.values() if i.victim_of == instance.key]
        await asyncio.gather(*(v.vacated.wait() for v in victims))
        clock = self._context.clock
        deadline = clock.now() + self._context.settings.load_wait_timeout
        claim = instance.reserved_bytes if claim is None else claim
        while (row := self._residency.row(instance.device)) is not None and (
            row.used + claim > row.capacity
        ):
            if clock.now() >= deadline:
                await self._lifecycle.discard(instance)
                raise RetryLoad(need, f"memory on {instance.device} did not come back as planned")
            await self._context.signals.wait(ROOM_POLL_S)

    async def wake(self, instance: Instance) -> Instance:
        """Make room on its device (evicting by the policy, as a load does), then wake it."""
        leaving = await self._planner.place_wake(instance)
        await asyncio.gather(*(v.vacated.wait() for v in leaving))
        if instance.state is InstanceState.WAITING:
            # As for a load: a victim's memory may not have come back (a leak).
            need = instance.wake_bytes
            try:
                await self._wait_for_room(instance, {instance.device: need}, claim=need)
            except RetryLoad as exc:
                raise Unavailable(
                    f"{instance.model_id} was asleep and could not wake: {exc.reason}",
                    code="insufficient_memory",
                    retry_after=max(self._context.settings.min_residency, 1.0),
                ) from None
        await self._lifecycle.wake(instance)
        return instance


def _grown(
    need: Mapping[str, int], device: str, factor: float, *, at_least: int = 0
) -> dict[str, int]:
    grown = dict(need)
    grown[device] = max(int(need[device] * factor), at_least)
    return grown
