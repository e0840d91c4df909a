"""The ``vllm`` backend: vLLM's ``AsyncLLM`` engine inside the routerd process.

vLLM batches continuously by itself, so its instances skip routerd's batch loop: the
batcher hands every request to ``generate_async`` on the event loop (see
``backends.base.AsyncGenerating``), and vLLM streams deltas back. Every sampling field is
vLLM's own, so every one is honoured (``ModelInfo.refuses`` stays empty); the mapping
and the reading of vLLM's outputs (text, tokens, raw log-probabilities) live in
:mod:`backends.vllm_sampling`. Loading, measuring and unloading still run on the
instance thread like every backend's.

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
per-process bytes on a GPU, the resident memory of the process tree on the CPU — with
what the start needed (overhead included) as its minimum, so that the footprint
learned from it is enough for the next start.

Unloading shuts the engine down and checks that its processes are gone (they are
killed if they linger); a start that fails kills whatever it had spawned.

Options and the load plan (sizes, the KV cache fitted to the grant) live in
:mod:`backends.vllm_plan`; starting, measuring and ending the engine's processes in
:mod:`backends.vllm_engine`; this module holds the backend and the loaded model.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from backends import hf_text, vllm_engine, vllm_plan, vllm_sampling
from backends.base import Footprint, GenerationRow, LoadSpec, RowSource
from contract.errors import BackendError, InvalidRequest
from contract.generation import (
    Generation,
    GenerationResult,
    ModelInfo,
    SamplingParams,
    Task,
)

log = logging.getLogger("routerd.backends.vllm")

# Attention types vLLM keeps no KV cache for: their instances hold none, and their
# measured footprint says so (the first estimate still reserves one).
_NO_KV_CACHE = ("encoder_only", "attention_free")
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


class VllmBackend:
    """Runs local Hugging Face folders with vLLM's engine, on cpu or one cuda device."""

    kind = "vllm"

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """See :func:`backends.vllm_plan.validate_options`."""
        return vllm_plan.validate_options(options)

    def task_of(self, path: str, options: Mapping[str, Any]) -> Task | None:
        """See :func:`backends.vllm_plan.task_of`."""
        return vllm_plan.task_of(path, options)

    def estimate_footprint(self, spec: LoadSpec) -> Footprint:
        """Weights from safetensors headers, the wanted KV cache, the process overhead;
        at least weights, overhead and one sequence's KV cache, or the load refuses."""
        plan = vllm_plan.plan_load(spec)
        return Footprint(
            weights=plan.weights,
            runtime=plan.kv_wanted,
            working=plan.overhead,
            minimum=plan.least_grant,
        )

    def load(self, spec: LoadSpec) -> VllmModel:
        """Start an engine whose KV cache fits the grant; on failure leave no process."""
        plan = vllm_plan.plan_load(spec)
        kv_bytes = plan.kv_for(spec.grant_bytes)
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(plan.folder), local_files_only=True)
        except Exception as exc:
            raise BackendError(f"cannot read the tokenizer in {plan.folder}: {exc}") from exc
        engine, pids = vllm_engine.start_engine(spec, plan, kv_bytes)
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


class VllmModel(hf_text.HfTokenizing):
    """One running engine; its request path is ``generate_async`` (or, for a pooling
    model, ``embed_async``) on the event loop."""

    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        info: ModelInfo,
        spec: LoadSpec,
        plan: vllm_plan.Plan,
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
        self._token_texts = hf_text.TokenTexts(tokenizer)

    @property
    def info(self) -> ModelInfo:
        return self._info

    # -- tokenizing: encode_prompt, encode_chat, count_tokens, decode_tokens (hf_text.HfTokenizing)

    # -- generation (event loop) -------------------------------------------------

    async def generate_async(self, generation: Generation) -> GenerationResult:
        """Submit one request to the engine and stream its deltas through ``on_text``.

        The request runs in a task of its own so that its cancellation can end it at
        once (vLLM aborts a request whose generator is cancelled) and still return the
        text so far; cancelling the caller cancels it too.
        """
        if self._info.task is not Task.GENERATE:
            raise InvalidRequest(f"model {self._name} is an embedding model; it generates no text")
        if not generation.prompt_ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if self._engine is None:
            raise BackendError(f"model {self._name} is unloaded")
        cancellation = generation.cancellation
        if cancellation.cancelled:
            return GenerationResult("", len(generation.prompt_ids), 0, "cancelled")
        task = asyncio.ensure_future(self._run(generation))

        def stop() -> None:
            task.cancel()

        cancellation.on_cancel = stop
        try:
            return await task
        finally:
            cancellation.on_cancel = None

    async def _run(self, generation: Generation) -> GenerationResult:
        from vllm.exceptions import VLLMClientError

        params = generation.params
        prompt_ids = list(generation.prompt_ids)
        reader = vllm_sampling.OutputReader(
            params, prompt_ids, self._token_texts, generation.on_text, generation.on_logprob
        )
        if vllm_sampling.drops_output(params) and params.prompt_logprobs is None:
            return reader.result()  # nothing to generate and nothing to score
        request_id = f"routerd-{next(_REQUEST_IDS)}"
        try:
            sampling = _vllm_sampling(params)
            async for output in self._engine.generate(
                {"prompt_token_ids": prompt_ids}, sampling, request_id
            ):
                reader.take(output)
        except VLLMClientError as exc:  # what vLLM refuses in a request: the client's to fix
            raise InvalidRequest(f"vLLM refused the request: {exc}", param=_param(exc)) from exc
        except asyncio.CancelledError:
            if not generation.cancellation.cancelled:
                raise  # the caller itself was cancelled
            reader.cancelled()
        return reader.result()

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

    def generate(self, generation: Generation) -> GenerationResult:
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
        """What the engine's processes hold (NVML bytes on a GPU, resident memory on
        cpu), with what this start needed as its ``minimum``.

        The processes may hold less than the planned overhead (a CPU engine's are
        often smaller than the default), but the next load is granted what is learned
        here and ``Plan.kv_for`` takes the whole overhead off that grant before the KV
        cache: the minimum (weights, this KV cache or one sequence's, the overhead)
        is what the next start needs to get the KV cache this one has.
        """
        held = vllm_engine.held_bytes(self.pids, self._info.device)
        plan = self._plan
        return Footprint(
            weights=plan.weights,
            runtime=self.kv_bytes,
            working=max(held - plan.weights - self.kv_bytes, 0),
            minimum=max(plan.least_grant, plan.weights + plan.overhead + self.kv_bytes),
        )

    def unload(self) -> None:
        """Shut the engine down and check that its processes are gone (kill leftovers)."""
        engine, self._engine = self._engine, None
        if engine is None:
            return
        try:
            engine.shutdown(timeout=vllm_engine.SHUTDOWN_WAIT_S)
        except Exception:
            log.exception("shutting down the vLLM engine of %s failed", self._name)
        del engine
        gc.collect()  # the engine object goes now, not at interpreter exit
        vllm_engine.end_processes(self.pids, self._name)


def _vllm_sampling(params: SamplingParams) -> Any:
    """vLLM's ``SamplingParams`` for ``params``, streamed as deltas."""
    from vllm import SamplingParams as VllmSampling
    from vllm.sampling_params import RequestOutputKind

    return VllmSampling(
        **vllm_sampling.sampling_kwargs(params), output_kind=RequestOutputKind.DELTA
    )


def _param(exc: Exception) -> str | None:
    """The request field vLLM named in a refusal, when it is one of routerd's too."""
    name = getattr(exc, "parameter", None)
    return name if isinstance(name, str) and name in SamplingParams.__slots__ else None
