"""Eviction: which idle instances to unload so a load fits on one device.

Pure (DESIGN.md rule 2). A policy never picks an instance with a live lease, a
pinned one, or one resident for less than ``min_residency`` (anti-thrash): those are
filtered out before the policy orders the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from policies.types import Resident


class EvictionPolicy(Protocol):
    """Called by the placement policy, once per candidate device, while planning."""

    name: str

    def victims(
        self,
        residents: Sequence[Resident],
        *,
        need: int,
        free: int,
        now: float,
        min_residency: float,
    ) -> tuple[str, ...] | None:
        """Model ids to evict (in order) so that ``free`` grows to ``need``; None if
        the instances evictable now cannot free enough."""
        ...


class LeastRecentlyUsed:
    """Evict the least recently used idle instances first, stopping once enough is free.

    Decision tree:
    1. ``need <= free`` → nothing to evict.
    2. Keep only instances evictable now (idle, unpinned, past min residency).
    3. Take them — those that would only be put to sleep (cheap to restore) first,
       then oldest ``last_used`` first — until ``free`` reaches ``need`` → those.
    4. Still short after all of them → None (the caller waits or refuses).
    """

    name = "lru"

    def victims(
        self,
        residents: Sequence[Resident],
        *,
        need: int,
        free: int,
        now: float,
        min_residency: float,
    ) -> tuple[str, ...] | None:
        if need <= free:
            return ()
        chosen: list[str] = []
        for resident in sorted(
            (r for r in residents if r.evictable(now, min_residency)),
            key=lambda r: (not r.sleeps, r.last_used, r.model_id),
        ):
            chosen.append(resident.model_id)
            free += resident.bytes
            if free >= need:
                return tuple(chosen)
        return None


class FurthestNextUse:
    """Belady's rule: evict the instances whose next request is furthest away.

    It needs the future, so only the simulator, which has the whole trace, can run
    it; it is not in the registry. ``next_use(model_id, now)`` is when the model is
    next asked for after ``now`` (``math.inf``: never again). For models of equal
    size and load cost no policy makes fewer loads, which makes it the bound the
    simulator measures real policies against; otherwise it is only a reference.

    Decision tree:
    1. ``need <= free`` → nothing to evict.
    2. Keep only instances evictable now (idle, unpinned, past min residency).
    3. Take them, the one needed furthest in the future first, until ``free``
       reaches ``need`` → those.
    4. Still short after all of them → None.
    """

    name = "belady"

    def __init__(self, next_use: Callable[[str, float], float]) -> None:
        self._next_use = next_use

    def victims(
        self,
        residents: Sequence[Resident],
        *,
        need: int,
        free: int,
        now: float,
        min_residency: float,
    ) -> tuple[str, ...] | None:
        if need <= free:
            return ()
        chosen: list[str] = []
        for resident in sorted(
            (r for r in residents if r.evictable(now, min_residency)),
            key=lambda r: (-self._next_use(r.model_id, now), r.model_id),
        ):
            chosen.append(resident.model_id)
            free += resident.bytes
            if free >= need:
                return tuple(chosen)
        return None


EVICTION_POLICIES: dict[str, type[LeastRecentlyUsed]] = {"lru": LeastRecentlyUsed}
