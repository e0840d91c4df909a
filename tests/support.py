"""Building a daemon's parts around fakes, for tests that need the real wiring."""

from __future__ import annotations

import asyncio
import http.client
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from backends.registry import BackendRegistry
from routerd.admin_socket import bind_admin_socket
from routerd.api.keys import SERVICES
from routerd.app import build_app, build_services
from routerd.clock import Clock, VirtualClock
from routerd.config import Config, DevicesConfig, MemoryAuditConfig, SchedulerConfig, ServerConfig
from routerd.devices import DeviceInventory
from routerd.memory_audit import MemoryAudit, MemoryReader
from routerd.scheduler import Scheduler
from routerd.services import Services
from state import VersionSpec
from tests.fakes import MEMINFO, FakeBackend, cpu_only_inventory

ADMIN_TOKEN = "test-admin-token-0123456789"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
"""Tests talk to the admin API over TCP with this token (fake_services configures it)."""


async def serve_admin_socket(client: TestClient) -> Path:
    """Serve the client's app on its admin unix socket too, as ``routerd serve`` does;
    returns the state dir, which is what ``routerctl --state-dir`` needs."""
    config = client.server.app[SERVICES].live.config
    assert client.server.runner is not None
    await web.SockSite(client.server.runner, bind_admin_socket(config.socket_path)).start()
    return config.state_dir


def fake_spec(tmp: Path, name: str, version: str = "1", **options: Any) -> VersionSpec:
    folder = tmp / "models" / f"{name}-{version}"
    folder.mkdir(parents=True, exist_ok=True)
    return VersionSpec(
        name=name, version=version, backend="fake", path=str(folder), options=options
    )


def fake_services(
    tmp: Path,
    backend: FakeBackend,
    models: Sequence[VersionSpec] = (),
    *,
    load_timeout: float = 30.0,
    backends: BackendRegistry | None = None,
    devices: DeviceInventory | None = None,
    scheduler: dict[str, Any] | None = None,
    devices_config: dict[str, Any] | None = None,
    pinned: Sequence[str] = (),
    clock: Clock | None = None,
    on_change: Callable[[Scheduler], None] | None = None,
    wall_clock: Callable[[], float] = time.time,
    memory_reader: MemoryReader | None = None,
    audit_clock: Clock | None = None,
    **config: Any,
) -> Services:
    """Services over a FakeBackend; scheduler settings default to no anti-thrash delay,
    and the ledger's invariant is checked after every change (``check_invariants``).

    Under the ``strict_memory_audit`` fixture (and unless ``memory_audit`` is given),
    their memory audit runs strict from here on and is checked after the test.
    """
    audited = STRICT_AUDITS.active and "memory_audit" not in config
    if audited:
        config["memory_audit"] = STRICT_TEST_AUDIT
    scheduler_settings = {"load_timeout": load_timeout, "min_residency": 0.0, **(scheduler or {})}
    server = config.pop("server", ServerConfig(admin_token=ADMIN_TOKEN))
    if server.model_roots is None:  # models of these tests live under tmp
        server = replace(server, model_roots=(tmp,))
    cfg = Config(
        server=server,
        state_dir=tmp / "state",
        models=tuple(models),
        scheduler=SchedulerConfig(**scheduler_settings),
        devices=DevicesConfig(**(devices_config or {})),
        pinned=frozenset(pinned),
        **config,
    )
    registry = backends or BackendRegistry({"fake": lambda: backend})
    services = build_services(
        cfg,
        backends=registry,
        devices=devices or cpu_only_inventory(tmp),
        clock=clock,
        on_change=on_change,
        wall_clock=wall_clock,
        memory_reader=memory_reader,
        audit_clock=audit_clock,
    )
    check_invariants(services.scheduler)
    if audited:
        STRICT_AUDITS.adopt(services.audit)
    return services


def one_gpu_services(
    tmp: Path,
    backend: FakeBackend,
    *,
    size: int,
    host_cache: int,
    watch: LedgerWatch,
    names: Sequence[str] = ("a", "b"),
    leaky: Sequence[str] = (),
    clock: Clock | None = None,
    scheduler: dict[str, Any] | None = None,
) -> Services:
    """Services whose models ``names`` (``size`` bytes each; ``leaky`` ones never give
    their memory back) go on the one fake GPU of ``backend.gpus``, with a host-RAM tier
    of ``host_cache`` bytes and ``watch`` checking the ledger after every change."""
    assert backend.gpus is not None
    meminfo = tmp / "meminfo"
    meminfo.write_text(MEMINFO)
    specs = [
        fake_spec(tmp, n, bytes=size, devices=["cuda"], **({"leak": True} if n in leaky else {}))
        for n in names
    ]
    return fake_services(
        tmp,
        backend,
        specs,
        devices=DeviceInventory(backend.gpus, meminfo=meminfo, cpu_budget=100_000),
        on_change=watch,
        devices_config={"gpu_headroom": 0, "host_cache": host_cache},
        clock=clock,
        scheduler=scheduler,
    )


async def ask(services: Services, name: str) -> None:
    """One request's lease on ``name``, taken and given back."""
    async with services.scheduler.lease(services.router.resolve(name)):
        pass


def states(services: Services) -> dict[str, str]:
    """Each resident model's state, by model name."""
    return {i.model: i.state for i in services.scheduler.instances()}


