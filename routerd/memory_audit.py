"""The ledger checked against the machine: measured memory use beside the accounted bytes.

The ledger (``routerd.memory``) is what every placement trusts (DESIGN.md rule 5), and
it is built from numbers the backends report: estimates, then measured footprints.
Nothing in it looks at what the process really holds. This module does: it samples the
memory in use per device and sets it beside what the ledger accounts for there —
instances plus reservations (``LedgerRow.used``) — so a footprint that is too small,
a model that keeps memory after it was unloaded, or a batch that outgrows its KV
reservation shows up as bytes nobody owns.

Per device, per sample:

- ``measured``: what the reader reports for this process tree (see
  ``routerd.process_memory``: resident anonymous memory on the CPU, NVML's per-process
  bytes or torch's allocator on a GPU), less the ``baseline`` read at start, before any
  model was loaded (the interpreter, the web stack, the runtime libraries).
- ``accounted``: ``LedgerRow.used`` — the scheduler's own ledger, never a second one.
- ``unaccounted`` = measured − baseline − accounted. Negative is normal: the ledger
  reserves a model's whole KV cache and working memory before it touches them.
- ``allowance``: how far above the accounted bytes use may go — the device's headroom
  (the ledger's own room for what it cannot count: CUDA contexts, fragmentation) plus
  ``tolerance_bytes`` (allocator slack, request buffers) plus ``tolerance_ratio`` of the
  accounted bytes (footprints are measured, not exact). ``unaccounted`` beyond it is
  *over*.

What the audit does with that depends on its mode, read at start:

- ``on`` (the default): sample every second, export ``unaccounted`` as the gauge
  ``routerd_memory_unaccounted_bytes{device}`` (0 when negative: the gauge counts
  bytes in use that nobody owns; the books in ``/admin/status`` keep the sign), and log
  one warning each time a device goes over.
- ``strict`` (tests, the soak): sample every 10 ms, and treat every reading over as a
  violation: logged as an error with the books, kept (``violations``), shown in
  ``/admin/status``, so a test or a harness that asserts none occurred fails.
- ``off``: no sampling, no gauge.

A reading over the allowance is read again after the reader's ``trim`` (glibc's
``malloc_trim``): memory that ``free`` gave back stays in the process until glibc
returns it, so without this an eviction on the CPU would look like a leak. Only what
stays over after the trim counts (see ``routerd.process_memory`` for why this and not
judging against a past peak).

The ledger and the reading cannot be taken at one instant (the reading may take a
thread hop), so a sample reads the ledger before and after and takes the larger of the
two accounted figures: an instance leaving while the reading runs still counts, and no
load can slip between two reads unseen.

This module decides and keeps books; it does not read /proc or NVML itself (the reader
does), imports no web framework, and waits only on the injected clock, so tests drive
it with a fake reader and ``VirtualClock``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from routerd.clock import Clock
from routerd.config import AUDIT_MODES, MemoryAuditConfig
from routerd.memory import LedgerRow

log = logging.getLogger("routerd.memory_audit")

MODES: Final = AUDIT_MODES
ENV_MODE: Final = "ROUTERD_MEMORY_AUDIT"
"""Environment variable that overrides the configured mode (``off``, ``on``, ``strict``),
so a harness can turn strict auditing on for a daemon it starts without a config file."""

DEFAULT_INTERVAL: Final = {"on": 1.0, "strict": 0.01}
KEPT_VIOLATIONS: Final = 50  # the first ones are kept whole; the count goes on


@dataclass(frozen=True)
class AuditSettings:
    """How the audit samples and judges; see the module docstring."""

    mode: str = MemoryAuditConfig.mode
    interval: float = DEFAULT_INTERVAL["on"]  # seconds between samples
    tolerance_bytes: int = MemoryAuditConfig.tolerance
    tolerance_ratio: float = MemoryAuditConfig.tolerance_ratio

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"memory audit mode must be one of {', '.join(MODES)}: {self.mode!r}")

    @property
    def strict(self) -> bool:
        return self.mode == "strict"

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @classmethod
    def from_config(
        cls, config: MemoryAuditConfig, environ: Mapping[str, str] | None = None
    ) -> AuditSettings:
        """The ``[memory_audit]`` settings, with ``environ``'s ``ROUTERD_MEMORY_AUDIT``
        winning over the mode; no interval configured picks the mode's own."""
        mode = (environ or {}).get(ENV_MODE, "").strip().lower() or config.mode
        if mode not in MODES:
            raise ValueError(f"{ENV_MODE} must be one of {', '.join(MODES)}, got {mode!r}")
        return cls(
            mode=mode,
            interval=config.interval or DEFAULT_INTERVAL.get(mode, 1.0),
            tolerance_bytes=config.tolerance,
            tolerance_ratio=config.tolerance_ratio,
        )


