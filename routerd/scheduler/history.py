"""What cost-aware eviction needs to know of each version, kept by the scheduler.

Policies stay pure (DESIGN.md rule 2): they keep nothing between calls and read no
clock. So the scheduler keeps, per version, what they weigh, and hands it to them as
plain data on each ``policies.types.Resident``:

- ``uses`` — its requests, aged: each adds one, and the sum halves every
  ``history_half_life_requests`` requests to the host (to any version), so
  yesterday's favourite fades. Aging by requests rather than by seconds keeps the
  counts as informative on a quiet host as on a busy one: a night with few requests
  does not wipe out what the day taught, and a change of popularity is noticed after
  as many requests whatever the traffic;
- ``reload_s`` — what bringing it back would cost from where eviction sends it: its
  measured returns from the host tier if it would rest there, else its loads from
  disk (moving averages per device kind; 0 while never measured);
- ``floor`` — its device's eviction clock when it was last used. A policy that ranks
  by priority (``priority``, as Greedy-Dual-Size-Frequency does) has the scheduler
  raise a device's clock to the priority of each victim it evicts, so what was not
  used since competes from its older, lower floor.

Versions keep their history after they leave (so a reload is priced by what was
measured before), bounded to the ``MAX_VERSIONS`` most recently used. Everything runs
on the event loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from routerd.scheduler.admission import moving_average

MAX_VERSIONS = 10_000
THRASH_WINDOW_S = 60.0
"""A load this soon after the version's eviction is thrash (counted, logged, explained)."""
RIVALRY_LOG_S = 600.0
"""Two versions that keep displacing each other are logged at most this often."""


@dataclass
class VersionHistory:
    uses: float = 0.0  # aged request count as of request number ``at``
    at: int = 0  # the host's request count at its last use
    floor: float = 0.0
    disk_s: dict[str, float] = field(default_factory=dict)  # device kind → load seconds
    tier_s: dict[str, float] = field(default_factory=dict)  # device kind → return seconds
    left_at: float | None = None  # scheduler clock of its latest eviction
    left_for: str | None = None  # the instance that eviction made room for


@dataclass(frozen=True)
class Weighed:
    """One version as a cost-aware policy sees it (see the module docstring)."""

    uses: float
    reload_s: float
    floor: float


@dataclass(frozen=True)
class Comeback:
    """A version loaded again after an eviction: ``after_s`` seconds later; ``thrash``
    when within ``THRASH_WINDOW_S``; ``rival``: the version it left for, when that one
    had itself been evicted for it within the window (the two displace each other)."""

    after_s: float
    thrash: bool
    left_for: str | None
    rival: str | None
    first_in_a_while: bool = True  # the pair was not logged in the last RIVALRY_LOG_S


class History:
    """Per-version history; ``half_life`` reads the setting, in requests (a reload may
    change it)."""

    def __init__(self, half_life: Callable[[], float]) -> None:
        self._half_life = half_life
        self._requests = 0  # leases taken on this host, every version together
        self._versions: dict[str, VersionHistory] = {}
        self._floors: dict[str, float] = {}  # device → its eviction clock
        self._rivalries: dict[frozenset[str], float] = {}  # pair → when last told

    def _of(self, model_id: str) -> VersionHistory:
        history = self._versions.pop(model_id, None)
        if history is None:
            history = VersionHistory()
            if len(self._versions) >= MAX_VERSIONS:  # the least recently used goes
                del self._versions[next(iter(self._versions))]
        self._versions[model_id] = history  # last in order: most recently used
        return history

    def _aged(self, history: VersionHistory) -> float:
        half_life = self._half_life()
        if history.uses == 0.0 or math.isinf(half_life):
            return history.uses
        if half_life <= 0:
            return 0.0
        return float(history.uses * 0.5 ** ((self._requests - history.at) / half_life))

    def used(self, model_id: str, device: str) -> None:
        """A request took a lease on ``model_id`` on ``device`` (the coordinator)."""
        self._requests += 1
        history = self._of(model_id)
        history.uses = self._aged(history) + 1.0
        history.at = self._requests
        history.floor = self._floors.get(device, 0.0)

    def loaded(self, model_id: str, device: str, seconds: float, source: str) -> None:
        """A load (``source`` ``disk``) or a return from the host tier took ``seconds``
        (the lifecycle, as it makes the instance ready)."""
        history = self._of(model_id)
        kind = device.split(":")[0]
        times = history.disk_s if source == "disk" else history.tier_s
        times[kind] = moving_average(times.get(kind), seconds)

    def left(self, model_id: str, now: float, trigger: str | None) -> None:
        """``model_id`` was chosen to leave (for ``trigger``'s room, or idle)."""
        history = self._of(model_id)
        history.left_at, history.left_for = now, trigger

    def comeback(self, model_id: str, now: float) -> Comeback | None:
        """How soon after its latest eviction ``model_id`` is loaded again, and for whom
        it left; None if it never left."""
        history = self._versions.get(model_id)
        if history is None or history.left_at is None:
            return None
        after = max(now - history.left_at, 0.0)
        trigger = history.left_for
        rival = None
        if trigger is not None and after <= THRASH_WINDOW_S:
            other = self._versions.get(trigger.partition("#")[0])
            if (
                other is not None
                and other.left_at is not None
                and other.left_for is not None
                and other.left_for.partition("#")[0] == model_id
                and now - other.left_at <= THRASH_WINDOW_S
            ):
                rival = trigger.partition("#")[0]  # each evicted the other, within the window
        first = True
        if rival is not None:
            pair = frozenset((model_id, rival))
            told = self._rivalries.get(pair)
            first = told is None or now - told >= RIVALRY_LOG_S
            if first:
                if len(self._rivalries) >= MAX_VERSIONS:
                    self._rivalries.clear()
                self._rivalries[pair] = now
        return Comeback(after, after <= THRASH_WINDOW_S, trigger, rival, first)

    def evicted(self, device: str, priority: float) -> None:
        """A victim of ``priority`` was chosen on ``device``: its clock moves up to it."""
        self._floors[device] = max(self._floors.get(device, 0.0), priority)

    def weigh(self, model_id: str, device: str, *, to_tier: bool) -> Weighed:
        """``model_id`` on ``device`` for the policies; ``to_tier``: eviction would send
        it to the host tier (its return is priced, not a load)."""
        history = self._versions.get(model_id)
        if history is None:
            return Weighed(0.0, 0.0, 0.0)
        kind = device.split(":")[0]
        reload_s = history.disk_s.get(kind, 0.0)
        if to_tier:
            reload_s = history.tier_s.get(kind, reload_s / 10)
        return Weighed(self._aged(history), reload_s, history.floor)
