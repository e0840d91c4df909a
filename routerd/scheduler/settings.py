"""What the scheduler is configured with, what it stores, and the records it hands out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final, Protocol

from routerd.config import DevicesConfig, SchedulerConfig
from routerd.instance import Instance
from routerd.serving.handle import ModelHandle
from state import VersionRecord


class SchedulerObserver(Protocol):
    """Watches the scheduler from outside (metrics): its event log and its batches."""

    def event(self, kind: str, record: VersionRecord, fields: Mapping[str, Any]) -> None: ...

    def batch(self, record: VersionRecord, rows: int) -> None: ...


@dataclass(frozen=True)
class SchedulerSettings:
    load_timeout: float = 600.0
    load_wait_timeout: float = 30.0
    min_residency: float = 10.0
    keep_alive: float = 300.0
    release_timeout: float = 10.0
    scale_down_idle: float = 30.0  # extra replicas leave after this long idle
    routing: str = "least-outstanding"
    max_queue: int = 256  # requests waiting per version before 429; 0 = no limit
    max_failures: int = 3  # backend failures in a row before an instance is failed
    stop_timeout: float = 30.0  # cancelled work must stop this soon, or the instance is hung
    history_half_life_requests: float = (
        1000.0  # aged request counts halve every this many requests (eviction)
    )
    poll_interval: float = 2.0
    headroom: Mapping[str, int] = field(default_factory=dict)  # by device kind
    host_cache: int = 0  # bytes of the host-RAM tier (``[devices] host_cache``); 0: off
    # Assert the ledger's invariant after every change (Residency.check): tests turn it
    # on; config never does, and a reload keeps what the scheduler was built with.
    check_invariants: bool = False

    @classmethod
    def from_config(cls, scheduler: SchedulerConfig, devices: DevicesConfig) -> SchedulerSettings:
        """Every ``scheduler`` setting these share by name (its placement and eviction
        are the placement policy's), and the polling and headroom of ``devices``: a
        setting added to both reaches the scheduler without a line here to forget."""
        return cls(
            **{name: getattr(scheduler, name) for name in _FROM_SCHEDULER_CONFIG},
            poll_interval=devices.poll_interval,
            headroom={"cuda": devices.gpu_headroom, "cpu": devices.cpu_headroom},
            host_cache=devices.host_cache,
        )


_FROM_SCHEDULER_CONFIG: Final = tuple(
    f.name for f in fields(SchedulerSettings) if f.name in {g.name for g in fields(SchedulerConfig)}
)


@dataclass(slots=True)
class Lease:
    """A request's hold on a ready instance; valid inside ``async with`` only.

    Not frozen, though never changed: one is built per request, and a frozen
    dataclass costs about four times as much to build."""

    instance: Instance  # the scheduler's; what serving may use is ``handle``
    cold_start_ms: float | None  # set when this request waited for a load

    @property
    def handle(self) -> ModelHandle:
        """The leased model as serving sees it (never the instance behind it)."""
        return self.instance.handle


@dataclass(frozen=True)
class Leak:
    """An evicted instance whose memory NVML never showed back; its bytes stay counted."""

    model_id: str
    device: str
    bytes: int
    overrun: int = 0  # of those, taken beyond its grant by a load that failed (the backend's)


@dataclass(frozen=True)
class Failure:
    """The latest failure of a version's instance, for status pages."""

    model: str
    version: str
    device: str
    reason: str
    at: float  # wall clock
    times: int  # instances of this version failed since routerd started


@dataclass(frozen=True)
class DeviceSnapshot:
    id: str
    kind: str
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    reserved_bytes: int
    routerd_bytes: int
    budget_bytes: int
    foreign_bytes: int
    headroom_bytes: int
    capacity_bytes: int
    free_for_planning_bytes: int
    over_budget_bytes: int  # used (ours + loads allocating) beyond capacity; should stay 0


@dataclass(frozen=True)
class TierSnapshot:
    """The host-RAM tier (``[devices] host_cache``) as status pages show it."""

    capacity_bytes: int  # its budget; 0: no tier
    used_bytes: int  # weights resting there, and room promised to victims on their way in
    models: tuple[str, ...]  # instance keys resting there, least recently used first
