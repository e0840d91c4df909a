"""Keep-alive: idle instances leave once their time is up.

An instance idle (no lease, nothing queued, nobody waiting for its version) for
its ``keep_alive`` leaves its device (``ttl``): to the host-RAM tier where it can go
there, else unloaded; in the tier, the tier's own LRU decides how long it stays. A
replica beyond a model's ``replicas`` is unloaded after ``scale_down_idle`` if that is
sooner (``scale-down``): the version stays on its device. Pinned versions never
expire. The reaper sleeps on the scheduler's clock until the next
instance runs out (a second at most), or until a change wakes it; when no instance
could run out (every one has no limit, or none is ready) it sleeps for
``QUIET_LOOK_S``: only a change — a new ready instance, a lease ending with a new
keep-alive, a reload — can give it work then, and each of those wakes it.
"""

from __future__ import annotations

import math

from routerd.instance import Instance
from routerd.scheduler.admission import Admission
from routerd.scheduler.context import Context
from routerd.scheduler.lifecycle import Lifecycle
from routerd.scheduler.residency import Residency
from routerd.states import InstanceState
from routerd.version_options import options_of

MAX_LOOK_S = 1.0
"""The reaper looks at least this often, whatever the instances' limits."""

MIN_LOOK_S = 0.01

QUIET_LOOK_S = 3600.0
"""The reaper's look when nothing could run out: a simulator replaying months of a
quiet host's traffic should not pay for a look every second of them."""


class Reaper:
    """Finds instances whose keep-alive ran out and has the lifecycle expire them."""

    def __init__(
        self, context: Context, residency: Residency, admission: Admission, lifecycle: Lifecycle
    ) -> None:
        self._context = context
        self._residency = residency
        self._admission = admission
        self._lifecycle = lifecycle
        self.looks_at = math.inf  # scheduler clock: the reaper's next own look

    def idle_limit(self, instance: Instance) -> tuple[float, str]:
        """How long ``instance`` may stay idle, and the eviction reason when it has.

        Replicas beyond a model's ``replicas`` were added for load; they leave after
        ``scale_down_idle`` (if that is sooner than the keep-alive).
        """
        options = options_of(instance.record)
        if instance.replica >= options.replicas:
            scale_down = options.scale_down_idle
            if scale_down is None:
                scale_down = self._context.settings.scale_down_idle
            if scale_down < instance.keep_alive:
                return scale_down, "scale-down"
        return instance.keep_alive, "ttl"

    def expires_before_look(self, instance: Instance) -> bool:
        """Whether an instance that just went idle runs out before the reaper's next look.

        Only then must a released lease wake the reaper; otherwise its own timer is
        soon enough, and a busy server does not pay a scan of every instance per request.
        """
        limit, _ = self.idle_limit(instance)
        return instance.touched + limit < self.looks_at

    def look(self) -> float:
        """Expire what ran out; seconds until the next instance may (``MAX_LOOK_S`` at
        most while one could, else ``QUIET_LOOK_S``)."""
        now = self._context.clock.now()
        wake = QUIET_LOOK_S
        for instance in list(self._residency.instances.values()):
            if instance.state is not InstanceState.READY:
                continue
            if (
                instance.in_flight
                or instance.queued
                or instance.model_id in self._admission.waiting
                or instance.model_id in self._residency.pinned
            ):
                wake = min(wake, MAX_LOOK_S)
                continue
            limit, reason = self.idle_limit(instance)
            if math.isinf(limit):
                continue
            wake = min(wake, MAX_LOOK_S)
            remaining = instance.touched + limit - now
            if remaining <= 0:
                self._lifecycle.expire(instance, reason)
            else:
                wake = min(wake, remaining)
        return max(wake, MIN_LOOK_S)

    async def run(self) -> None:
        """Look, then sleep until the next expiry or a change; until the scheduler closes."""
        while not self._context.closing:
            wake = self.look()
            self.looks_at = self._context.clock.now() + wake
            await self._context.signals.wait(wake, reaper=True)