@dataclass(frozen=True)
class Measurement:
    """What a reader found in use on one device; ``sources`` names each figure read
    (``rss_anon``, ``nvml``, ``torch_reserved`` …) so the books say where it came from."""

    bytes: int
    sources: Mapping[str, int] = field(default_factory=dict)


class MemoryReader(Protocol):
    """Where measured use comes from; ``routerd.process_memory.ProcessMemoryReader`` is
    the real one. ``blocking``: whether ``read`` and ``trim`` do I/O that must not run on
    the event loop (they then run in a worker thread)."""

    blocking: bool

    def read(self, devices: Sequence[str]) -> dict[str, Measurement]:
        """Use per device id, for the ids in ``devices`` the reader can measure."""
        ...

    def trim(self) -> None:
        """Return memory the allocator keeps after ``free`` to the system, if it can."""
        ...


class LedgerSource(Protocol):
    """The scheduler, as far as the audit reads it."""

    def ledger(self, *, fresh: bool = True) -> list[LedgerRow]: ...


@dataclass(frozen=True)
class Books:
    """One device's figures in one sample; ``over`` when unaccounted passes the allowance."""

    device: str
    measured: int
    baseline: int
    accounted: int
    allowance: int
    sources: Mapping[str, int] = field(default_factory=dict)

    @property
    def unaccounted(self) -> int:
        return self.measured - self.baseline - self.accounted

    @property
    def over(self) -> bool:
        return self.unaccounted > self.allowance

    def as_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "measured_bytes": self.measured,
            "baseline_bytes": self.baseline,
            "accounted_bytes": self.accounted,
            "unaccounted_bytes": self.unaccounted,
            "allowance_bytes": self.allowance,
            "sources": dict(self.sources),
        }

    def __str__(self) -> str:
        sources = " ".join(f"{k}={v}" for k, v in sorted(self.sources.items()))
        return (
            f"{self.device}: measured {self.measured} - baseline {self.baseline} - "
            f"accounted {self.accounted} = unaccounted {self.unaccounted} "
            f"(allowance {self.allowance}){' [' + sources + ']' if sources else ''}"
        )


@dataclass(frozen=True)
class Violation:
    """A strict-mode reading over the allowance, after the trim; ``at`` is wall time."""

    at: float
    books: Books

    def as_json(self) -> dict[str, Any]:
        return {"at": self.at, **self.books.as_json()}


def allowance(accounted: int, headroom: int, settings: AuditSettings) -> int:
    """Bytes by which measured use may exceed ``accounted`` on a device."""
    return headroom + settings.tolerance_bytes + int(settings.tolerance_ratio * max(accounted, 0))


def judge(
    measured: Mapping[str, Measurement],
    baseline: Mapping[str, int],
    rows: Sequence[LedgerRow],
    settings: AuditSettings,
    *,
    also: Sequence[LedgerRow] = (),
) -> list[Books]:
    """The books of every ledger row the reader measured, in the ledger's order.

    ``also``: the same ledger read at another instant; a device's accounted bytes are
    the larger of the two (see the module docstring). Pure: no I/O, no logging.
    """
    other = {row.device: row.used for row in also}
    books = []
    for row in rows:
        found = measured.get(row.device)
        if found is None:
            continue
        accounted = max(row.used, other.get(row.device, row.used))
        books.append(
            Books(
                device=row.device,
                measured=found.bytes,
                baseline=baseline.get(row.device, 0),
                accounted=accounted,
                allowance=allowance(accounted, row.headroom, settings),
                sources=found.sources,
            )
        )
    return books


def gauge_value(books: Books) -> int:
    """What ``routerd_memory_unaccounted_bytes`` shows: bytes in use that no ledger row
    owns, so never below 0 (a negative figure is room reserved and not yet touched)."""
    return max(books.unaccounted, 0)


