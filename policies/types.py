"""The world as placement and eviction policies see it: plain, frozen values.

The scheduler builds these from its instances and the memory ledger right before a
decision; policies only read them (DESIGN.md rule 2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Resident:
    """An instance that holds memory on a device."""

    model_id: str
    device: str
    bytes: int
    last_used: float  # scheduler clock (monotonic seconds)
    loaded_at: float  # scheduler clock
    in_flight: int
    pinned: bool
    ready: bool  # False while loading, draining or already chosen as a victim
    # Eviction would only put it to sleep (weights to host RAM): far cheaper to restore.
    sleeps: bool = False
    # Its version's history (the scheduler's ``History``), for policies that weigh cost:
    uses: float = 0.0  # requests, aged: each adds one, the sum halves every half-life
    reload_s: float = 0.0  # measured seconds to bring it back from where eviction sends it
    floor: float = 0.0  # its device's eviction clock when it was last used (GDSF's aging)

    def evictable(self, now: float, min_residency: float) -> bool:
        """Idle, unpinned, serving, and resident long enough (anti-thrash)."""
        return (
            self.ready
            and self.in_flight == 0
            and not self.pinned
            and now - self.loaded_at >= min_residency
        )


@dataclass(frozen=True)
class DeviceRoom:
    """One device's memory for planning.

    ``capacity``: the most routerd could ever hold there (budget − foreign −
    headroom). ``free``: what it can take now without evicting anything.
    """

    id: str
    kind: str
    capacity: int
    free: int


@dataclass(frozen=True)
class LoadRequest:
    """What is to be placed: bytes needed on each device it may go to."""

    model_id: str
    preferences: Sequence[str]  # e.g. ["auto"], ["cuda", "cpu"], ["cuda:1"]
    need: Mapping[str, int]  # device id → bytes the instance needs there


@dataclass(frozen=True)
class Plan:
    """Load on ``device`` after evicting ``evict`` (model ids, in order)."""

    device: str
    evict: tuple[str, ...] = ()


@dataclass(frozen=True)
class Refusal:
    """No plan now. ``retry``: room may appear (leases end, residency times pass)."""

    reason: str
    retry: bool
