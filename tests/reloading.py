"""A model served, evicted, served again, and served once more by a restarted daemon.

Every backend must survive this (issue 16): the second load is granted the footprint
the first one measured and stored, the third (a new daemon over the same state dir)
the one the second stored, and each must start in its grant and answer a greedy
request exactly as the first load did. The scenario goes through the real scheduler
and HTTP app; only the backend is wrapped, by :class:`GrantRecorder`, to see what
each load was granted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from backends.base import Backend, Footprint, LoadedModel, LoadSpec
from backends.registry import BackendRegistry
from contract.generation import Task
from routerd.app import build_app, build_services
from routerd.config import Config
from routerd.devices import DeviceInventory
from state import FootprintRecord, Store


class GrantRecorder:
    """A backend that hands every call to a real one and notes what each load got.

    ``grants`` holds ``LoadSpec.grant_bytes`` of every load, ``estimates`` every
    estimate the scheduler asked for, in order.
    """

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.grants: list[int] = []
        self.estimates: list[Footprint] = []

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return self.inner.validate_options(options)

    def task_of(self, path: str, options: Mapping[str, Any]) -> Task | None:
        return self.inner.task_of(path, options)

    def estimate_footprint(self, spec: LoadSpec) -> Footprint:
        estimate = self.inner.estimate_footprint(spec)
        self.estimates.append(estimate)
        return estimate

    def load(self, spec: LoadSpec) -> LoadedModel:
        self.grants.append(spec.grant_bytes)
        return self.inner.load(spec)


@dataclass(frozen=True)
class Served:
    """One load of the scenario: the answer it gave, what it was granted, what it stored."""

    text: str
    grant: int
    estimate: Footprint
    stored: FootprintRecord


async def _complete(client: TestClient[Any, Any], body: Mapping[str, Any]) -> str:
    response = await client.post("/v1/completions", json=dict(body))
    assert response.status == 200, await response.text()
    text: str = (await response.json())["choices"][0]["text"]
    return text


async def serve_evict_serve_restart(
    config: Config,
    backend: Callable[[], Backend],
    devices: Callable[[], DeviceInventory],
    model_id: str,
    body: Mapping[str, Any],
) -> list[Served]:
    """Serve ``body`` on a fresh load, after an eviction, and after a restart.

    ``backend`` and ``devices`` build each daemon's own (a restart builds new ones);
    ``body`` is a completion request naming ``model_id``'s model; each request must
    load it (nothing else is loaded meanwhile). Returns the three loads in order.
    """
    name, _, version = model_id.partition("@")
    served: list[Served] = []

    async def one_load(client: TestClient[Any, Any], recorder: GrantRecorder, store: Store) -> None:
        loads = len(recorder.grants)
        text = await _complete(client, body)
        assert len(recorder.grants) == loads + 1, "the request did not load the model once"
        stored = store.measured_footprint(name, version, "cpu")  # these tests run on the CPU
        assert stored is not None, f"{model_id}: no footprint stored after its load"
        served.append(Served(text, recorder.grants[-1], recorder.estimates[-1], stored))

    for daemon in range(2):
        recorder = GrantRecorder(backend())
        services = build_services(
            config,
            backends=BackendRegistry({recorder.kind: _always(recorder)}),
            devices=devices(),
        )
        async with TestClient(TestServer(build_app(services), host="127.0.0.1")) as client:
            await one_load(client, recorder, services.store)
            if daemon == 0:
                await services.scheduler.evict(model_id)
                assert services.scheduler.instance(model_id) is None
                await one_load(client, recorder, services.store)
    return served


def _always(backend: Backend) -> Callable[[], Backend]:
    """A registry factory that hands out ``backend`` itself."""
    return lambda: backend
