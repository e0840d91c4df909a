"""Every Prometheus metric routerd exports, defined once (DESIGN.md: ``routerd/metrics``).

Metrics live in a registry of their own per app (not prometheus-client's global one),
so a test process can build several daemons side by side. They are fed from a few
well-defined points and nowhere else:

- the request middleware, through :meth:`Metrics.begin` and :meth:`Metrics.finish`:
  every request's endpoint, status,
  duration, the model that served it (read from ``x-routerd-model``), its cold start
  (``x-routerd-cold-start-ms``), and the tokens and first-token time the OpenAI
  handlers leave on the request (:func:`note_usage`, :func:`note_first_token`);
- the scheduler's event log (:meth:`Metrics.event`): loads by result and duration,
  evictions by reason and age; and its batchers (:meth:`Metrics.batch`);
- at scrape time, a collector that reads the scheduler's snapshots: queue depth,
  instances, per-device memory from the ledger, estimated vs measured footprints.

Names follow the Prometheus conventions: a ``routerd_`` prefix, base units
(seconds, bytes), ``_total`` on counters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from routerd.services import SERVICES, Services
from routerd.tallies import HistogramTally, Tally, TallyCollector
from state import VersionRecord

log = logging.getLogger("routerd.api")


@dataclass
class _Observed:
    """What a handler tells the middleware about the request it is serving."""

    started: float
    first_token: float | None = None
    usage: tuple[int, int] | None = None
    cold_start_ms: float | None = None  # when it could not travel as a header
    model_id: str | None = None  # the version the request was routed to, even if it failed
    token: Token[_Observed | None] | None = None  # restores the previous current request


# The request being served by this task: set by the middleware, read by the notes below
# (a handler runs in the middleware's task, so it sees the middleware's value).
_CURRENT: ContextVar[_Observed | None] = ContextVar("routerd_request", default=None)

LATENCY_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
LOAD_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
AGE_BUCKETS: Final = (1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)
BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def split_model_id(model_id: str) -> tuple[str, str]:
    """``name@version`` → (name, version); anything else → (it, "")."""
    name, _, version = model_id.partition("@")
    return name, version


def note_first_token() -> None:
    """Called by a streaming handler when its first piece of text goes out."""
    observed = _CURRENT.get()
    if observed is not None and observed.first_token is None:
        observed.first_token = time.monotonic()


def note_model(model_id: str) -> None:
    """Called once a handler resolved its model: failures (429, 503) count against it."""
    observed = _CURRENT.get()
    if observed is not None:
        observed.model_id = model_id


def note_cold_start(milliseconds: float) -> None:
    """Called when a cold start was told in the body (a stream begun before its lease)."""
    observed = _CURRENT.get()
    if observed is not None:
        observed.cold_start_ms = milliseconds


def note_usage(prompt_tokens: int, completion_tokens: int) -> None:
    """Called by a handler with the tokens its response reports in ``usage``."""
    observed = _CURRENT.get()
    if observed is not None:
        observed.usage = (prompt_tokens, completion_tokens)


class Metrics:
    """The registry and every metric in it; one per app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Tally(
            "routerd_requests",
            "HTTP requests answered, by served model version, endpoint and status code.",
            ["model", "version", "endpoint", "status"],
        )
        self.request_duration = HistogramTally(
            "routerd_request_duration_seconds",
            "Time from receiving a request to the end of its response (streams included).",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
        )
        self.time_to_first_token = HistogramTally(
            "routerd_time_to_first_token_seconds",
            "Time from receiving a streaming request to sending its first text.",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
        )
        self.prompt_tokens = Tally(
            "routerd_prompt_tokens",
            "Prompt tokens of answered requests.",
            ["model", "version"],
        )
        self.generated_tokens = Tally(
            "routerd_generated_tokens",
            "Tokens generated for answered requests.",
            ["model", "version"],
        )
        self.cold_starts = Counter(
            "routerd_cold_starts",
            "Requests that waited for their model version to load.",
            ["model", "version"],
            registry=r,
        )
        self.cold_start_duration = Histogram(
            "routerd_cold_start_seconds",
            "How long requests that waited for a load waited.",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.batch_size = HistogramTally(
            "routerd_batch_size",
            "Rows (or embedding requests) in each batch when it starts.",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
        )
        self.loads = Counter(
            "routerd_loads",
            "Model loads, by result (ok, failed).",
            ["model", "version", "result"],
            registry=r,
        )
        self.load_duration = Histogram(
            "routerd_load_duration_seconds",
            "Time from placing an instance to it being ready (load and warm-up).",
            ["model", "version"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.evictions = Counter(
            "routerd_evictions",
            "Instances unloaded, by reason (lru, ttl, manual, pressure, ...).",
            ["model", "version", "reason"],
            registry=r,
        )
        self.eviction_age = Histogram(
            "routerd_eviction_age_seconds",
            "How long an instance had been resident when it was evicted.",
            ["reason"],
            buckets=AGE_BUCKETS,
            registry=r,
        )
        self.leaks = Counter(
            "routerd_leaks",
            "Evictions whose memory the device did not show back in time.",
            ["device"],
            registry=r,
        )

        # Updated on every request, from the event loop only: lock-free tallies.
        r.register(
            TallyCollector(
                [
                    self.requests,
                    self.request_duration,
                    self.time_to_first_token,
                    self.prompt_tokens,
                    self.generated_tokens,
                    self.batch_size,
                ]
            )
        )

    def attach(self, services: Services) -> None:
        """Observe ``services``: scheduler events and batches, and its state at scrape time."""
        services.scheduler.observer = self
        self.registry.register(_StateCollector(services))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- observed from the scheduler ---------------------------------------------

    def event(self, kind: str, record: VersionRecord, fields: Mapping[str, Any]) -> None:
        """One event-log entry of the scheduler (see ``state.records.EVENT_KINDS``)."""
        labels = (record.name, record.version)
        if kind == "load":
            self.loads.labels(*labels, "ok").inc()
            duration_ms = fields.get("duration_ms")
            if isinstance(duration_ms, int | float):
                self.load_duration.labels(*labels).observe(duration_ms / 1000)
        elif kind == "load_failed":
            self.loads.labels(*labels, "failed").inc()
        elif kind == "evict":
            reason = str(fields.get("reason") or "unknown")
            self.evictions.labels(*labels, reason).inc()
            age = (fields.get("detail") or {}).get("resident_s")
            if isinstance(age, int | float):
                self.eviction_age.labels(reason).observe(age)
        elif kind == "leak":
            self.leaks.labels(str(fields.get("device") or "")).inc()

    def batch(self, record: VersionRecord, rows: int) -> None:
        self.batch_size.observe((record.name, record.version), rows)

    # -- observed from HTTP --------------------------------------------------------

    def begin(self) -> _Observed:
        """A request arrived: what the handler's notes will fill in, current from now on.

        The request middleware (``routerd.api.middleware``) calls this first and
        :meth:`finish` last, so the metrics see the final status of every request.
        """
        observed = _Observed(started=time.monotonic())
        observed.token = _CURRENT.set(observed)
        return observed

    def finish(
        self,
        request: web.Request,
        response: web.StreamResponse | None,
        status: int,
        observed: _Observed,
    ) -> None:
        """Count and time a finished request; one log line for each that ends in an error."""
        if observed.token is not None:
            _CURRENT.reset(observed.token)
        seconds = time.monotonic() - observed.started
        route = request.match_info.route.resource
        endpoint = route.canonical if route is not None else "unmatched"
        served = response.headers.get("x-routerd-model", "") if response is not None else ""
        served = served or observed.model_id or ""
        name, version = split_model_id(served)
        self.requests.inc((name, version, endpoint, str(status)))
        self.request_duration.observe((name, endpoint), seconds)
        if observed.first_token is not None:
            self.time_to_first_token.observe(
                (name, endpoint), observed.first_token - observed.started
            )
        if observed.usage is not None and served:
            prompt, completion = observed.usage
            self.prompt_tokens.inc((name, version), prompt)
            self.generated_tokens.inc((name, version), completion)
        cold = response.headers.get("x-routerd-cold-start-ms") if response is not None else None
        cold_ms = float(cold) if cold is not None else observed.cold_start_ms
        if cold_ms is not None and served:
            self.cold_starts.labels(name, version).inc()
            self.cold_start_duration.labels(name).observe(cold_ms / 1000)
        if status >= 400:
            log.info(
                "request failed",
                extra={
                    "event": "request_error",
                    "method": request.method,
                    "path": request.path,
                    "status": status,
                    "model": served or None,
                    "duration_ms": round(seconds * 1000, 1),
                },
            )


class _StateCollector(Collector):
    """Gauges read from the scheduler's snapshots at scrape time (never stored twice)."""

    def __init__(self, services: Services) -> None:
        self._services = services

    def describe(self) -> list[Metric]:
        return []  # collected on demand; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        scheduler = self._services.scheduler
        queue = GaugeMetricFamily(
            "routerd_queue_depth",
            "Requests waiting for a model version: for its load or in its batch queues.",
            labels=["model", "version"],
        )
        for model_id, depth in sorted(scheduler.queue_depths().items()):
            queue.add_metric(list(split_model_id(model_id)), depth)
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


METRICS: Final = web.AppKey("metrics", Metrics)

routes = web.RouteTableDef()


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """The Prometheus text exposition of this daemon's metrics."""
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def install(app: web.Application) -> Metrics:
    """Create the app's metrics, observe its services, serve ``/metrics``.

    The request middleware (``routerd.api.middleware``) finds them under ``METRICS``.
    """
    found = Metrics()
    found.attach(app[SERVICES])
    app[METRICS] = found
    app.add_routes(routes)
    return found