STRICT_TEST_AUDIT = MemoryAuditConfig(mode="strict", tolerance=16 * 1024**2)
"""The audit under ``strict_memory_audit``: in a test process nothing but the test's
own work moves memory, so the slack can be a quarter of the daemon's default."""


class StrictAudits:
    """The memory audits of services built while a test runs under the
    ``strict_memory_audit`` fixture (tests/conftest.py), which checks them afterwards.

    Tests that drive the scheduler without an app (the batcher tests) never start its
    audit, so one built here is started at once when a loop runs; an app started
    later finds it running (``MemoryAudit.start`` is idempotent).
    """

    def __init__(self) -> None:
        self.active = False
        self.audits: list[MemoryAudit] = []

    def take(self) -> list[MemoryAudit]:
        """The audits adopted so far, forgotten here."""
        audits, self.audits = self.audits, []
        return audits

    def adopt(self, audit: MemoryAudit) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # no loop yet: the app's start-up starts it
        else:
            audit.start()
        self.audits.append(audit)


STRICT_AUDITS = StrictAudits()


CHECKED_SCHEDULERS: list[Scheduler] = []
"""Schedulers of the running test that check the ledger's invariant; tests/conftest.py
fails the test if any of them kept a break (one raised in a background task, such as
an eviction, is only logged there; one raised in a load is reported as a failed load)."""


def check_invariants(scheduler: Scheduler) -> Scheduler:
    """Turn on the ledger's invariant check (DESIGN.md rule 5) after every change the
    scheduler makes; every test's scheduler built here checks it."""
    settings = replace(scheduler.settings, check_invariants=True)
    scheduler.reconfigure(settings, scheduler.placement)
    CHECKED_SCHEDULERS.append(scheduler)
    return scheduler


async def until(scheduler: Scheduler, predicate: Callable[[], bool], limit: float = 5.0) -> None:
    """Wait, change by change, until ``predicate`` holds.

    The scheduler signals every change it makes, so this wakes exactly when there is
    something new to look at; ``limit`` (real seconds) only bounds a test that would
    otherwise hang, it is never waited out by a passing one.
    """
    async with asyncio.timeout(limit):
        while not predicate():
            await scheduler.context.signals.next_change()


async def waiting_on(clock: VirtualClock, timers: int, limit: float = 5.0) -> None:
    """Wait until ``timers`` timers wait on ``clock``: whatever a test is about to
    advance time for has begun waiting (its setup may run on real threads first, such
    as a footprint estimate). ``limit`` (real seconds) only bounds a broken test."""
    async with asyncio.timeout(limit):
        while clock.pending() < timers:
            await asyncio.sleep(0.001)


class FakeClock:
    """Wall-clock seconds that only move when a test says so (stats, rollouts, the store).

    The scheduler's clock is ``routerd.clock.VirtualClock``, which also drives waits."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class LedgerWatch:
    """An on_change hook that checks, after every change, that no device is over budget."""

    def __init__(self) -> None:
        self.checks = 0
        self.worst_over = 0

    def __call__(self, scheduler: Scheduler) -> None:
        self.checks += 1
        for row in scheduler.ledger():
            self.worst_over = max(self.worst_over, row.over_budget)


class ServedApp:
    """The app on a loopback port, run by its own event loop on a thread, so that
    hypothesis drives it with plain blocking requests.

    Its models, all on the fake backend: ``a`` (a generator with a 64-token context),
    ``embedder``, and ``b`` in versions 1 and 2 (something to route and roll out).
    ``max_body_bytes``: the server's limit on a body (default: the config's).
    """

    def __init__(self, tmp: Path, *, max_body_bytes: int | None = None) -> None:
        self.tmp = tmp
        self.max_body_bytes = max_body_bytes
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self.app: web.Application | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        models = [
            fake_spec(self.tmp, "a", context=64, inline=True),
            fake_spec(self.tmp, "embedder", task="embed"),
            fake_spec(self.tmp, "b", "1"),
            fake_spec(self.tmp, "b", "2"),
        ]
        server = ServerConfig(admin_token=ADMIN_TOKEN)
        if self.max_body_bytes is not None:
            server = replace(server, max_body_bytes=self.max_body_bytes)
        services = fake_services(self.tmp, FakeBackend(), models, server=server)
        self.app = build_app(services)
        self._runner = web.AppRunner(self.app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def __enter__(self) -> ServedApp:
        self._thread.start()
        assert self._ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.loop.close()

    def post(self, path: str, raw: bytes) -> tuple[int, bytes]:
        status, _, payload = self.send("POST", path, raw)
        return status, payload

    def send(
        self, method: str, path: str, raw: bytes, headers: dict[str, str] | None = None
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One request with ``raw`` as its body: the status, headers and body answered."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            sent = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=raw, headers=sent)
            response = conn.getresponse()
            return response.status, response.headers, response.read()
        finally:
            conn.close()


async def audit_failures(audits: Sequence[MemoryAudit]) -> list[str]:
    """Stop ``audits`` after one last sample each; one line per violation they saw."""
    failures = []
    for audit in audits:
        if audit.running:
            await audit.sample()  # the state the test ended in
        await audit.close()
        failures += [f"{v.books} (sample {audit.samples})" for v in audit.violations]
        if audit.violation_count > len(audit.violations):
            failures.append(f"... {audit.violation_count} violations in all")
    return failures
