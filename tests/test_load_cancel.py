"""Loads nobody waits for are cancelled, and give their reservation back only once the
loading thread has returned: a backend whose load blocks until the test releases it
(``FakeBackend.load_gate``) stands in for a slow read or a child process still
allocating."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from backends.base import LoadSpec
from routerd.api.keys import STATS
from routerd.app import build_app
from routerd.errors import ClientClosed
from routerd.services import Services
from tests.fakes import FakeBackend, FakeModel
from tests.support import fake_services, fake_spec

MODEL = 4_000


class Client:
    """A request's client, as the scheduler waits on it (``client_gone``)."""

    def __init__(self) -> None:
        self.left = asyncio.Event()

    async def gone(self) -> None:
        await self.left.wait()


class SilentBackend(FakeBackend):
    """Reports no progress: a cancellation cannot reach its load, which returns a model."""

    def load(self, spec: LoadSpec) -> FakeModel:
        return super().load(replace(spec, progress=None))


def _services(tmp: Path, backend: FakeBackend) -> Services:
    return fake_services(tmp, backend, [fake_spec(tmp, "a", bytes=MODEL)])


async def _ask(services: Services, client: Client | None = None) -> None:
    record = services.router.resolve("a")
    gone = None if client is None else client.gone
    async with services.scheduler.lease(record, client_gone=gone):
        pass


def _failed(services: Services) -> list[str]:
    return [e.reason or "" for e in services.store.events() if e.kind == "load_failed"]


def _reserved(services: Services) -> int:
    """Bytes the ledger holds for the load (claimed, reserved or held) on the CPU."""
    row = {r.device: r for r in services.scheduler.ledger()}["cpu"]
    return row.used + row.claimed


async def _until(services: Services, done: object) -> None:
    """Wait on the scheduler's signals (no fixed sleep) until ``done()`` holds."""
    assert callable(done)
    for _ in range(200):
        if done():
            return
        await services.scheduler.context.signals.wait(0.05)
    raise AssertionError("the scheduler never got there")


async def test_a_load_whose_client_left_is_cancelled_after_its_thread_returns(
    tmp_path: Path,
) -> None:
    backend = FakeBackend()
    services = _services(tmp_path, backend)
    try:
        backend.load_gate.clear()  # the load blocks mid-read until released
        client = Client()
        waiting = asyncio.create_task(_ask(services, client))
        await backend.began(backend.loads, 1)
        client.left.set()
        with pytest.raises(ClientClosed):
            await asyncio.wait_for(waiting, 5)
        # Nobody waits: the load is cancelled, but its thread is still in the backend
        # (it may still be allocating), so the instance and its bytes stay.
        instance = services.scheduler.instance("a@1")
        assert instance is not None and instance.state == "loading"
        assert _reserved(services) == MODEL
        backend.load_gate.set()  # the thread goes on, and its next report stops it
        await _until(services, lambda: _failed(services))
        assert "cancelled" in _failed(services)[0]
        assert services.scheduler.instance("a@1") is None and _reserved(services) == 0
        assert backend.models == []  # it never finished: nothing to unload
        # The version loads normally for the next request.
        await _ask(services)
        assert backend.loads == ["a@1", "a@1"]
    finally:
        backend.load_gate.set()
        await services.scheduler.close()
        services.store.close()


async def test_a_load_that_still_has_a_waiter_carries_on(tmp_path: Path) -> None:
    backend = FakeBackend()
    services = _services(tmp_path, backend)
    try:
        backend.load_gate.clear()
        leaving, staying = Client(), Client()
        first = asyncio.create_task(_ask(services, leaving))
        await backend.began(backend.loads, 1)
        second = asyncio.create_task(_ask(services, staying))
        leaving.left.set()
        with pytest.raises(ClientClosed):
            await asyncio.wait_for(first, 5)
        backend.load_gate.set()
        await asyncio.wait_for(second, 5)
        assert backend.loads == ["a@1"]
        instance = services.scheduler.instance("a@1")
        assert instance is not None and instance.state == "ready"
    finally:
        backend.load_gate.set()
        await services.scheduler.close()
        services.store.close()


