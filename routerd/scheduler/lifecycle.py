"""Lifecycle: the one module that moves instances between states, and alone adds them
to the residency table and removes them from it (DESIGN.md rule 1).

Each method is one step of an instance's life; every move goes through
``Instance.move_to``, and so through ``routerd.states.TRANSITIONS``, and signals a
change (observers see every state an instance takes). Every change to the ledger made
here (a move, a claim, a measurement, a leak) is followed by ``Residency.check``, which
asserts the ledger's invariant where settings turn checks on (tests). Who calls what:

- ``create`` — planning, when it commits a plan: the instance is ``waiting``, its
  bytes claimed. ``claim_victims`` — planning (and the swap, for an overrun): the
  victims start ``draining`` and leave in the background (``evict``).
- ``load`` then ``ready`` — the swap, once its victims are gone: ``loading`` →
  ``warming`` → measured → ``ready``. ``discard`` undoes a load that failed.
- ``claim_wake`` then ``wake`` — the swap, for an instance in the host tier
  (``sleeping`` or ``offloaded``): it comes back without a load.
- ``evict`` — operators and claims: drain, then move to the host-RAM tier (the
  engine's sleep, or routerd's offload) or unload, verify the memory came back.
  ``expire`` — the keep-alive reaper. The tier makes room for a newcomer by
  dropping what it holds, least recently used first (``gone``).
- ``fail`` then ``retire`` — the coordinator, on an ``InstanceFailed`` message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from backends.base import (
    WARMING_UP,
    Backend,
    Footprint,
    LoadProgress,
    LoadSpec,
    Offloadable,
    Sleepable,
)
from contract.errors import OutOfMemory
from routerd.batcher import Batcher
from routerd.errors import LoadFailed
from routerd.instance import Instance
from routerd.messages import Post
from routerd.scheduler import records
from routerd.scheduler.context import Context
from routerd.scheduler.residency import Residency
from routerd.scheduler.settings import Failure, Leak
from routerd.states import InstanceState
from routerd.version_options import batching_policy, options_of
from state import VersionRecord

log = logging.getLogger("routerd.scheduler")

T = TypeVar("T")


class Lifecycle:
    """Moves instances through their states; see the module docstring."""

    def __init__(self, context: Context, residency: Residency, post: Post) -> None:
        self._context = context
        self._residency = residency
        self._post = post  # where instances send health and progress
        self._tier_lock = asyncio.Lock()  # one victim at a time makes room in the host tier

    def _move(self, instance: Instance, target: InstanceState) -> None:
        """Every move is checked against the table and is a change others may wait for.

        Only a move into ``ready`` can give the keep-alive reaper something new to
        expire; it is not woken for the others (a load makes several)."""
        was = instance.state
        instance.move_to(target)
        self._residency.check(f"{instance.key} on {instance.device}: {was} → {target}")
        self._context.signals.changed(wake_reaper=target is InstanceState.READY)

    # -- coming in --------------------------------------------------------------

    def create(
        self, record: VersionRecord, device: str, *, reserved: int, estimated: int, replica: int
    ) -> Instance:
        """A new ``waiting`` instance of ``record`` on ``device``, claiming ``reserved`` bytes."""
        clock = self._context.clock
        keep_alive = options_of(record).keep_alive
        instance = Instance(
            record,
            device,
            reserved_bytes=reserved,
            estimated_bytes=estimated,
            keep_alive=(self._context.settings.keep_alive if keep_alive is None else keep_alive),
            now=clock.now(),
            wall=clock.wall,
            replica=replica,
        )
        instance.post = self._post
        self._residency.add(instance)
        self._residency.check(f"{instance.key} placed on {device}, claiming {reserved} bytes")
        return instance

    def claim_victims(self, keys: Sequence[str], claimant: str, reason: str) -> list[Instance]:
        """Start draining ``keys`` to make room for ``claimant``; they leave in the background."""
        leaving = [self._residency.instances[key] for key in keys]
        for victim in leaving:
            victim.victim_of = claimant
            self._residency.check(f"{victim.key} claimed as a victim by {claimant}")
            self._drain(victim)
            self._context.background.spawn(
                self.evict(victim, reason=reason, trigger=claimant), name=f"evict {victim.key}"
            )
        return leaving

    async def load(self, instance: Instance, backend: Backend, spec: LoadSpec) -> Footprint:
        """Load, warm up and measure ``instance`` on its own thread.

        Out of memory: the instance is discarded and ``OutOfMemory`` raised (the swap
        retries). Any other failure: discarded, logged, and raised as ``LoadFailed``.
        """
        record = instance.record
        self._move(instance, InstanceState.LOADING)
        log.debug("loading %s on %s", record.model_id, instance.device)
        spec = replace(spec, progress=instance.report_progress, grant_bytes=instance.reserved_bytes)
        instance.profile_known = spec.known is not None
        try:
            model = await self._settled(instance, backend.load, spec, keep=instance.attach)
            instance.attach(model)
            self._move(instance, InstanceState.WARMING)
            instance.progress = LoadProgress(WARMING_UP)
            await self._settled(instance, model.warm_up)
            measured: Footprint = await self._settled(instance, model.measure_footprint)
        except BaseException as exc:
            await until_done(self.discard(instance))
            if isinstance(exc, OutOfMemory):
                raise
            records.load_failed(self._context, instance, "loading", exc)
            if isinstance(exc, Exception):
                raise LoadFailed(
                    f"loading {record.model_id} failed: {records.reason_of(exc)}"
                ) from exc
            raise  # cancelled: it stays a cancellation
        instance.measured = measured
        self._residency.check(
            f"{instance.key} measured at {measured.total} bytes, "
            f"{instance.reserved_bytes} claimed, on {instance.device}"
        )
        return measured

    async def _settled(
        self,
        instance: Instance,
        fn: Callable[..., T],
        /,
        *args: object,
        keep: Callable[[T], object] | None = None,
    ) -> T:
        """``fn(*args)`` on the instance's thread, cancellable only at its end.

        A cancellation (nobody waits for the load any more) is passed to the backend
        (its next progress report raises ``LoadCancelled``), but this still waits for
        the thread to return: only then is it known what the thread holds, and only
        then may the caller unload it and give its reservation back. ``keep`` gets what
        the thread returned after a cancellation (a loaded model, to be unloaded)."""
        work = instance.submit(fn, *args)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            instance.cancel_load()
            await until_done(work)
            if keep is not None and not work.cancelled() and work.exception() is None:
                keep(work.result())
            raise

    def ready(self, instance: Instance, why: str) -> None:
        """A loaded, measured instance starts taking leases."""
        measured = instance.measured
        assert measured is not None
        records.remember_footprint(self._context, instance, measured)
        self._attach_batcher(instance)
        instance.max_failures = self._context.settings.max_failures
        instance.stop_timeout = self._context.settings.stop_timeout
        now = self._context.clock.now()
        instance.load_ms = (now - instance.placed_at) * 1000
        instance.progress = None
        instance.loaded_at = instance.touched = now
        self._move(instance, InstanceState.READY)
        history = self._residency.history
        history.loaded(instance.model_id, instance.device, now - instance.placed_at, "disk")
        records.loaded(self._context, instance, why, history.comeback(instance.model_id, now))
        self._context.signals.changed()

    def _attach_batcher(self, instance: Instance) -> None:
        policy = batching_policy(options_of(instance.record).batching, instance.device)
        instance.attach_batcher(Batcher(instance, policy, on_batch=self._observe_batch))

    def claim_wake(self, instance: Instance) -> None:
        """An instance in the host tier claims its device bytes back while its victims
        leave.

        It may have been dropped while its wake-up waited for room (an operator, the
        tier making room): then it is gone and there is nothing to claim (``wake``
        does nothing, and the request that wanted it loads it afresh)."""
        if not instance.state.resting:
            return
        self._move(instance, InstanceState.WAITING)
        instance.vacated.clear()
        self._context.signals.changed()

    async def wake(self, instance: Instance, why: str = "request") -> None:
        """Bring a claimed instance back from the host tier: its weights return to the
        device, with neither a read from disk nor a warm-up. A ``load`` event says
        where they came from (``source``: ``sleep`` or ``host``)."""
        if instance.state is not InstanceState.WAITING:
            return  # it left before its wake-up could be claimed (``claim_wake``)
        record = instance.record
        self._move(instance, InstanceState.LOADING)
        model = instance.loaded_model
        clock = self._context.clock
        started = clock.now()
        need = instance.wake_bytes
        source = instance.tier
        try:
            if isinstance(model, Sleepable) and source == "sleep":
                await model.wake_up()
            else:
                assert isinstance(model, Offloadable)
                await instance.run(model.restore)
        except BaseException as exc:
            await self.discard(instance)
            records.load_failed(self._context, instance, "waking", exc)
            if isinstance(exc, Exception):
                raise LoadFailed(
                    f"waking {record.model_id} failed: {records.reason_of(exc)}"
                ) from exc
            raise
        instance.host_bytes = 0
        instance.tier = None
        if source == "host":
            self._attach_batcher(instance)
        self._move(instance, InstanceState.READY)
        instance.loaded_at = instance.touched = clock.now()
        history = self._residency.history
        history.loaded(instance.model_id, instance.device, clock.now() - started, str(source))
        comeback = history.comeback(instance.model_id, clock.now())
        records.back(self._context, instance, source, why, need, clock.now() - started, comeback)
        self._context.signals.changed()

    def _observe_batch(self, instance: Instance, rows: int) -> None:
        observer = self._context.journal.observer
        if observer is not None:
            observer.batch(instance.record, rows)

    # -- going out --------------------------------------------------------------

    def _drain(self, instance: Instance) -> None:
        if instance.state is not InstanceState.DRAINING:
            self._move(instance, InstanceState.DRAINING)

    def expire(self, instance: Instance, reason: str) -> None:
        """The reaper found ``instance`` idle past its limit: drain it, then move it to
        the host tier or unload it."""
        self._drain(instance)
        keep = reason == "ttl"  # an extra replica leaving (scale-down) is not worth keeping
        self._context.background.spawn(
            self.evict(instance, reason=reason, trigger=None, keep=keep),
            name=f"expire {instance.key}",
        )

    async def evict(
        self,
        instance: Instance,
        *,
        reason: str,
        trigger: str | None,
        force: bool = False,
        keep: bool | None = None,
    ) -> None:
        """Drain ``instance`` (``force``: end its live requests), then move it to the
        host tier or unload it.

        ``keep`` (by default: when a load claimed it, ``trigger``): its weights may
        stay in the host-RAM tier if its model can leave them there and they fit the
        tier (``Residency.tier_for``). An operator's eviction does not keep them, and
        an instance already in the tier leaves it. Whatever is unloaded has its memory
        verified back.
        """
        self._residency.history.left(instance.model_id, self._context.clock.now(), trigger)
        self._drain(instance)
        if force:
            instance.revoke(f"{instance.model_id} was evicted by an operator")
        self._context.signals.changed()
        await instance.idle.wait()
        keep = trigger is not None if keep is None else keep
        tier = self._residency.tier_for(instance) if keep and not force else None
        if tier is not None and await self._to_tier(instance, tier, reason=reason, trigger=trigger):
            return
        await self._unload_and_verify(instance, reason=reason, trigger=trigger)

    async def _unload_and_verify(
        self, instance: Instance, *, reason: str, trigger: str | None
    ) -> None:
        clock = self._context.clock
        resident_s = clock.now() - instance.loaded_at
        freed = instance.device_bytes
        host_bytes = instance.host_bytes
        before = self._residency.our_usage(instance.device)
        leak: Leak | None = None
        try:
            await self._unload(instance)
            if await self._verify_release(instance.device, before, freed):
                leak = Leak(instance.model_id, instance.device, freed)
        finally:
            self._forget(instance, leak)
        records.evicted(self._context, instance, reason, trigger, freed, host_bytes, resident_s)
        if leak is not None:
            self._record_leak(instance, leak, f"memory not back after {self._release_timeout:g}s")
            log.error(
                "%s: %d bytes on %s not released after eviction; kept in the ledger",
                instance.model_id,
                freed,
                instance.device,
            )

    @property
    def _release_timeout(self) -> float:
        return self._context.settings.release_timeout

    async def _to_tier(
        self, instance: Instance, tier: str, *, reason: str, trigger: str | None
    ) -> bool:
        """Move a drained instance's weights to the host tier (``tier``: ``"sleep"``,
        the engine's own sleep, or ``"host"``, routerd's offload); it stays an
        instance, its device bytes come back. False if it could not (it then unloads).

        The tier's room is made and claimed before the weights move, one victim at a
        time: what the tier holds least recently used is dropped first (gone), and two
        victims entering at once never count on the same free bytes."""
        measured = instance.measured
        assert measured is not None
        claims = self._residency.host_claims
        async with self._tier_lock:
            dropping = self._residency.tier_room(measured.weights)
            if dropping is None:
                return False
            for resting in dropping:
                self._drain(resting)  # in this step: none of them may start coming back
            await asyncio.gather(
                *(
                    self.evict(r, reason="host-tier-full", trigger=instance.key, keep=False)
                    for r in dropping
                )
            )
            if self._residency.tier_free() < measured.weights:
                return False
            claims[instance.key] = measured.weights
            self._residency.check(f"{instance.key} claimed {measured.weights} bytes of the tier")
        clock = self._context.clock
        started = clock.now()
        try:
            if tier == "sleep":
                model = instance.loaded_model
                assert isinstance(model, Sleepable)
                await model.sleep()
            else:
                await self._offload(instance)
        except BaseException as exc:
            del claims[instance.key]
            self._residency.check(f"{instance.key}'s claim on the host tier given up")
            if not isinstance(exc, Exception):
                raise
            log.warning(
                "%s could not move to the host tier (%s); unloading it", instance.model_id, exc
            )
            return False
        instance.host_bytes = claims.pop(instance.key)
        instance.tier = tier
        self._move(instance, InstanceState.SLEEPING if tier == "sleep" else InstanceState.OFFLOADED)
        instance.victim_of = None
        instance.vacated.set()
        records.rested(self._context, instance, reason, trigger, clock.now() - started)
        self._context.signals.changed()
        return True

    async def _offload(self, instance: Instance) -> None:
        """routerd's own offload: the batcher and the thread go, the model keeps its
        weights in host memory and releases the rest; on a GPU the device must show
        all of the instance's bytes back, or the offload failed (and it unloads)."""
        self._move(instance, InstanceState.OFFLOADING)
        batcher = instance.detach_batcher()
        if batcher is not None:
            await batcher.close()
        model = instance.loaded_model
        assert isinstance(model, Offloadable)
        before = self._residency.our_usage(instance.device)
        await instance.run(model.offload)
        instance.close_executor()
        if await self._verify_release(instance.device, before, instance.bytes):
            raise RuntimeError(
                f"{instance.device} did not show {instance.bytes} bytes back after the offload"
            )

    async def discard(self, instance: Instance) -> None:
        """Remove an instance that never became ready, giving back what it took.

        One still waiting for its victims holds no memory, only a claim: the claim is
        withdrawn first, so the ledger never counts it as held while it leaves. A
        loaded model (warm-up failed, or it measured too large) is unloaded and its
        memory verified back, as an eviction's is: what does not come back stays in
        the ledger as leaked, or the next plan would count on bytes the device lacks.
        (A failed wake-up is not verified: what it held is not known.)
        """
        if instance.state is InstanceState.WAITING and instance.loaded_model is None:
            self._residency.remove(instance)
        loaded = instance.loaded_model is not None and not instance.host_bytes
        freed = instance.device_bytes
        before = self._residency.our_usage(instance.device) if loaded else None
        leak: Leak | None = None
        try:
            await self._unload(instance)
            if await self._verify_release(instance.device, before, freed):
                overrun = max(freed - instance.reserved_bytes, 0)  # measured above its grant
                leak = Leak(instance.model_id, instance.device, freed, overrun)
        finally:
            self._forget(instance, leak)
        if leak is not None:
            self._record_leak(instance, leak, "memory not back after a failed load")

    async def _unload(self, instance: Instance) -> None:
        self._move(instance, InstanceState.UNLOADING)
        batcher = instance.detach_batcher()
        if batcher is not None:
            await batcher.close()
        model = instance.detach()
        try:
            if model is not None:
                await instance.run(model.unload)
        finally:
            instance.close_executor()

    def _forget(self, instance: Instance, leak: Leak | None = None) -> None:
        self._residency.remove(instance)
        self._gone(instance, leak)

    def _gone(self, instance: Instance, leak: Leak | None = None) -> None:
        """``instance`` is gone; ``leak``, if any, holds its bytes from the same step on,
        so that they neither leave the ledger for an instant nor count twice."""
        if leak is not None:
            self._residency.leaks.append(leak)
        self._move(instance, InstanceState.GONE)
        instance.host_bytes = 0
        instance.gone.set()
        instance.vacated.set()
        self._context.signals.changed()

    async def _verify_release(self, device: str, before: int | None, freed: int) -> bool:
        """True (leaked) unless the device shows ~``freed`` bytes back in time."""
        if before is None or freed <= 0:
            return False
        clock = self._context.clock
        deadline = clock.now() + self._release_timeout
        while True:
            now_usage = self._residency.our_usage(device)
            if now_usage is None or before - now_usage >= int(freed * 0.9):
                return False
            if clock.now() >= deadline:
                return True
            await clock.sleep(min(0.05, max(deadline - clock.now(), 0)))

    def _record_leak(self, instance: Instance, leak: Leak, reason: str) -> None:
        self._context.journal.record(
            "leak", instance.record, device=leak.device, reason=reason, bytes=leak.bytes
        )

    # -- failed instances ---------------------------------------------------------

    def fail(self, instance: Instance, reason: str) -> bool:
        """Take a failed instance out of service: ``failed``, out of the table, retiring.

        Its live requests are told to stop; its bytes stay in the ledger (as retiring)
        until ``retire`` has unloaded it. False if it was already leaving.
        """
        if instance.state is not InstanceState.READY:
            return False  # already leaving
        if self._residency.get(instance.key) is not instance:
            return False
        record = instance.record
        previous = self._residency.failures.get(instance.model_id)
        self._residency.failures[instance.model_id] = Failure(
            model=record.name,
            version=record.version,
            device=instance.device,
            reason=reason,
            at=self._context.clock.wall(),
            times=1 + (previous.times if previous is not None else 0),
        )
        self._context.journal.record(
            "failed",
            record,
            device=instance.device,
            reason=reason,
            detail={"failures_in_a_row": instance.failures},
        )
        log.error("%s on %s failed: %s; unloading it", instance.key, instance.device, reason)
        self._move(instance, InstanceState.FAILED)
        instance.revoke(f"{instance.model_id} failed and is being restarted: {reason}")
        self._residency.remove(instance)
        self._residency.retiring.append(instance)
        self._residency.check(f"{instance.key} on {instance.device} failed, retiring")
        self._context.signals.changed()
        return True

    async def retire(self, instance: Instance) -> None:
        """Unload a failed instance; a thread stuck in the model is given up on.

        Live requests get ``stop_timeout`` to stop. An unload that does not finish
        within ``release_timeout`` (its thread is still stuck) goes on in the
        background, and its bytes are reported as leaked until it does.
        """
        clock = self._context.clock
        with contextlib.suppress(TimeoutError):
            await clock.wait_for(instance.idle.wait(), self._context.settings.stop_timeout)
        freed = instance.bytes
        before = self._residency.our_usage(instance.device)
        unload = asyncio.ensure_future(self._unload(instance))
        with contextlib.suppress(TimeoutError):
            await clock.wait_for(asyncio.shield(unload), self._release_timeout)
        done = unload.done()
        leaked = not done
        if done and unload.exception() is not None:
            log.error("unloading failed %s: %s", instance.key, unload.exception())
        elif done:
            leaked = await self._verify_release(instance.device, before, freed)
        leak = Leak(instance.model_id, instance.device, freed) if leaked else None
        self._residency.retiring.remove(instance)
        self._gone(instance, leak)
        self._context.journal.record(
            "evict", instance.record, device=instance.device, reason="failed", bytes=freed
        )
        if leak is not None:
            self._record_leak(instance, leak, "a failed instance did not unload in time")
            if not done:
                unload.add_done_callback(lambda _: self._unleak(leak))
        self._context.signals.changed()

    def _unleak(self, leak: Leak) -> None:
        """A stuck unload finished after all: its bytes are free again."""
        if leak in self._residency.leaks:
            self._residency.leaks.remove(leak)
            self._residency.check(f"{leak.model_id}'s leak of {leak.bytes} bytes came back")
            self._context.signals.changed()


async def until_done(work: Awaitable[Any]) -> None:
    """Wait for ``work`` (a future, or a coroutine run as a task) to finish, whatever
    cancels the waiter meanwhile (its result or error stays in the future): for what
    must end before anything is given back."""
    work = asyncio.ensure_future(work)
    while not work.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([work])
