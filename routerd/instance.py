"""One loaded model on one device, and the thread that does its blocking work.

Every instance gets its own single-thread executor (DESIGN.md rule 6): loading,
warm-up, forward passes and unloading all run there, one at a time, so a model
that is loading never blocks the event loop or another model's requests.

Only the scheduler creates instances and changes their ``state``; handlers see
them through a lease.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from backends.base import LoadedModel
from state import VersionRecord

T = TypeVar("T")


class InstanceState(StrEnum):
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    DRAINING = "draining"
    UNLOADING = "unloading"


class Instance:
    """A version resident (or becoming resident) on a device."""

    def __init__(self, record: VersionRecord, device: str, *, estimated_bytes: int) -> None:
        self.record = record
        self.device = device
        self.state = InstanceState.LOADING
        self.estimated_bytes = estimated_bytes
        self.bytes = 0
        self.in_flight = 0
        self.load_started = time.monotonic()
        self.load_ms: float | None = None
        self.last_used = time.time()
        self._model: LoadedModel | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"routerd-{record.model_id}"
        )
        self.idle = asyncio.Event()
        self.idle.set()
        self.gone = asyncio.Event()

    @property
    def model_id(self) -> str:
        return self.record.model_id

    @property
    def model(self) -> LoadedModel:
        if self._model is None:
            raise RuntimeError(f"{self.model_id} has no loaded model (state {self.state})")
        return self._model

    def attach(self, model: LoadedModel) -> None:
        self._model = model

    def detach(self) -> LoadedModel | None:
        model, self._model = self._model, None
        return model

    async def run(self, fn: Callable[..., T], /, *args: object) -> T:
        """Run blocking ``fn(*args)`` on this instance's own thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def acquire(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def release(self) -> None:
        self.in_flight -= 1
        self.last_used = time.time()
        if self.in_flight == 0:
            self.idle.set()

    def close_executor(self) -> None:
        """Stop the thread once its queued work is done; never blocks the loop."""
        self._executor.shutdown(wait=False)


@dataclass(frozen=True)
class InstanceSnapshot:
    """What status pages and routerctl see of an instance; copied, never live."""

    model: str
    version: str
    backend: str
    device: str
    state: str
    bytes: int
    estimated_bytes: int
    in_flight: int
    pinned: bool
    last_used: float
    load_ms: float | None

    @classmethod
    def of(cls, instance: Instance) -> InstanceSnapshot:
        return cls(
            model=instance.record.name,
            version=instance.record.version,
            backend=instance.record.backend,
            device=instance.device,
            state=str(instance.state),
            bytes=instance.bytes,
            estimated_bytes=instance.estimated_bytes,
            in_flight=instance.in_flight,
            pinned=False,
            last_used=instance.last_used,
            load_ms=instance.load_ms,
        )
