"""The simulated host under the real scheduler: GPUs whose memory follows what the
simulated models hold, and a backend whose models cost what the model table says.

Loads, offloads, restores and unloads run as executor work on the
``VirtualTimeLoop`` and last their table's seconds. Memory is taken where a real
backend takes it (as a load or restore begins) and given back where a real one gives
it back (when an unload or offload ends), so the scheduler's release checks see what
they would see on a GPU. A request holds its lease while its model "generates":
``request_s + per_token_s × completion tokens`` of virtual time, however many run at
once, as an engine that batches continuously serves them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from backends.base import Footprint, GenerationRow, LoadSpec
from contract.errors import InvalidRequest
from contract.generation import Generation, GenerationResult, ModelInfo, Task
from routerd.devices import GpuMemory
from routerd.simulate.costs import ModelCost
from routerd.simulate.loop import VirtualTimeLoop

SIMULATED_PID = 1 << 30
"""The pid the simulated scheduler is told is its own (never this process's: no
walk of /proc for children); the simulated GPUs attribute every byte to it."""


class SimulatedGpus:
    """A ``GpuProbe`` whose per-process usage the simulated models change."""

    def __init__(self, totals: Sequence[int]) -> None:
        self.totals = list(totals)
        self.usage: list[dict[int, int]] = [{} for _ in totals]

    def use(self, index: int, pid: int, nbytes: int) -> None:
        """Make ``pid`` hold ``nbytes`` on GPU ``index`` (0 releases it)."""
        if nbytes:
            self.usage[index][pid] = nbytes
        else:
            self.usage[index].pop(pid, None)

    def add(self, index: int, pid: int, nbytes: int) -> None:
        self.use(index, pid, max(self.usage[index].get(pid, 0) + nbytes, 0))

    def device_count(self) -> int:
        return len(self.totals)

    def name(self, index: int) -> str:
        return f"simulated GPU {index}"

    def uuid(self, index: int) -> str:
        return f"GPU-simulated-{index}"

    def memory(self, index: int) -> GpuMemory:
        used = sum(self.usage[index].values())
        return GpuMemory(total=self.totals[index], free=self.totals[index] - used, used=used)

    def processes(self, index: int) -> Mapping[int, int]:
        return dict(self.usage[index])


class SimulatedModel:
    """One loaded model on a simulated GPU (see the module docstring)."""

    def __init__(self, spec: LoadSpec, cost: ModelCost, backend: SimulatedBackend) -> None:
        self._gpu = int(spec.device.split(":")[1])
        self._cost = cost
        self._backend = backend
        self.info = ModelInfo(Task.GENERATE, 1 << 20, spec.device, "simulated")
        self._on_device = True

    def hold(self, nbytes: int) -> None:
        self._backend.gpus.add(self._gpu, SIMULATED_PID, nbytes)

    def warm_up(self) -> None:
        """Nothing: the table's ``load_s`` is a whole load, warm-up included."""

    def measure_footprint(self) -> Footprint:
        return Footprint(weights=self._cost.bytes)

    async def generate_async(self, generation: Generation) -> GenerationResult:
        tokens = generation.params.max_tokens
        await asyncio.sleep(self._cost.serve_s(tokens))
        return GenerationResult("", len(generation.prompt_ids), tokens, "length")

    def generate(self, generation: Generation) -> GenerationResult:
        raise InvalidRequest("a simulated model generates only through generate_async")

    def generate_batch(
        self, rows: Sequence[GenerationRow], admit: Any, max_rows: int | None = None
    ) -> None:
        raise InvalidRequest("a simulated model generates only through generate_async")

    def encode_prompt(self, text: str) -> list[int]:
        return list(range(len(text.split())))

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        return list(range(len(messages)))

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def decode_tokens(self, token_ids: Sequence[int]) -> str:
        return " ".join(map(str, token_ids))

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        return [[1.0] for _ in inputs]

    def unload(self) -> None:
        on_device, self._on_device = self._on_device, False
        offloaded = not on_device

        def give_back() -> None:
            if on_device:
                self.hold(-self._cost.bytes)
            if offloaded:
                self._backend.host_used -= self._cost.bytes

        self._backend.loop.takes(self._cost.unload_s, give_back)

    # Offloadable: the host-RAM tier, where the simulation has one.

    @property
    def can_offload(self) -> bool:
        return self._backend.host_tier

    def offload(self) -> None:
        def moved() -> None:
            self.hold(-self._cost.bytes)
            self._backend.host_used += self._cost.bytes

        self._on_device = False
        self._backend.loop.takes(self._cost.restore_s, moved)

    def restore(self) -> None:
        self.hold(self._cost.bytes)
        self._on_device = True

        def moved() -> None:
            self._backend.host_used -= self._cost.bytes

        self._backend.loop.takes(self._cost.restore_s, moved)


class SimulatedBackend:
    """Loads ``SimulatedModel``s for the versions of the model table."""

    kind = "simulated"

    def __init__(
        self,
        loop: VirtualTimeLoop,
        gpus: SimulatedGpus,
        costs: Mapping[tuple[str, str], ModelCost],
        *,
        host_tier: bool,
    ) -> None:
        self.loop = loop
        self.gpus = gpus
        self._costs = costs
        self.host_tier = host_tier
        self.host_used = 0  # bytes resting in the host tier

    def cost(self, spec: LoadSpec) -> ModelCost:
        return self._costs[(spec.name, spec.version)]

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return dict(options)

    def task_of(self, path: str, options: Mapping[str, Any]) -> Task:
        """Every simulated model generates (``SimulatedModel.info``)."""
        return Task.GENERATE

    def estimate_footprint(self, spec: LoadSpec) -> Footprint:
        return Footprint(weights=self.cost(spec).bytes)

    def load(self, spec: LoadSpec) -> SimulatedModel:
        cost = self.cost(spec)
        self.loop.takes(cost.load_s)
        model = SimulatedModel(spec, cost, self)
        model.hold(cost.bytes)  # a load holds its memory as it reads
        return model
