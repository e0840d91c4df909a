"""Every Prometheus metric routerd exports, defined once (DESIGN.md: ``routerd/metrics``).

Metrics live in a registry of their own per app (not prometheus-client's global one),
so a test process can build several daemons side by side. They are fed from a few
well-defined points and nowhere else:

- the request middleware, through :meth:`Metrics.finish`: every request's
  endpoint, status and duration, and what the OpenAI handlers left on its context
  (``routerd.request_context``): the version that served it, its tokens
  (:func:`note_usage`), first-token time (:func:`note_first_token`) and cold start
  (:func:`note_cold_start`);
- the scheduler's event log (:meth:`Metrics.event`): loads by result and duration,
  evictions by reason and age; and its batchers (:meth:`Metrics.batch`);
- at scrape time, a collector that reads the scheduler's snapshots: queue depth,
  instances, per-device memory from the ledger, estimated vs measured footprints;
  and one that reads the memory audit's latest books (``routerd.memory_audit``).

Names follow the Prometheus conventions: a ``routerd_`` prefix, base units
(seconds, bytes), ``_total`` on counters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any, Final, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from routerd.memory_audit import MemoryAudit, gauge_value
from routerd.model_ids import split_model_id
from routerd.request_context import RequestContext, current
from routerd.scheduler import Scheduler
from state import VersionRecord

log = logging.getLogger("routerd.api")


LATENCY_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
LOAD_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
AGE_BUCKETS: Final = (1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)
BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# Every counter and histogram by name, one entry each; the code observes them by that
# name. name: (label names, help); a counter is exported as ``<name>_total``.
COUNTERS: Final[Mapping[str, tuple[tuple[str, ...], str]]] = {
    "routerd_requests": (
        ("model", "version", "endpoint", "status"),
        "HTTP requests answered, by served model version, endpoint and status code.",
    ),
    "routerd_prompt_tokens": (("model", "version"), "Prompt tokens of answered requests."),
    "routerd_generated_tokens": (("model", "version"), "Tokens generated for answered requests."),
    "routerd_cold_starts": (
        ("model", "version"),
        "Requests that waited for their model version to load.",
    ),
    "routerd_loads": (("model", "version", "result"), "Model loads, by result (ok, failed)."),
    "routerd_thrash": (
        ("model", "version"),
        "Loads (from disk or the host tier) within 60 s of the version's eviction.",
    ),
    "routerd_evictions": (
        ("model", "version", "reason"),
        "Instances unloaded, by reason (lru, ttl, manual, pressure, ...).",
    ),
    "routerd_leaks": (("device",), "Evictions whose memory the device did not show back in time."),
}
# name: (label names, the buckets' upper bounds before +Inf, help)
HISTOGRAMS: Final[Mapping[str, tuple[tuple[str, ...], tuple[float, ...], str]]] = {
    "routerd_request_duration_seconds": (
        ("model", "endpoint"),
        LATENCY_BUCKETS,
        "Time from receiving a request to the end of its response (streams included).",
    ),
    "routerd_time_to_first_token_seconds": (
        ("model", "endpoint"),
        LATENCY_BUCKETS,
        "Time from receiving a streaming request to sending its first text.",
    ),
    "routerd_cold_start_seconds": (
        ("model",),
        LOAD_BUCKETS,
        "How long requests that waited for a load waited.",
    ),
    "routerd_batch_size": (
        ("model", "version"),
        BATCH_BUCKETS,
        "Rows (or embedding requests) in each batch when it starts.",
    ),
    "routerd_load_duration_seconds": (
        ("model", "version"),
        LOAD_BUCKETS,
        "Time from placing an instance to it being ready (load and warm-up).",
    ),
    "routerd_eviction_age_seconds": (
        ("reason",),
        AGE_BUCKETS,
        "How long an instance had been resident when it was evicted.",
    ),
}

_M = TypeVar("_M", Counter, Histogram)


class Children(dict[tuple[str, ...], _M]):
    """The labelled children of a set of metrics, by ``(metric name, *label values)``,
    each made on first use.

    ``metric.labels(...)`` checks its arguments and takes the metric's lock on every
    call, and a request makes up to seven observations: here each is one dictionary
    lookup before its ``inc`` or ``observe``. Two threads making the same child at once
    get the same object, as ``labels`` keeps its own map.
    """

    def __init__(self, metrics: Mapping[str, _M]) -> None:
        super().__init__()
        self.metrics: Mapping[str, _M] = metrics

    def __missing__(self, key: tuple[str, ...]) -> _M:
        child = self.metrics[key[0]].labels(*key[1:])
        self[key] = child
        return child


def note_first_token() -> None:
    """Called by a streaming handler when its first piece of text goes out."""
    context = current()
    if context is not None and context.first_token is None:
        context.first_token = time.monotonic()


def note_cold_start(milliseconds: float) -> None:
    """Called by a handler whose lease had to wait for a load (or a wake-up)."""
    context = current()
    if context is not None:
        context.cold_start_ms = milliseconds


def note_usage(prompt_tokens: int, completion_tokens: int) -> None:
    """Called by a handler with the tokens its response reports in ``usage``."""
    context = current()
    if context is not None:
        context.usage = (prompt_tokens, completion_tokens)


class Metrics:
    """The registry and every metric in it; one per app. ``counters`` and ``histograms``
    reach the children of :data:`COUNTERS` and :data:`HISTOGRAMS`."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.counters = Children(
            {
                name: Counter(name, doc, labels, registry=r)
                for name, (labels, doc) in COUNTERS.items()
            }
        )
        self.histograms = Children(
            {
                name: Histogram(name, doc, labels, buckets=buckets, registry=r)
                for name, (labels, buckets, doc) in HISTOGRAMS.items()
            }
        )

    def attach(self, scheduler: Scheduler) -> None:
        """Observe ``scheduler``: its events and batches, and its state at scrape time."""
        scheduler.observer = self
        self.registry.register(_StateCollector(scheduler))

    def watch_audit(self, audit: MemoryAudit) -> None:
        """Export the memory audit's latest books as ``routerd_memory_unaccounted_bytes``."""
        self.registry.register(_AuditCollector(audit))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- observed from the scheduler ---------------------------------------------

    def event(self, kind: str, record: VersionRecord, fields: Mapping[str, Any]) -> None:
        """One event-log entry of the scheduler (see ``state.records.EVENT_KINDS``)."""
        name, version = record.name, record.version
        counters, histograms = self.counters, self.histograms
        if kind == "load":
            counters["routerd_loads", name, version, "ok"].inc()
            if (fields.get("detail") or {}).get("thrash"):
                counters["routerd_thrash", name, version].inc()
            duration_ms = fields.get("duration_ms")
            if isinstance(duration_ms, int | float):
                seconds = duration_ms / 1000
                histograms["routerd_load_duration_seconds", name, version].observe(seconds)
        elif kind == "load_failed":
            counters["routerd_loads", name, version, "failed"].inc()
        elif kind == "evict":
            reason = str(fields.get("reason") or "unknown")
            counters["routerd_evictions", name, version, reason].inc()
            age = (fields.get("detail") or {}).get("resident_s")
            if isinstance(age, int | float):
                histograms["routerd_eviction_age_seconds", reason].observe(age)
        elif kind == "leak":
            counters["routerd_leaks", str(fields.get("device") or "")].inc()

    def batch(self, record: VersionRecord, rows: int) -> None:
        self.histograms["routerd_batch_size", record.name, record.version].observe(rows)

    # -- observed from HTTP --------------------------------------------------------

    def finish(
        self, endpoint: str, status: int, context: RequestContext, *, method: str, path: str
    ) -> None:
        """Count and time a finished request; one log line for each that ends in an error.

        The request middleware (``routerd.api.middleware``) calls this last, so the
        metrics see the final status of every request, errors included. ``endpoint``
        is the route's pattern (``unmatched`` for none), ``method`` and ``path`` the
        request's, for the log line.
        """
        seconds = time.monotonic() - context.started
        served = context.served
        name, version = (served.name, served.version) if served is not None else ("", "")
        counters, histograms = self.counters, self.histograms
        counters["routerd_requests", name, version, endpoint, str(status)].inc()
        histograms["routerd_request_duration_seconds", name, endpoint].observe(seconds)
        if context.first_token is not None:
            first_token_s = context.first_token - context.started
            histograms["routerd_time_to_first_token_seconds", name, endpoint].observe(first_token_s)
        if context.usage is not None and served is not None:
            prompt, completion = context.usage
            counters["routerd_prompt_tokens", name, version].inc(prompt)
            counters["routerd_generated_tokens", name, version].inc(completion)
        if context.cold_start_ms is not None and served is not None:
            counters["routerd_cold_starts", name, version].inc()
            cold_start_s = context.cold_start_ms / 1000
            histograms["routerd_cold_start_seconds", name].observe(cold_start_s)
        if status >= 400:
            log.info(
                "request failed",
                extra={
                    "event": "request_error",
                    "method": method,
                    "path": path,
                    "status": status,
                    "model": served.model_id if served is not None else None,
                    "duration_ms": round(seconds * 1000, 1),
                    "error": context.error,
                    "reason": context.error_message,
                },
            )


