"""Placement: which device a new instance goes on, and what must leave to make room.

Pure (DESIGN.md rule 2): the scheduler passes the request, the devices' room and
the residents; the answer is a ``Plan`` or a ``Refusal`` saying why. No I/O, no
logging — the scheduler records the plan once, when it commits it.

Device preferences expand into tiers, tried in order: ``"auto"`` → [all GPUs],
[cpu]; ``"cuda"`` → [all GPUs]; ``"cuda:N"`` / ``"cpu"`` → that device. A list such as
``["cuda", "cpu"]`` gives one tier per entry.

Decision tree for ``PlacementPolicy.place``:

1. No device matches the preferences → Refusal (final).
2. The instance is larger than every matching device's capacity → Refusal (final),
   naming the bytes needed and the largest device.
3. It fits nowhere even with every unpinned instance gone → Refusal (final): pinned
   instances hold the room.
4. For each tier in order:
   a. devices where it fits now → the strategy chooses one; nothing is evicted.
   b. devices where the eviction policy can free enough now → the one that evicts
      the fewest bytes (the strategy breaks ties).
5. Otherwise → Refusal (retry): room appears when leases end or residency times pass.

Strategies: ``best-fit`` leaves the least free memory behind (packs tightly, keeps
large holes for large models), ``first-fit`` takes the first device in preference
order, ``spread`` leaves the most free memory (balances load across GPUs).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from policies.eviction import EvictionPolicy
from policies.types import DeviceRoom, LoadRequest, Plan, Refusal, Resident

_DEVICE_PREFERENCE = re.compile(r"^(cpu|cuda|cuda:\d+|auto)$")


def is_device_preference(value: str) -> bool:
    """True for values placement understands, so bad config is refused at registration."""
    return bool(_DEVICE_PREFERENCE.match(value))


def expand_tiers(preferences: Sequence[str], device_ids: Sequence[str]) -> list[list[str]]:
    """Preferences → tiers of existing device ids (see module docstring)."""
    gpus = [d for d in device_ids if d.startswith("cuda:")]
    tiers: list[list[str]] = []
    for preference in preferences:
        if preference == "auto":
            tiers += [gpus, ["cpu"] if "cpu" in device_ids else []]
        elif preference == "cuda":
            tiers.append(gpus)
        else:
            tiers.append([preference] if preference in device_ids else [])
    seen: set[str] = set()
    result = []
    for tier in tiers:
        fresh = [d for d in tier if d not in seen]
        seen.update(fresh)
        if fresh:
            result.append(fresh)
    return result


Chooser = Callable[[Sequence[tuple[DeviceRoom, int]]], DeviceRoom]


def _best_fit(options: Sequence[tuple[DeviceRoom, int]]) -> DeviceRoom:
    return min(options, key=lambda o: o[0].free - o[1])[0]


def _first_fit(options: Sequence[tuple[DeviceRoom, int]]) -> DeviceRoom:
    return options[0][0]


def _spread(options: Sequence[tuple[DeviceRoom, int]]) -> DeviceRoom:
    return max(options, key=lambda o: o[0].free - o[1])[0]


STRATEGIES: dict[str, Chooser] = {"best-fit": _best_fit, "first-fit": _first_fit, "spread": _spread}


@dataclass(frozen=True)
class PlacementPolicy:
    """A strategy (how to choose among devices) plus an eviction policy."""

    strategy: str
    eviction: EvictionPolicy

    @property
    def name(self) -> str:
        return self.strategy

    def place(
        self,
        request: LoadRequest,
        devices: Sequence[DeviceRoom],
        residents: Sequence[Resident],
        *,
        now: float,
        min_residency: float,
    ) -> Plan | Refusal:
        rooms = {d.id: d for d in devices}
        tiers = expand_tiers(request.preferences, [d.id for d in devices])
        candidates = [rooms[d] for tier in tiers for d in tier if d in request.need]
        if not candidates:
            wanted = ", ".join(request.preferences)
            return Refusal(
                f"no device here matches {wanted} (devices: {', '.join(rooms) or 'none'})",
                retry=False,
            )
        if all(request.need[d.id] > d.capacity for d in candidates):
            largest = max(candidates, key=lambda d: d.capacity)
            return Refusal(
                f"{request.model_id} needs {_gib(request.need[largest.id])} but the largest "
                f"device, {largest.id}, has {_gib(largest.capacity)} usable",
                retry=False,
            )
        pinned = {
            d.id: sum(r.bytes for r in residents if r.device == d.id and r.pinned)
            for d in candidates
        }
        if all(request.need[d.id] > d.capacity - pinned[d.id] for d in candidates):
            return Refusal(
                f"{request.model_id} cannot fit without evicting pinned instances "
                f"({', '.join(f'{d}: {_gib(b)} pinned' for d, b in pinned.items() if b)})",
                retry=False,
            )
        choose = STRATEGIES[self.strategy]
        for tier in tiers:
            rooms_in_tier = [rooms[d] for d in tier if d in request.need]
            fits_now = [
                (r, request.need[r.id]) for r in rooms_in_tier if request.need[r.id] <= r.free
            ]
            if fits_now:
                return Plan(choose(fits_now).id)
            with_eviction: list[tuple[DeviceRoom, tuple[str, ...], int]] = []
            for room in rooms_in_tier:
                on_device = [r for r in residents if r.device == room.id]
                victims = self.eviction.victims(
                    on_device,
                    need=request.need[room.id],
                    free=room.free,
                    now=now,
                    min_residency=min_residency,
                )
                if victims is not None:
                    freed = sum(r.bytes for r in on_device if r.model_id in victims)
                    with_eviction.append((room, victims, freed))
            if with_eviction:
                fewest = min(freed for _, _, freed in with_eviction)
                tied = [
                    (room, request.need[room.id]) for room, _, f in with_eviction if f == fewest
                ]
                chosen = choose(tied)
                victims = next(v for room, v, _ in with_eviction if room.id == chosen.id)
                return Plan(chosen.id, victims)
        return Refusal(
            f"no room for {request.model_id} yet: the instances that would have to leave are "
            "serving requests or were loaded too recently",
            retry=True,
        )


def placement_policy(strategy: str, eviction: EvictionPolicy) -> PlacementPolicy:
    """The placement policy called ``strategy``; ValueError listing the known ones."""
    if strategy not in STRATEGIES:
        raise ValueError(
            f"unknown placement policy {strategy!r} (known: {', '.join(sorted(STRATEGIES))})"
        )
    return PlacementPolicy(strategy, eviction)


def _gib(n: int) -> str:
    if n >= 1024**3:
        return f"{n / 1024**3:.2f} GiB ({n} bytes)"
    return f"{n / 1024**2:.1f} MiB ({n} bytes)"