class MemoryAudit:
    """Samples ``reader`` against ``source``'s ledger on ``clock``; see the module docstring.

    ``latest`` holds each device's books from the last sample (the Prometheus gauge
    reads it at scrape time). ``start`` reads the baseline and starts sampling;
    ``close`` stops it. ``sample`` takes one sample now (tests, and the loop itself).
    """

    def __init__(
        self,
        source: LedgerSource,
        reader: MemoryReader,
        settings: AuditSettings,
        *,
        clock: Clock,
        wall: Callable[[], float] | None = None,
    ) -> None:
        self.source = source
        self.reader = reader
        self.settings = settings
        self._clock = clock
        self._wall = wall or clock.wall
        self.baseline: dict[str, int] = {}
        self.latest: dict[str, Books] = {}
        self.worst: dict[str, Books] = {}  # the sample with the most unaccounted, per device
        self.violations: list[Violation] = []
        self.violation_count = 0
        self.samples = 0
        self.trims = 0
        self._over: set[str] = set()  # devices over in the last sample (one log per episode)
        self._task: asyncio.Task[None] | None = None

    # -- start and stop -------------------------------------------------------------

    def take_baseline(self) -> dict[str, int]:
        """Read the use every device starts from; call before any model is loaded."""
        devices = [row.device for row in self.source.ledger(fresh=False)]
        found = self.reader.read(devices)
        self.baseline = {device: m.bytes for device, m in found.items()}
        return self.baseline

    def start(self) -> None:
        """Take the baseline and sample every ``interval`` on the running loop."""
        if not self.settings.enabled or self._task is not None:
            return
        self.take_baseline()
        log.info(
            "memory audit %s every %gs (baseline %s)",
            self.settings.mode,
            self.settings.interval,
            ", ".join(f"{d}={b}" for d, b in sorted(self.baseline.items())) or "none",
        )
        self._task = asyncio.create_task(self._run(), name="memory audit")

    async def close(self) -> None:
        """Stop sampling; in strict mode, log once more how many violations there were."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.settings.strict and self.violation_count:
            log.error(
                "memory audit: %d readings over the ledger in %d samples; worst: %s",
                self.violation_count,
                self.samples,
                "; ".join(str(b) for b in self.worst.values() if b.over),
            )

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception:  # a failed read must not end the audit, nor the daemon
                log.exception("memory audit sample failed")
            await self._clock.sleep(self.settings.interval)

    # -- sampling -------------------------------------------------------------------

    async def sample(self) -> list[Books]:
        """Read, judge, and (if anything is over) trim and read again; then publish."""
        books = await self._read_and_judge()
        if any(b.over for b in books):
            await self._call(self.reader.trim)
            self.trims += 1
            books = await self._read_and_judge()
        self._publish(books)
        return books

    async def _read_and_judge(self) -> list[Books]:
        before = self.source.ledger(fresh=False)
        devices = [row.device for row in before]
        measured = await self._call(lambda: self.reader.read(devices))
        after = self.source.ledger(fresh=False)
        return judge(measured, self.baseline, after, self.settings, also=before)

    async def _call(self, work: Callable[[], Any]) -> Any:
        if self.reader.blocking:
            return await asyncio.to_thread(work)
        return work()

    def _publish(self, books: Sequence[Books]) -> None:
        self.samples += 1
        for b in books:
            self.latest[b.device] = b
            worst = self.worst.get(b.device)
            if worst is None or b.unaccounted > worst.unaccounted:
                self.worst[b.device] = b
            if b.over:
                self._note_over(b)
            else:
                self._over.discard(b.device)

    def _note_over(self, books: Books) -> None:
        first = books.device not in self._over
        self._over.add(books.device)
        if self.settings.strict:
            self.violation_count += 1
            if len(self.violations) < KEPT_VIOLATIONS:
                self.violations.append(Violation(self._wall(), books))
            if first:
                log.error(
                    "memory audit: use beyond the ledger on %s",
                    books,
                    extra={"event": "memory_unaccounted", **books.as_json()},
                )
        elif first:
            log.warning(
                "memory in use beyond the ledger on %s",
                books,
                extra={"event": "memory_unaccounted", **books.as_json()},
            )

    # -- status ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The audit for ``/admin/status``: settings, latest and worst books, violations."""
        return {
            "mode": self.settings.mode,
            "interval_s": self.settings.interval,
            "tolerance_bytes": self.settings.tolerance_bytes,
            "tolerance_ratio": self.settings.tolerance_ratio,
            "samples": self.samples,
            "trims": self.trims,
            "devices": [b.as_json() for b in self.latest.values()],
            "worst": [b.as_json() for b in self.worst.values()],
            "violations": self.violation_count,
            "first_violations": [v.as_json() for v in self.violations[:10]],
        }
