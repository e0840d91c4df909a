"""Replicas of one version: which ready one serves a request, and when to add one.

Most versions run one instance. A version with ``replicas`` keeps that many; with
``max_replicas`` it may add one while every ready replica is busy (at least
``scale_up_queue`` requests in flight or queued on each). The routing policy
(``routing`` option, else the scheduler's) ranks the ready replicas. Decisions
only: the coordinator starts the loads.
"""

from __future__ import annotations

from policies.registry import create as create_policy
from policies.routing import Candidate, RouteRequest, RoutingPolicy
from routerd.instance import Instance
from routerd.scheduler.context import Context
from routerd.states import InstanceState
from routerd.version_options import options_of
from state import VersionRecord


class Replicas:
    """Routes among a version's replicas and decides when another one is due."""

    def __init__(self, context: Context) -> None:
        self._context = context
        self._policies: dict[str, RoutingPolicy] = {}  # by name; some keep counters

    def route(self, record: VersionRecord, replicas: list[Instance]) -> Instance | None:
        """The READY replica the routing policy ranks first, or None if none is ready."""
        ready = [i for i in replicas if i.state is InstanceState.READY]
        if len(ready) <= 1:
            return ready[0] if ready else None
        name = options_of(record).routing or self._context.settings.routing
        ranked = self._policy(name).rank(
            RouteRequest(record.model_id),
            [
                Candidate(
                    key=i.key,
                    device=i.device,
                    resident=i.state is InstanceState.READY,
                    in_flight=i.in_flight,
                    queued=i.queued,
                )
                for i in replicas
            ],
        )
        by_key = {i.key: i for i in ready}
        return next((by_key[c.key] for c in ranked if c.key in by_key), ready[0])

    def _policy(self, name: str) -> RoutingPolicy:
        if name not in self._policies:
            self._policies[name] = create_policy("routing", name)
        return self._policies[name]

    @staticmethod
    def to_add(record: VersionRecord, replicas: list[Instance]) -> int | None:
        """The replica number to add now, or None.

        One when below ``replicas``, or when every replica is busy; at most
        ``max_replicas``; never while one of them is not ready yet (one replica
        load at a time per version).
        """
        options = options_of(record)
        if not options.several and replicas:
            return None  # the usual version: one instance, and it exists
        maximum = options.max_replicas
        if len(replicas) >= maximum or any(i.state is not InstanceState.READY for i in replicas):
            return None
        busy = all(i.in_flight + i.queued >= options.scale_up_queue for i in replicas)
        if len(replicas) >= options.replicas and not busy:
            return None
        taken = {i.replica for i in replicas}
        return next(n for n in range(maximum) if n not in taken)
