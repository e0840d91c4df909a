"""The residency table: which instances exist, and everything read from it.

It holds the instances (by key), pins, leaks, instances retiring after a failure
and the latest failure per version; it answers snapshots, the memory ledger and the
planning view. It changes only through ``add``/``remove``, the leak and retiring
lists and the host tier's claims, and only ``routerd.scheduler.lifecycle`` calls
those (DESIGN.md rule 1); everything else reads.

With ``SchedulerSettings.check_invariants`` on (tests), lifecycle calls ``check``
after every change it makes, and the ledger's invariant (DESIGN.md rule 5) is
asserted there, from the same ledger planning reads: see ``check``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from backends import proctree
from backends.base import Offloadable, Sleepable
from policies.types import DeviceRoom, Resident
from routerd.devices import DeviceReading
from routerd.instance import Instance, InstanceSnapshot
from routerd.memory import Holding, LedgerRow, build_ledger
from routerd.scheduler.context import Context
from routerd.scheduler.history import History
from routerd.scheduler.settings import DeviceSnapshot, Failure, Leak, TierSnapshot
from routerd.states import InstanceState
from routerd.version_options import options_of
from state import VersionRecord


class Residency:
    """The table of instances and what is read from it; see the module docstring."""

    def __init__(self, context: Context, pinned: set[str]) -> None:
        self._context = context
        self.instances: dict[str, Instance] = {}
        self.pinned = pinned
        self.leaks: list[Leak] = []
        self.retiring: list[Instance] = []  # failed, no longer routed to, not yet unloaded
        self.failures: dict[str, Failure] = {}  # by model id
        self.host_claims: dict[str, int] = {}  # the tier's room claimed by victims entering it
        self.invariant_breaks: list[InvariantBroken] = []  # what ``check`` raised, kept
        # What cost-aware eviction weighs, per version, kept after they leave too.
        self.history = History(lambda: context.settings.history_half_life_requests)

    # -- changes (lifecycle only) -------------------------------------------------

    def add(self, instance: Instance) -> None:
        if instance.key in self.instances:
            raise RuntimeError(f"{instance.key} is resident already")
        self.instances[instance.key] = instance

    def remove(self, instance: Instance) -> bool:
        """Drop ``instance`` if it is the one under its key; False if it was not there."""
        if self.instances.get(instance.key) is instance:
            del self.instances[instance.key]
            return True
        return False

    # -- lookups ----------------------------------------------------------------

    def get(self, key: str) -> Instance | None:
        return self.instances.get(key)

    def replicas(self, model_id: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.record.model_id == model_id]

    def version_replicas(self, record: VersionRecord) -> list[Instance]:
        """``record``'s instances: one lookup, without scanning them all, when the
        version may run only one (no ``replicas`` or ``max_replicas`` option)."""
        first = self.instances.get(record.model_id)
        if first is not None and not options_of(record).several:
            return [first]
        return self.replicas(record.model_id)

    def is_pinned(self, model_id: str) -> bool:
        return model_id in self.pinned

    # -- snapshots --------------------------------------------------------------

    def snapshot(self, instance: Instance) -> InstanceSnapshot:
        clock = self._context.clock
        return InstanceSnapshot.of(
            instance, pinned=instance.model_id in self.pinned, now=clock.now(), wall=clock.wall()
        )

    def snapshots(self) -> list[InstanceSnapshot]:
        return [self.snapshot(i) for i in self.instances.values()]

    def first_snapshot(self, model_id: str) -> InstanceSnapshot | None:
        """The version's first replica (or an instance key's own snapshot), if resident."""
        found = self.instances.get(model_id)
        if found is None:
            replicas = self.replicas(model_id)
            found = min(replicas, key=lambda i: i.replica) if replicas else None
        return None if found is None else self.snapshot(found)

    def failure_list(self) -> list[Failure]:
        """The latest failure of every version that had one, newest first."""
        return sorted(self.failures.values(), key=lambda f: f.at, reverse=True)

    # -- the memory ledger ---------------------------------------------------------

    def ledger(self, *, fresh: bool = True) -> list[LedgerRow]:
        """The memory ledger now (``fresh``: read NVML and the kernel first)."""
        devices = self._context.devices
        readings = devices.readings() if fresh else devices.last_readings()
        return build_ledger(
            readings,
            self._holdings(),
            headroom=self._context.settings.headroom,
            our_pid=self._context.pid,
            our_children=self.children(readings),
        )

    def row(self, device: str) -> LedgerRow | None:
        return next((row for row in self.ledger() if row.device == device), None)

    def children(self, readings: Sequence[DeviceReading]) -> set[int]:
        """Our child processes, looked up only when a GPU reports per-process bytes."""
        pid = self._context.pid
        if pid != os.getpid() or not any(r.process_bytes for r in readings):
            return set()
        return proctree.descendants(pid)

    def our_usage(self, device: str) -> int | None:
        """Bytes NVML attributes to this process on a GPU; None on the CPU device."""
        if not device.startswith("cuda"):
            return None
        readings = self._context.devices.readings()
        ours = {self._context.pid, *self.children(readings)}
        for reading in readings:
            if reading.id == device:
                return sum(b for p, b in reading.process_bytes.items() if p in ours)
        return None

    def device_snapshots(self) -> list[DeviceSnapshot]:
        names = {r.id: r for r in self._context.devices.last_readings()}
        return [
            DeviceSnapshot(
                id=row.device,
                kind=row.kind,
                name=names[row.device].name if row.device in names else row.device,
                total_bytes=names[row.device].total_bytes if row.device in names else row.budget,
                used_bytes=row.measured_used,
                free_bytes=row.measured_free,
                reserved_bytes=row.reserved + row.claimed,
                routerd_bytes=row.ours,
                budget_bytes=row.budget,
                foreign_bytes=row.foreign,
                headroom_bytes=row.headroom,
                capacity_bytes=row.capacity,
                free_for_planning_bytes=row.free,
                over_budget_bytes=row.over_budget,
            )
            for row in self.ledger(fresh=False)
        ]

    def _holdings(self) -> list[Holding]:
        holdings = [Holding(leak.device, leak.bytes, "resident") for leak in self.leaks]
        holdings += [Holding(i.device, i.bytes, "victim") for i in self.retiring]
        holdings += [Holding("cpu", nbytes, "tier") for nbytes in self.host_claims.values()]
        for i in self.instances.values():
            if i.host_bytes:
                holdings.append(Holding("cpu", i.host_bytes, "tier"))
            if i.state is InstanceState.WAITING and i.tier is not None:
                # coming back: what stayed on the device is held, the rest claimed
                holdings.append(Holding(i.device, i.kept_bytes, "resident"))
                holdings.append(Holding(i.device, i.wake_bytes, "waiting"))
                continue
            if i.state is InstanceState.WAITING:
                kind = "waiting"
            elif i.state.allocating:
                kind = "loading"
            elif i.victim_of is not None:
                kind = "victim"
            else:
                kind = "resident"
            holdings.append(Holding(i.device, i.device_bytes, kind))
        return holdings

    def planning_view(self, waiting: Mapping[str, int]) -> tuple[list[DeviceRoom], list[Resident]]:
        """Rooms and residents as the pure policies see them; ``waiting`` counts the
        requests queued per version, which keep a fresh instance from looking idle."""
        rooms = [
            DeviceRoom(id=row.device, kind=row.kind, capacity=row.capacity, free=row.free)
            for row in self.ledger()
        ]
        residents = []
        for i in self.instances.values():
            sleeps = self.tier_for(i) is not None
            weighed = self.history.weigh(i.model_id, i.device, to_tier=sleeps)
            residents.append(
                Resident(
                    model_id=i.key,
                    device=i.device,
                    bytes=i.bytes,
                    last_used=i.touched,
                    loaded_at=i.loaded_at,
                    in_flight=i.in_flight + waiting.get(i.model_id, 0),
                    pinned=i.model_id in self.pinned,
                    ready=i.state is InstanceState.READY,
                    sleeps=sleeps,
                    uses=weighed.uses,
                    reload_s=weighed.reload_s,
                    floor=weighed.floor,
                )
            )
        return rooms, residents

    # -- the host-RAM tier ------------------------------------------------------------

    @property
    def tier_capacity(self) -> int:
        """The tier's budget in bytes (``[devices] host_cache``); 0: no tier."""
        return self._context.settings.host_cache

    def tier_used(self) -> int:
        """Bytes the tier holds (weights asleep or offloaded) or has promised to victims
        on their way in."""
        held = sum(i.host_bytes for i in self.instances.values())
        return held + sum(self.host_claims.values())

    def tier_free(self) -> int:
        """Bytes the tier can still take without dropping anything."""
        return self.tier_capacity - self.tier_used()

    def tier_snapshot(self) -> TierSnapshot:
        resting = sorted(
            (i for i in self.instances.values() if i.tier is not None),
            key=lambda i: (i.touched, i.key),
        )
        return TierSnapshot(
            capacity_bytes=self.tier_capacity,
            used_bytes=self.tier_used(),
            models=tuple(i.key for i in resting),
        )

    def tier_for(self, instance: Instance) -> str | None:
        """Where evicting ``instance`` would keep its weights: ``"sleep"`` (its engine's
        own sleep), ``"host"`` (routerd's offload), or None (it would be gone).

        Only a measured instance that is serving or draining, whose model can do it,
        and whose weights fit the tier at all: room is made by dropping what the tier
        holds (``tier_room``), least recently used first."""
        model = instance.loaded_model
        measured = instance.measured
        if (
            measured is None
            or instance.tier is not None
            or instance.state not in (InstanceState.READY, InstanceState.DRAINING)
            or measured.weights > self.tier_capacity - sum(self.host_claims.values())
        ):
            return None
        if isinstance(model, Sleepable) and model.can_sleep:
            return "sleep"
        if isinstance(model, Offloadable) and model.can_offload:
            return "host"
        return None

    def tier_room(self, need: int) -> list[Instance] | None:
        """Instances to drop from the tier, least recently used first, so that ``need``
        more bytes fit it; None if dropping all it may drop would not do (others'
        bytes are on their way in or out). Instances coming back are not dropped."""
        free = self.tier_free()
        chosen: list[Instance] = []
        resting = (i for i in self.instances.values() if i.state.resting)
        for instance in sorted(resting, key=lambda i: (i.touched, i.key)):
            if free >= need:
                break
            chosen.append(instance)
            free += instance.host_bytes
        return chosen if free >= need else None

    # -- the invariant (checks on) ---------------------------------------------------

    def check(self, change: str) -> None:
        """Assert the ledger's invariant after ``change`` (which lifecycle names).

        Per device, instances (resident, victims, retiring, leaked) plus reservations
        (loads allocating) must stay within the capacity planning gave out: the
        ledger's ``used`` ≤ ``capacity``. Claims of loads still waiting for victims are
        promises, not memory, and stay out of it (a claimant allocates only once
        ``used`` + its claim fits). One excuse: a backend that measured more than it
        was granted broke the books itself; until its load is made ready (victims for
        the difference have left) or discarded and its memory back, its excess is not
        routerd's doing (``overrun``).

        Off in production, where nothing would catch the error; on in tests, which
        then check every step of every scheduler they build. A break is raised here,
        at the change that made it, and kept in ``invariant_breaks``: a break raised
        in a background task (an eviction) is only logged, and tests look there.
        """
        if not self._context.settings.check_invariants:
            return
        for row in self.ledger(fresh=False):
            excused = self.overrun(row.device)
            if row.over_budget > excused:
                error = InvariantBroken(row, change, excused, self._books(row.device))
                self.invariant_breaks.append(error)
                raise error

    def overrun(self, device: str) -> int:
        """Bytes loads on ``device`` took beyond their grant, not made room for: measured
        above their claim and never made ready (still loading, or being discarded), or
        discarded and never given back (leaked)."""
        loading = sum(
            max(i.measured.total - i.reserved_bytes, 0)
            for i in self.instances.values()
            if i.device == device
            and i.measured is not None
            and i.load_ms is None
            and (i.state.allocating or i.state is InstanceState.UNLOADING)
        )
        return loading + sum(leak.overrun for leak in self.leaks if leak.device == device)

    def _books(self, device: str) -> str:
        """Who holds what on ``device``, for an error message."""
        instances = self.instances.values()
        held = [f"{i.key} {i.state} {i.device_bytes}" for i in instances if i.device == device]
        held += [f"{i.key} retiring {i.bytes}" for i in self.retiring if i.device == device]
        held += [f"{x.model_id} leaked {x.bytes}" for x in self.leaks if x.device == device]
        return "; ".join(held) or "nothing"


class InvariantBroken(AssertionError):
    """A device holds more than it may (DESIGN.md rule 5): a bug in routerd, never a
    client's fault, so an AssertionError. Says the device, its books and the change."""

    def __init__(self, row: LedgerRow, change: str, excused: int, books: str) -> None:
        self.device = row.device
        self.change = change
        self.row = row
        excuse = f" ({excused} of it taken by backends beyond their grants)" if excused else ""
        super().__init__(
            f"ledger invariant broken on {row.device} by {change}: instances {row.ours} "
            f"(kept {row.kept} + victims {row.victims}) + reservations {row.reserved} = "
            f"{row.used} > capacity {row.capacity} (budget {row.budget} − foreign "
            f"{row.foreign} − headroom {row.headroom}) by {row.over_budget}{excuse}; "
            f"claims waiting {row.claimed}; holding: {books}"
        )
