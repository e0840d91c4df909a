"""Hand-written fakes for the scheduler's and API's collaborators.

``FakeBackend`` behaves like a real backend as far as the core can tell: it loads on
the instance thread, can be held mid-load (``load_gate``) or made to fail, tokenizes
bytes, and generates deterministic text with stop strings, streaming and
cancellation. ``FakeGpus`` stands in for NVML.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from backends.base import (
    BackendError,
    Cancellation,
    GenerationResult,
    InvalidRequest,
    LoadSpec,
    ModelInfo,
    SamplingParams,
    Task,
    TextSink,
)
from routerd.devices import DeviceInventory, GpuMemory

FAKE_OPTIONS = {"task", "context", "fail_load", "token_delay", "bytes"}


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
        )
        self.unloaded = False
        self.warmed = False

    @property
    def info(self) -> ModelInfo:
        return self._info

    def warm_up(self) -> None:
        self.warmed = True

    def footprint_bytes(self) -> int:
        return int(self.spec.options.get("bytes", 1000))

    def encode_prompt(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        rendered = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return self.encode_prompt(rendered + "assistant: ")

    def count_tokens(self, text: str) -> int:
        return len(text.encode("utf-8"))

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_text: TextSink | None,
        cancellation: Cancellation,
    ) -> GenerationResult:
        self.backend.generate_gate.wait()
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

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        vectors = []
        for ids in inputs:
            raw = [float(len(ids)), float(sum(ids) % 97) + 1.0, 1.0]
            norm = math.sqrt(sum(x * x for x in raw))
            vectors.append([x / norm for x in raw])
        return vectors

    def unload(self) -> None:
        self.unloaded = True
        self.backend.unloads.append(self.spec.name + "@" + self.spec.version)


class FakeBackend:
    kind = "fake"

    def __init__(self) -> None:
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.models: list[FakeModel] = []
        self.load_gate = threading.Event()
        self.load_gate.set()
        self.generate_gate = threading.Event()
        self.generate_gate.set()
        self.generated = 0
        self.load_threads: list[str] = []

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(options) - FAKE_OPTIONS
        if unknown:
            key = sorted(unknown)[0]
            raise InvalidRequest(f"unknown option {key!r}", param=key)
        return dict(options)

    def load(self, spec: LoadSpec) -> FakeModel:
        self.loads.append(spec.name + "@" + spec.version)
        self.load_threads.append(threading.current_thread().name)
        if not Path(spec.path).is_dir():
            raise BackendError(f"{spec.path} is not a directory")
        self.load_gate.wait()
        if spec.options.get("fail_load"):
            raise BackendError(str(spec.options["fail_load"]))
        model = FakeModel(spec, self)
        self.models.append(model)
        return model


class FakeGpus:
    """A GpuProbe with fixed GPUs: ``FakeGpus([(total, used), ...])``."""

    def __init__(self, gpus: Sequence[tuple[int, int]]) -> None:
        self.gpus = list(gpus)

    def device_count(self) -> int:
        return len(self.gpus)

    def name(self, index: int) -> str:
        return f"Fake GPU {index}"

    def memory(self, index: int) -> GpuMemory:
        total, used = self.gpus[index]
        return GpuMemory(total=total, free=total - used, used=used)


def cpu_only_inventory(tmp: Path) -> DeviceInventory:
    meminfo = tmp / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:   12000000 kB\n")
    return DeviceInventory(None, meminfo=meminfo)