class _StateCollector(Collector):
    """Gauges read from the scheduler's snapshots at scrape time (never stored twice)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    def describe(self) -> list[Metric]:
        return []  # collected on demand; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        scheduler = self._scheduler
        queue = GaugeMetricFamily(
            "routerd_queue_depth",
            "Requests waiting for a model version: for its load or in its batch queues.",
            labels=["model", "version"],
        )
        for model_id, depth in sorted(scheduler.queue_depths().items()):
            name, version = split_model_id(model_id)  # the scheduler's ids name versions
            queue.add_metric([name, version or ""], depth)
        yield queue
        instances = scheduler.instances()
        counts: dict[tuple[str, str], int] = {}
        for i in instances:
            counts[(i.device, i.state)] = counts.get((i.device, i.state), 0) + 1
        resident = GaugeMetricFamily(
            "routerd_resident_instances",
            "Instances by device and state (waiting, loading, warming, ready, draining, ...).",
            labels=["device", "state"],
        )
        for (device, state), count in sorted(counts.items()):
            resident.add_metric([device, state], count)
        yield resident
        in_flight = GaugeMetricFamily(
            "routerd_in_flight_requests",
            "Requests holding a lease on an instance.",
            labels=["model", "version", "device"],
        )
        estimated = GaugeMetricFamily(
            "routerd_footprint_estimated_bytes",
            "An instance's footprint as estimated from its checkpoint before loading.",
            labels=["model", "version", "device"],
        )
        measured = GaugeMetricFamily(
            "routerd_footprint_measured_bytes",
            "An instance's footprint as measured after warm-up.",
            labels=["model", "version", "device"],
        )
        for i in instances:
            labels = [i.model, i.version, i.device]
            in_flight.add_metric(labels, i.in_flight)
            estimated.add_metric(labels, i.estimated_bytes)
            if i.measured_bytes is not None:
                measured.add_metric(labels, i.measured_bytes)
        yield from (in_flight, estimated, measured)
        memory = GaugeMetricFamily(
            "routerd_device_memory_bytes",
            "Device memory: total, used (as measured), ours (held by routerd's instances), "
            "reserved (by loads in flight), foreign (other processes), free for planning.",
            labels=["device", "kind"],
        )
        for d in scheduler.devices():
            for kind, value in (
                ("total", d.total_bytes),
                ("used", d.used_bytes),
                ("ours", d.routerd_bytes),
                ("reserved", d.reserved_bytes),
                ("foreign", d.foreign_bytes),
                ("free_for_planning", d.free_for_planning_bytes),
            ):
                memory.add_metric([d.id, kind], value)
        yield memory
        tier = scheduler.host_tier()
        host_cache = GaugeMetricFamily(
            "routerd_host_cache_bytes",
            "The host-RAM tier ([devices] host_cache): its capacity, and the bytes of "
            "weights resting there (or promised to instances on their way in).",
            labels=["kind"],
        )
        host_cache.add_metric(["capacity"], tier.capacity_bytes)
        host_cache.add_metric(["used"], tier.used_bytes)
        yield host_cache


class _AuditCollector(Collector):
    """Bytes in use beyond the ledger, per device, from the audit's latest sample."""

    def __init__(self, audit: MemoryAudit) -> None:
        self._audit = audit

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "routerd_memory_unaccounted_bytes",
            "Memory measured in use beyond what the ledger accounts for (0 when within it).",
            labels=["device"],
        )
        for books in list(self._audit.latest.values()):
            gauge.add_metric([books.device], gauge_value(books))
        yield gauge