async def test_a_loaded_model_of_a_cancelled_load_is_unloaded(tmp_path: Path) -> None:
    """The cancellation arrives after the backend's last progress report: its load
    returns a model, which is unloaded before the reservation goes back."""
    backend = SilentBackend()
    services = _services(tmp_path, backend)
    try:
        backend.load_gate.clear()
        client = Client()
        waiting = asyncio.create_task(_ask(services, client))
        await backend.began(backend.loads, 1)
        instance = services.scheduler.residency.get("a@1")
        assert instance is not None
        client.left.set()
        with pytest.raises(ClientClosed):
            await asyncio.wait_for(waiting, 5)
        assert instance.state == "loading" and _reserved(services) == MODEL
        backend.load_gate.set()
        await _until(services, lambda: services.scheduler.instance("a@1") is None)
        assert backend.unloads == ["a@1"] and _reserved(services) == 0
    finally:
        backend.load_gate.set()
        await services.scheduler.close()
        services.store.close()


def _raw_clients(client: TestClient, count: int) -> list[socket.socket]:
    """``count`` raw connections that each sent a completion request for ``a``: the
    test hangs up on them by closing the sockets."""
    body = b'{"model": "a", "prompt": "hi", "max_tokens": 2}'
    request = (
        b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    port = client.server.port
    assert port is not None
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    for sock in sockets:
        sock.sendall(request)
    return sockets


async def test_an_http_client_that_disconnects_cancels_the_load(tmp_path: Path) -> None:
    backend = FakeBackend()
    services = _services(tmp_path, backend)
    app = build_app(services)
    async with TestClient(TestServer(app)) as client:
        backend.load_gate.clear()
        (sock,) = _raw_clients(client, 1)
        try:
            await backend.began(backend.loads, 1)
        finally:
            sock.close()  # the client gives up while the model loads
        # The handler notices within a poll and the load is cancelled; its thread is
        # still blocked, so the instance keeps its bytes until the gate opens.
        instance = services.scheduler.residency.get("a@1")
        assert instance is not None
        await _until(services, lambda: instance.load_cancelled)
        assert instance.state == "loading" and _reserved(services) == MODEL
        backend.load_gate.set()
        await _until(services, lambda: _failed(services))
        assert "cancelled" in _failed(services)[0]
        assert services.scheduler.instance("a@1") is None and _reserved(services) == 0


async def test_clients_that_hang_up_while_the_model_loads_are_499_not_errors(
    tmp_path: Path,
) -> None:
    """Load generators hang up on what is left at the end of a run: those requests
    end as 499, are not counted against the version rollouts judge, and a request that
    stays is served and counted as usual."""
    backend = FakeBackend()
    services = _services(tmp_path, backend)
    app = build_app(services)
    async with TestClient(TestServer(app)) as client:
        backend.load_gate.clear()
        socks = _raw_clients(client, 3)
        staying = asyncio.create_task(
            client.post("/v1/completions", json={"model": "a", "prompt": "hi", "max_tokens": 2})
        )
        await backend.began(backend.loads, 1)
        for sock in socks:
            sock.close()  # three clients give up while the model loads

        async def requests_by_status() -> dict[str, float]:
            text = await (await client.get("/metrics")).text()
            return {
                sample.labels["status"]: sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "routerd_requests_total" and sample.labels["model"] == "a"
            }

        for _ in range(200):
            if (await requests_by_status()).get("499") == 3:
                break
            await services.scheduler.context.signals.wait(0.05)
        backend.load_gate.set()
        response = await staying
        assert response.status == 200
        assert await requests_by_status() == {"499": 3, "200": 1}
        window = app[STATS].window("a@1", since=0.0)
        assert (window.requests, window.errors) == (1, 0)
