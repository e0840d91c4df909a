"""Eviction: which idle instances to unload so a load fits on one device.

Pure (DESIGN.md rule 2). A policy never picks an instance with a live lease, a
pinned one, or one resident for less than ``min_residency`` (anti-thrash): those are
filtered out before the policy orders the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

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


def take_in_order(
    residents: Sequence[Resident],
    order: Callable[[Resident], tuple[Any, ...]],
    *,
    need: int,
    free: int,
    now: float,
    min_residency: float,
    spare: Callable[[Resident], float] | None = None,
) -> tuple[str, ...] | None:
    """The common end of every policy: nothing if ``need`` already fits; else the
    instances evictable now, first in ``order`` first, until ``free`` reaches ``need``;
    None when all of them are not enough.

    ``spare``: what losing each one would cost. Taking in order can overshoot — a
    large instance taken last may free enough on its own — so the taken ones are then
    looked at again, the dearest first, and each that is not needed after all stays.
    """
    if need <= free:
        return ()
    taken: list[Resident] = []
    for resident in sorted((r for r in residents if r.evictable(now, min_residency)), key=order):
        taken.append(resident)
        free += resident.bytes
        if free >= need:
            break
    else:
        return None
    if spare is not None:
        for resident in sorted(taken, key=spare, reverse=True):
            if free - resident.bytes >= need:
                taken.remove(resident)
                free -= resident.bytes
    return tuple(r.model_id for r in taken)


class RankedEviction:
    """A policy that is an order: the evictable instances are taken, first in
    ``rank`` first, until enough is free (``take_in_order``). A policy that
    ``gives_back`` says with ``worth`` what losing each would cost, and victims that a
    later one made unneeded are given back, the worthiest first.

    Subclasses set ``name`` (and ``gives_back``) and define ``rank`` (and ``worth``)."""

    name: str
    gives_back = False

    def rank(self, resident: Resident, now: float) -> tuple[Any, ...]:
        raise NotImplementedError

    def worth(self, resident: Resident) -> float:
        return 0.0

    def victims(
        self,
        residents: Sequence[Resident],
        *,
        need: int,
        free: int,
        now: float,
        min_residency: float,
    ) -> tuple[str, ...] | None:
        return take_in_order(
            residents,
            lambda resident: self.rank(resident, now),
            need=need,
            free=free,
            now=now,
            min_residency=min_residency,
            spare=self.worth if self.gives_back else None,
        )


class LeastRecentlyUsed(RankedEviction):
    """Evict the least recently used idle instances first, stopping once enough is free.

    Decision tree:
    1. ``need <= free`` → nothing to evict.
    2. Keep only instances evictable now (idle, unpinned, past min residency).
    3. Take them — those that would only be put to sleep (cheap to restore) first,
       then oldest ``last_used`` first — until ``free`` reaches ``need`` → those.
    4. Still short after all of them → None (the caller waits or refuses).
    """

    name = "lru"

    def rank(self, resident: Resident, now: float) -> tuple[Any, ...]:
        return (not resident.sleeps, resident.last_used, resident.model_id)


class FurthestNextUse(RankedEviction):
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

    def rank(self, resident: Resident, now: float) -> tuple[Any, ...]:
        return (-self._next_use(resident.model_id, now), resident.model_id)


class LeastFrequentlyUsed(RankedEviction):
    """LFU with aging: evict the instances asked for least, recent requests weighing
    more than old ones.

    ``Resident.uses`` is the scheduler's aged count of the version's requests (each
    adds one; the count halves every ``[scheduler] history_half_life_requests``
    requests to the host), so a model that was popular yesterday and is idle today
    loses to one in use now, and a burst does not buy a model a place for ever.

    Decision tree:
    1. ``need <= free`` → nothing to evict.
    2. Keep only instances evictable now (idle, unpinned, past min residency).
    3. Take them — fewest aged uses first; among equals, the least recently used —
       until ``free`` reaches ``need`` → those.
    4. Still short after all of them → None.
    """

    name = "lfu"

    def rank(self, resident: Resident, now: float) -> tuple[Any, ...]:
        return (resident.uses, resident.last_used, resident.model_id)


def expected_reload_s(resident: Resident) -> float:
    """Seconds of reloading that evicting ``resident`` is expected to cost: its aged
    request count times what one reload costs from where it would go (a model with no
    measured reload yet counts its bytes at one second per GB)."""
    reload_s = resident.reload_s if resident.reload_s > 0 else max(resident.bytes, 1) / 1e9
    return max(resident.uses, 1.0) * reload_s


class GreedyDualSizeFrequency(RankedEviction):
    """Greedy-Dual-Size-Frequency: keep what is asked for often, costly to bring back
    and small; evict the rest, the lowest priority first.

    ``priority = floor + uses × reload_s ÷ GB``, where ``uses`` is the aged request
    count, ``reload_s`` what bringing it back would cost from where eviction sends it
    (the host tier if it would rest there, else disk) and GB its size. ``floor`` is
    the device's clock when the instance was last used: the scheduler raises a device's
    clock to the priority of each victim it evicts (``priority``), so an instance not
    used since then competes against newcomers at the older, lower floor — the aging
    that keeps a once-hot model from staying for ever. A model with no measured reload
    yet counts its bytes at one second per GB.

    Decision tree:
    1. ``need <= free`` → nothing to evict.
    2. Keep only instances evictable now (idle, unpinned, past min residency).
    3. Take them — lowest priority first; among equals, the least recently used —
       until ``free`` reaches ``need``.
    4. Still short after all of them → None.
    5. Give back, highest priority first, each taken one that ``free`` can do
       without and still reach ``need`` → the rest.
    """

    name = "gdsf"
    gives_back = True

    def priority(self, resident: Resident) -> float:
        return resident.floor + expected_reload_s(resident) / (max(resident.bytes, 1) / 1e9)

    def rank(self, resident: Resident, now: float) -> tuple[Any, ...]:
        return (self.priority(resident), resident.last_used, resident.model_id)

    def worth(self, resident: Resident) -> float:
        return self.priority(resident)


class LeastReloadCost(RankedEviction):
    """Evict what costs the least reloading for the memory it frees.

    Each instance is weighed by ``expected_reload_s`` — aged uses × measured reload
    seconds from where eviction would send it — per byte it holds: memory is the
    scarce thing, so a 40 GB model must be worth forty 1 GB ones to stay. This is
    GDSF's ranking without GDSF's clock: the uses already fade with every
    ``[scheduler] history_half_life_requests`` requests, so a second aging by
    recency would only count the same thing twice, and on the simulator's steady
    mixed-size traffic it makes GDSF pay for more reloads.

    Decision tree:
    1. ``need <= free`` → nothing to evict.
    2. Keep only instances evictable now (idle, unpinned, past min residency).
    3. Take them — least expected reload seconds per byte first; among equals, the
       least recently used — until ``free`` reaches ``need``.
    4. Still short after all of them → None.
    5. Give back, most expected reload seconds first, each taken one that ``free``
       can do without and still reach ``need`` → the rest.
    """

    name = "cost"
    gives_back = True

    def rank(self, resident: Resident, now: float) -> tuple[Any, ...]:
        return (
            expected_reload_s(resident) / max(resident.bytes, 1),
            resident.last_used,
            resident.model_id,
        )

    def worth(self, resident: Resident) -> float:
        return expected_reload_s(resident)


DEFAULT_EVICTION = "cost"
"""The policy routerd evicts by unless ``[scheduler] eviction`` names another: on the
simulator's four traces (``bench/eviction.py``) it spent the fewest seconds reloading
on mixed sizes and was never worse than ``lru``."""

EVICTION_POLICIES: dict[str, type[RankedEviction]] = {
    "lru": LeastRecentlyUsed,
    "lfu": LeastFrequentlyUsed,
    "gdsf": GreedyDualSizeFrequency,
    "cost": LeastReloadCost,
}
