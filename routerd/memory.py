"""The memory ledger: per device, what is measured, ours, reserved, foreign, and free.

It is derived, never stored: the scheduler owns the instances (and so their bytes)
and the inventory owns the readings; ``build_ledger`` combines the two whenever a
decision or a status page needs them, so the ledger can never drift from either.

Per device:

- ``budget``: what routerd may use there — the GPU's total, or the CPU budget.
- ``foreign``: bytes NVML attributes to other processes (0 on the CPU device, whose
  budget is routerd's own share).
- ``ours``: bytes of our resident instances, victims on their way out and leaked
  instances included — they hold the memory until it is verified back.
- ``reserved``: loads in flight that have started allocating.
- ``claimed``: loads still waiting for their victims to leave; the bytes they will
  use are counted here and their victims are left out of ``kept``, so no two loads
  ever plan with the same bytes (DESIGN.md rule 4).
- ``capacity`` = budget − foreign − headroom, the most routerd can ever hold.
- ``used`` = ours + reserved, which must never exceed ``capacity``.
- ``free`` (for planning) = min(measured free − headroom, capacity − kept − reserved −
  claimed), never negative: DESIGN.md's formula, with victims already promised away.
- ``tier`` (the CPU device's row only): host RAM that routerd's host-RAM tier holds or
  has claimed. It has its own budget (``[devices] host_cache``), so it is outside
  ``used``; it is shown because it is host memory this process holds all the same.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from routerd.devices import DeviceReading


@dataclass(frozen=True)
class Holding:
    """One instance's bytes on a device, as the ledger counts them."""

    device: str
    bytes: int
    kind: str  # "resident" | "victim" | "loading" | "waiting" | "tier"


@dataclass(frozen=True)
class LedgerRow:
    device: str
    kind: str
    budget: int
    measured_used: int
    measured_free: int
    foreign: int
    headroom: int
    kept: int
    victims: int
    reserved: int
    claimed: int
    tier: int = 0

    @property
    def ours(self) -> int:
        return self.kept + self.victims

    @property
    def capacity(self) -> int:
        return max(self.budget - self.foreign - self.headroom, 0)

    @property
    def used(self) -> int:
        return self.ours + self.reserved

    @property
    def free(self) -> int:
        planned = self.capacity - self.kept - self.reserved - self.claimed
        return max(min(self.measured_free - self.headroom, planned), 0)

    @property
    def over_budget(self) -> int:
        """Bytes by which ``used`` exceeds ``capacity`` (0 when within it)."""
        return max(self.used - self.capacity, 0)


def build_ledger(
    readings: Iterable[DeviceReading],
    holdings: Iterable[Holding],
    *,
    headroom: Mapping[str, int],
    our_pid: int | None = None,
    our_children: Collection[int] = (),
) -> list[LedgerRow]:
    """One row per device reading; ``headroom`` is keyed by device kind.

    ``our_children``: processes our instances run in (vLLM's engine and workers); what
    NVML shows for them is ours, already counted in the instances' bytes, not foreign.
    """
    pid = os.getpid() if our_pid is None else our_pid
    ours = {pid, *our_children}
    sums: dict[tuple[str, str], int] = {}
    for holding in holdings:
        key = (holding.device, holding.kind)
        sums[key] = sums.get(key, 0) + holding.bytes
    rows = []
    for r in readings:
        foreign = sum(b for p, b in r.process_bytes.items() if p not in ours)
        budget = r.budget_bytes or r.total_bytes
        measured_free = r.free_bytes if r.kind == "cuda" else min(r.free_bytes, budget)
        rows.append(
            LedgerRow(
                device=r.id,
                kind=r.kind,
                budget=budget,
                measured_used=r.used_bytes,
                measured_free=measured_free,
                foreign=foreign,
                headroom=headroom.get(r.kind, 0),
                kept=sums.get((r.id, "resident"), 0),
                victims=sums.get((r.id, "victim"), 0),
                reserved=sums.get((r.id, "loading"), 0),
                claimed=sums.get((r.id, "waiting"), 0),
                tier=sums.get((r.id, "tier"), 0),
            )
        )
    return rows
