"""Planning: what a load needs, where it goes, and which instances make room.

It asks the pure placement and eviction policies (DESIGN.md rule 2) over a
snapshot of the ledger and the residents, and commits a plan in the same step that
computed it: the claimant is created (its bytes claimed) and its victims start to
drain, through the lifecycle. A refusal that may pass (victims busy or too young)
is waited out on the scheduler's clock, up to ``load_wait_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

from backends.base import Backend, Footprint, LoadSpec
from contract.errors import BackendError
from policies.types import LoadRequest, Plan, Refusal, Resident
from routerd.errors import Draining, LoadFailed, Unavailable
from routerd.instance import Instance
from routerd.scheduler.admission import Admission
from routerd.scheduler.context import Context
from routerd.scheduler.lifecycle import Lifecycle
from routerd.scheduler.residency import Residency
from routerd.version_options import SCHEDULER_OPTIONS, batching_policy, options_of
from state import StoreError, VersionRecord

log = logging.getLogger("routerd.scheduler")

PLAN_POLL_S = 0.25
"""How often a refused plan is tried again when nothing has signalled a change."""


class Planner:
    """Turns a load into a committed plan; see the module docstring."""

    def __init__(
        self,
        context: Context,
        residency: Residency,
        admission: Admission,
        lifecycle: Lifecycle,
    ) -> None:
        self._context = context
        self._residency = residency
        self._admission = admission
        self._lifecycle = lifecycle

    # -- what a load needs ---------------------------------------------------------

    async def estimates(self, record: VersionRecord, backend: Backend) -> dict[str, Footprint]:
        """The backend's estimate per device kind, from the checkpoint."""
        estimates: dict[str, Footprint] = {}
        for device_id in self._context.devices.device_ids():
            kind = device_id.split(":")[0]
            if kind in estimates:
                continue
            spec = self.spec(record, device_id)
            try:
                estimate = await asyncio.to_thread(backend.estimate_footprint, spec)
            except (BackendError, OSError, ValueError) as exc:
                self._context.journal.record(
                    "load_failed", record, device=device_id, reason=str(exc)
                )
                raise LoadFailed(f"cannot load {record.model_id}: {exc}") from exc
            estimates[kind] = estimate
        return estimates

    def need(self, record: VersionRecord, estimates: Mapping[str, Footprint]) -> dict[str, int]:
        """Bytes to claim per device: the stored measurement if any, else the estimate.

        Never less than the estimate's ``minimum``, what the backend cannot start
        without: a measurement may miss memory an engine sets aside at start, and a
        grant learned from it would then be refused by the next load.
        """
        need: dict[str, int] = {}
        for device_id in self._context.devices.device_ids():
            kind = device_id.split(":")[0]
            estimate = estimates[kind]
            stored = self._context.store.measured_footprint(record.name, record.version, kind)
            if stored is not None and getattr(stored, "measured_bytes", None):
                claim = int(stored.measured_bytes)
            else:
                claim = estimate.total
            need[device_id] = max(claim, estimate.minimum)
        return need

    def known(self, record: VersionRecord, device: str, estimate: Footprint) -> Footprint | None:
        """The footprint a load on ``device`` may trust instead of profiling: the stored
        measurement for that kind of device, if it was made when the backend estimated
        what it estimates now. An equal estimate means the same checkpoint, options,
        batch limits and context; any change to them changes the estimate, and the
        instance profiles again (as it does where nothing was stored, or the store
        cannot be read)."""
        kind = device.split(":")[0]
        try:
            stored = self._context.store.measured_footprint(record.name, record.version, kind)
        except StoreError:
            return None
        if stored is None or stored.estimated_bytes != estimate.total:
            return None
        return Footprint(
            weights=stored.weights_bytes,
            runtime=stored.runtime_bytes,
            working=stored.working_bytes,
        )

    def spec(self, record: VersionRecord, device: str) -> LoadSpec:
        """What the backend loads (or estimates) for ``record`` on ``device``: the
        backend's own options, and the batch limits its instance's batcher will keep to
        on that kind of device, which size its KV cache."""
        policy = batching_policy(options_of(record).batching, device)
        return LoadSpec(
            name=record.name,
            version=record.version,
            path=record.path,
            options={k: v for k, v in record.options.items() if k not in SCHEDULER_OPTIONS},
            device=device,
            batch_rows=policy.max_rows,
            batch_tokens=policy.max_tokens or 0,
        )

    # -- placing a load -----------------------------------------------------------

    async def place(
        self,
        record: VersionRecord,
        preferences: Sequence[str],
        need: Mapping[str, int],
        estimates: Mapping[str, Footprint],
        eviction_reason: str | None,
        *,
        replica: int = 0,
    ) -> Instance:
        """Plan until a plan comes (committed at once) or the wait runs out.

        An extra replica (``replica`` > 0) is only added where memory allows it now:
        it neither waits nor evicts anything. ``eviction_reason`` replaces the
        policy's name in the victims' events (a retry after running out of memory).
        """
        clock = self._context.clock
        settings = self._context.settings
        deadline = clock.now() + settings.load_wait_timeout
        key = record.model_id if replica == 0 else f"{record.model_id}#{replica}"
        request = LoadRequest(key, preferences, need)
        while True:
            if self._context.closing:
                raise Draining("routerd is shutting down", retry_after=5)
            decision, residents = self._decide(request, exclude=None)
            if isinstance(decision, Plan) and (replica == 0 or not decision.evict):
                return self._commit(
                    record, decision, residents, need, estimates, eviction_reason, replica
                )
            if replica:
                raise Unavailable(f"no free room for another replica of {record.model_id}")
            assert isinstance(decision, Refusal)
            self._refused(record, decision, deadline)
            await self._context.signals.wait(min(deadline - clock.now(), PLAN_POLL_S))

    def _decide(
        self, request: LoadRequest, exclude: str | None
    ) -> tuple[Plan | Refusal, list[Resident]]:
        """The placement policy's decision, and the residents it was made over."""
        rooms, residents = self._residency.planning_view(self._admission.waiting)
        if exclude is not None:
            residents = [r for r in residents if r.model_id != exclude]
        settings = self._context.settings
        decision = self._context.placement.place(
            request,
            rooms,
            residents,
            now=self._context.clock.now(),
            min_residency=settings.min_residency,
        )
        return decision, residents

    def _refused(self, record: VersionRecord, refusal: Refusal, deadline: float) -> None:
        """Raise 503 for a final refusal, or for a passing one whose wait ran out."""
        settings = self._context.settings
        if not refusal.retry:
            self._context.journal.record("load_failed", record, reason=refusal.reason)
            raise Unavailable(refusal.reason, code="insufficient_memory")
        if deadline - self._context.clock.now() <= 0:
            self._context.journal.record("load_failed", record, reason=refusal.reason)
            raise Unavailable(
                f"{refusal.reason} (waited {settings.load_wait_timeout:g}s)",
                code="insufficient_memory",
                retry_after=max(settings.min_residency, 1.0),
            )

    def _commit(
        self,
        record: VersionRecord,
        plan: Plan,
        residents: Sequence[Resident],
        need: Mapping[str, int],
        estimates: Mapping[str, Footprint],
        eviction_reason: str | None,
        replica: int,
    ) -> Instance:
        """Make the plan true in one step: the new instance claims its bytes, victims drain."""
        instance = self._lifecycle.create(
            record,
            plan.device,
            reserved=need[plan.device],
            estimated=estimates[plan.device.split(":")[0]].total,
            replica=replica,
        )
        reason = eviction_reason or self._context.placement.eviction.name
        self._raise_floor(plan, residents)
        self._lifecycle.claim_victims(plan.evict, instance.key, reason)
        if plan.evict:
            log.info(
                "placing %s on %s: evicting %s (%s)",
                record.model_id,
                plan.device,
                ", ".join(plan.evict),
                reason,
            )
        self._context.signals.changed()
        return instance

    def _raise_floor(self, plan: Plan, residents: Sequence[Resident]) -> None:
        """A policy that ranks by priority (GDSF) ages its device: the device's eviction
        clock rises to the highest priority among the victims (``History.evicted``), as
        they were weighed when the plan was made."""
        priority = getattr(self._context.placement.eviction, "priority", None)
        if priority is None or not plan.evict:
            return
        chosen = [priority(r) for r in residents if r.model_id in plan.evict]
        if chosen:
            self._residency.history.evicted(plan.device, max(chosen))

    # -- room for a wake-up or an overrun ----------------------------------------------

    async def place_wake(self, instance: Instance) -> list[Instance]:
        """Claim room on a sleeping instance's own device; the victims that leave for it."""
        record = instance.record
        clock = self._context.clock
        settings = self._context.settings
        need = instance.wake_bytes
        request = LoadRequest(instance.key, [instance.device], {instance.device: need})
        deadline = clock.now() + settings.load_wait_timeout
        while True:
            decision, _ = self._decide(request, exclude=instance.key)
            if isinstance(decision, Plan):
                break
            if not decision.retry or clock.now() >= deadline:
                raise Unavailable(
                    f"{record.model_id} is asleep and {instance.device} has no room to wake it: "
                    f"{decision.reason}",
                    code="insufficient_memory",
                    retry_after=max(settings.min_residency, 1.0),
                )
            await self._context.signals.wait(PLAN_POLL_S)
        leaving = self._lifecycle.claim_victims(
            decision.evict, instance.key, self._context.placement.eviction.name
        )
        self._lifecycle.claim_wake(instance)
        return leaving

    def claim_overrun(self, instance: Instance, overrun: int) -> list[Instance] | None:
        """Victims on the device to cover a measured overrun (``pressure``), or None."""
        _, residents = self._residency.planning_view(self._admission.waiting)
        others = [
            r for r in residents if r.device == instance.device and r.model_id != instance.key
        ]
        victims = self._context.placement.eviction.victims(
            others, need=overrun, free=0, now=self._context.clock.now(), min_residency=0.0
        )
        if victims is None:
            return None
        return self._lifecycle.claim_victims(victims, instance.key, "pressure")
