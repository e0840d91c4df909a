"""Hand-written fakes for the scheduler's and API's collaborators.

``FakeBackend`` behaves like a real backend as far as the core can tell: it loads on
the instance thread, can be held mid-load (``load_gate``) or made to fail, tokenizes
bytes, and generates deterministic text with stop strings, streaming and
cancellation. ``FakeGpus`` stands in for NVML.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from backends import echo
from backends.base import (
    MOVING_TO_DEVICE,
    READING_WEIGHTS,
    Footprint,
    GenerationRow,
    LoadSpec,
    RowSource,
)
from contract.errors import BackendError, InvalidRequest, OutOfMemory
from contract.generation import (
    Generation,
    GenerationResult,
    ModelInfo,
    Task,
)
from routerd.devices import DeviceInventory
from routerd.simulate.hardware import SimulatedGpus

FAKE_OPTIONS = {
    "task",
    "context",
    "fail_load",
    "token_delay",
    "bytes",  # the measured footprint
    "estimate",  # the estimated footprint (default: the same as bytes)
    "minimum",  # the estimate's minimum to start; a load granted fewer bytes is refused
    "needed",  # the measurement's minimum: what a load needed to start, beyond what it holds
    "oom_loads",  # this many loads fail with OutOfMemory first
    "leak",  # unloading does not give the GPU memory back
    "inline",  # ModelInfo.inline: request-path calls are made on the event loop
    "kv_tokens",  # ModelInfo.kv_tokens: what the batcher keeps a batch within
    "embed_poison",  # "nan", "inf" or "-inf": the first vector's second number, as models overflow
    "hold",  # bytes the model really allocates and holds until unloaded, left out of its footprint
    "predicted_task",  # what task_of says before a load (default: task); "unknown": None
}


# What the fake cannot honour: it has no probabilities, and sampling is not its business.
FAKE_REFUSES = echo.REFUSES | {
    "min_tokens",
    "stop_token_ids",
    "include_stop_str_in_output",
    "ignore_eos",
    "top_k",
    "min_p",
}


class FakeModel:
    """Answers with the prompt's bytes reversed, one character per token."""

    def __init__(self, spec: LoadSpec, backend: FakeBackend) -> None:
        self.spec = spec
        self.backend = backend
        self._info = ModelInfo(
            task=Task(spec.options.get("task", "generate")),
            context_length=int(spec.options.get("context", 64)),
            device=spec.device,
            dtype="float32",
            has_chat_template=True,
            vocab_size=256,
            inline=bool(spec.options.get("inline", False)),
            kv_tokens=int(spec.options.get("kv_tokens", 0)),
            refuses=FAKE_REFUSES,
        )
        self.unloaded = False
        self.warmed = False
        self.held = bytearray(int(spec.options.get("hold", 0)))  # touched: resident at once

    @property
    def info(self) -> ModelInfo:
        return self._info

    def warm_up(self) -> None:
        self.warmed = True

    def measure_footprint(self) -> Footprint:
        return Footprint(
            weights=int(self.spec.options.get("bytes", 1000)),
            minimum=int(self.spec.options.get("needed", 0)),
        )

    def encode_prompt(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        rendered = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return self.encode_prompt(rendered + "assistant: ")

    def count_tokens(self, text: str) -> int:
        return len(text.encode("utf-8"))

    def decode_tokens(self, token_ids: Sequence[int]) -> str:
        return bytes(token_ids).decode("utf-8", "replace")

    def generate(self, generation: Generation) -> GenerationResult:
        prompt_ids, params, on_text = generation.prompt_ids, generation.params, generation.on_text
        cancellation = generation.cancellation
        self.backend.generate_threads.append(threading.current_thread().name)
        self.backend.generate_gate.wait()
        if self.backend.generate_errors:
            raise self.backend.generate_errors.pop(0)
        source = bytes(reversed(list(prompt_ids))).decode("utf-8", "replace") or "x"
        text = ""
        finish = "length"
        for i in range(params.max_tokens):
            if cancellation.cancelled:
                finish = "cancelled"
                break
            char = source[i % len(source)]
            candidate = text + char
            if any(s in candidate for s in params.stop):
                finish = "stop"
                break
            text = candidate
            if on_text is not None:
                on_text(char)
            delay = float(self.spec.options.get("token_delay", 0))
            if delay:
                time.sleep(delay)
        self.backend.generated += 1
        return GenerationResult(
            text=text,
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(text),
            finish_reason=finish,
        )

    def generate_batch(
        self,
        rows: Sequence[GenerationRow],
        admit: RowSource | None,
        max_rows: int | None = None,
    ) -> None:
        """Runs the rows one after another, then whatever ``admit`` gives, until it gives none."""
        queue = list(rows)
        while True:
            while queue:
                row = queue.pop(0)
                try:
                    row.result = self.generate(row)
                except Exception as exc:
                    row.result, row.error = None, exc
                row.on_done(row)
            if admit is None:
                return
            queue = list(admit(1 << 30 if max_rows is None else max(0, max_rows)))
            if not queue:
                return
            if self.backend.batch_errors:  # raise with the joined rows left unfinished
                raise self.backend.batch_errors.pop(0)

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        self.backend.embed_calls += 1
        self.backend.embed_gate.wait()
        vectors = []
        for ids in inputs:
            raw = [float(len(ids)), float(sum(ids) % 97) + 1.0, 1.0]
            norm = math.sqrt(sum(x * x for x in raw))
            vectors.append([x / norm for x in raw])
        poison = self.spec.options.get("embed_poison")
        if poison is not None and vectors:
            vectors[0][1] = float(poison)
        return vectors

    def unload(self) -> None:
        self.unloaded = True
        self.held = bytearray()
        self.backend.note(self.backend.unloads, self.spec.name + "@" + self.spec.version)
        if not self.spec.options.get("leak"):
            self.backend.on_gpu(self.spec, -self.measure_footprint().total)


class FakeBackend:
    """Loads FakeModels; with ``gpus`` it books their bytes in the fake NVML as this pid."""

    kind = "fake"

    def __init__(self, gpus: FakeGpus | None = None) -> None:
        self.gpus = gpus
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.models: list[FakeModel] = []
        self.load_gate = threading.Event()
        self.load_gate.set()
        self._calls = threading.Condition()  # notified as loads and unloads begin
        self.generate_gate = threading.Event()
        self.generate_gate.set()
        self.generated = 0
        self.embed_gate = threading.Event()  # cleared: embed calls wait (a busy thread)
        self.embed_gate.set()
        self.embed_calls = 0
        self.generate_errors: list[Exception] = []  # raised by the next generate calls
        self.batch_errors: list[Exception] = []  # raised by generate_batch once rows joined
        self.load_threads: list[str] = []
        self.generate_threads: list[str] = []
        self.load_devices: list[str] = []
        self.grants: list[int] = []  # LoadSpec.grant_bytes of every load, in order
        self.task_queries: list[str] = []  # the path of every task_of call, in order
        self.knowns: list[Footprint | None] = []  # LoadSpec.known of every load, in order

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(options) - FAKE_OPTIONS
        if unknown:
            key = sorted(unknown)[0]
            raise InvalidRequest(f"unknown option {key!r}", param=key)
        return dict(options)

    def task_of(self, path: str, options: Mapping[str, Any]) -> Task | None:
        """The ``task`` option, unless ``predicted_task`` says otherwise (a prediction
        the load then contradicts); BackendError for a folder that does not exist."""
        self.task_queries.append(path)
        if not Path(path).is_dir():
            raise BackendError(f"{path} is not a directory")
        predicted = options.get("predicted_task", options.get("task", "generate"))
        return None if predicted == "unknown" else Task(predicted)

    def estimate_footprint(self, spec: LoadSpec) -> Footprint:
        if not Path(spec.path).is_dir():
            raise BackendError(f"{spec.path} is not a directory")
        return Footprint(
            weights=int(spec.options.get("estimate", spec.options.get("bytes", 1000))),
            minimum=int(spec.options.get("minimum", 0)),
        )

    def on_gpu(self, spec: LoadSpec, nbytes: int) -> None:
        if self.gpus is not None and spec.device.startswith("cuda:"):
            self.gpus.add(int(spec.device.split(":")[1]), os.getpid(), nbytes)

    async def began(self, calls: list[str], count: int, limit: float = 5.0) -> None:
        """Wait until ``calls`` (``loads`` or ``unloads``) holds ``count`` entries: they
        are made on instance threads, so this waits on a condition, not on time."""

        def wait() -> bool:
            with self._calls:
                return self._calls.wait_for(lambda: len(calls) >= count, limit)

        assert await asyncio.to_thread(wait), f"only {calls} after {limit}s"

    def note(self, calls: list[str], model_id: str) -> None:
        with self._calls:
            calls.append(model_id)
            self._calls.notify_all()

    def load(self, spec: LoadSpec) -> FakeModel:
        model_id = spec.name + "@" + spec.version
        self.note(self.loads, model_id)
        self.load_devices.append(spec.device)
        self.load_threads.append(threading.current_thread().name)
        self.grants.append(spec.grant_bytes)
        self.knowns.append(spec.known)
        if not Path(spec.path).is_dir():
            raise BackendError(f"{spec.path} is not a directory")
        minimum = int(spec.options.get("minimum", 0))
        if 0 < spec.grant_bytes < minimum:  # as vLLM refuses a grant with no room for KV
            raise BackendError(f"{spec.grant_bytes} bytes granted; starting needs {minimum}")
        size = int(spec.options.get("bytes", 1000))
        spec.report(READING_WEIGHTS, size // 2, size)  # half read while the gate holds it
        self.load_gate.wait()
        spec.report(MOVING_TO_DEVICE, size, size)
        if spec.options.get("fail_load"):
            raise BackendError(str(spec.options["fail_load"]))
        if self.loads.count(model_id) <= int(spec.options.get("oom_loads", 0)):
            raise OutOfMemory(f"CUDA out of memory loading {model_id}")
        model = FakeModel(spec, self)
        self.on_gpu(spec, model.measure_footprint().total)
        self.models.append(model)
        return model


class FakeGpus(SimulatedGpus):
    """A GpuProbe with GPUs whose per-process usage a test sets and changes (the
    simulator's GPUs, named as fakes).

    ``FakeGpus([total0, total1])``; ``use(index, pid, bytes)`` makes a process hold
    memory there (``bytes=0`` releases it); used and free follow from the processes.
    """

    def name(self, index: int) -> str:
        return f"Fake GPU {index}"

    def uuid(self, index: int) -> str:
        return f"GPU-fake-{index}"


MEMINFO = "MemTotal:       16000000 kB\nMemAvailable:   12000000 kB\n"


def cpu_only_inventory(tmp: Path, cpu_budget: int = 8 * 1024**3) -> DeviceInventory:
    meminfo = tmp / "meminfo"
    meminfo.write_text(MEMINFO)
    return DeviceInventory(None, meminfo=meminfo, cpu_budget=cpu_budget)
