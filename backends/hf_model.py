"""A loaded ``transformers`` model: requests, warm-up, measuring and unloading.

Generation runs the decode loop of :mod:`backends.hf_batch` over the model's forward
pass (``generate`` is a batch of one); embeddings are the mean of the last hidden
states over real tokens. ``warm_up`` profiles a prompt of the whole context
(:mod:`backends.hf_measure`) and ``measure_footprint`` reports what it really took.
"""

from __future__ import annotations

import gc
import inspect
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch

from backends import footprint, hf_batch, hf_measure, hf_sampling, hf_text
from backends.base import Footprint, GenerationRow, RowSource, generate_alone
from backends.host_memory import glibc_trim
from contract.errors import BackendError, InvalidRequest, OutOfMemory
from contract.generation import (
    Generation,
    GenerationResult,
    ModelInfo,
    SamplingParams,
    Task,
)


class TransformersModel(hf_text.HfTokenizing):
    """One loaded folder on one device; implements ``backends.base.LoadedModel``."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        info: ModelInfo,
        device: torch.device,
        name: str,
        known: Footprint | None = None,
        on_unload: Callable[[Any, Any], None] | None = None,
    ) -> None:
        self._model: Any = model
        self._tokenizer: Any = tokenizer
        self._info = info
        self._device = device
        self._name = name
        self._eos_ids = _eos_ids(model, tokenizer)
        self._token_texts = hf_text.TokenTexts(tokenizer)
        params = inspect.signature(model.forward).parameters
        # transformers 5.x renamed past_key_values to cache.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_arg = "logits_to_keep" if "logits_to_keep" in params else None
        # Embeddings need no KV cache; decoders loaded as AutoModel build one unless told.
        self._no_cache = {"use_cache": False} if "use_cache" in params else {}
        self._profile: hf_measure.Profile | None = None  # what warm_up measured
        self._known = known  # a footprint measured before, which spares the profile
        self.profiled = False  # whether warm_up ran the profile pass
        self._on_unload = on_unload  # given the tokenizer and module (the backend's shelf)
        # Freed CPU memory goes back to the kernel after large passes (backends.heap).
        self._release_memory = glibc_trim() if device.type == "cpu" else None

    @property
    def info(self) -> ModelInfo:
        return self._info

    # -- tokenizing: encode_prompt, encode_chat, count_tokens, decode_tokens (hf_text.HfTokenizing)

    def _decode(self, ids: Sequence[int]) -> str:
        text = self._tokenizer.decode(
            list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return str(text)

    def _check_ids(self, ids: Sequence[int], param: str, what: str) -> None:
        if not ids:
            raise InvalidRequest(f"{what} is empty", param=param)
        if len(ids) > self._info.context_length:
            raise InvalidRequest(
                f"{what} has {len(ids)} tokens; the context of {self._name} "
                f"is {self._info.context_length}",
                param=param,
            )
        vocab = self._info.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequest(f"{what} holds token ids outside 0..{vocab - 1}", param=param)

    # -- generation -------------------------------------------------------------

    def generate(self, generation: Generation) -> GenerationResult:
        """One row decoded alone: ``generate_batch`` with a batch of one."""
        self._require(Task.GENERATE)
        self._check_ids(generation.prompt_ids, "prompt", "the prompt")
        return generate_alone(self.generate_batch, generation)

    def generate_batch(
        self, rows: Sequence[GenerationRow], admit: RowSource | None, max_rows: int | None = None
    ) -> None:
        """Decode ``rows`` together, letting ``admit``'s rows join between steps.

        The loop lives in :mod:`backends.hf_batch`; ``max_rows`` caps the running
        batch (None: as many as ``admit`` gives).
        """
        try:
            model = self._require(Task.GENERATE)
        except Exception as exc:  # every row is told, as the protocol promises
            for row in rows:
                row.result, row.error = None, exc
                row.on_done(row)
            return
        pad_id = self._tokenizer.pad_token_id
        decoder = hf_batch.Decoder(
            model=model,
            device=self._device,
            cache_arg=self._cache_arg,
            keep_arg=self._keep_arg,
            pad_id=0 if pad_id is None else int(pad_id),
            eos_ids=self._eos_ids,
            context_length=self._info.context_length,
            decode=self._decode,
            check=lambda ids: self._check_ids(ids, "prompt", "the prompt"),
            release_memory=self._release_memory,
            token_text=self._token_texts,
        )
        with torch.inference_mode():
            hf_batch.generate_batch(decoder, rows, admit, max_rows)

    def _step(self, model: Any, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """One forward pass; returns the last position's logits and the grown cache."""
        kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": True}
        if cache is not None:
            kwargs[self._cache_arg] = cache
        if self._keep_arg is not None:
            kwargs[self._keep_arg] = 1
        out = model(**kwargs)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = out.past_key_values
        logits: torch.Tensor = out.logits[0, -1, :]
        return logits, new_cache

    # -- embeddings -------------------------------------------------------------

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        """Mean of the last hidden states over real tokens, L2-normalized.

        Inputs are padded on the right: absolute position embeddings (BERT) then
        see the same positions as for an input alone, and causal models never
        attend to the padding, so a batch gives the vectors of one-at-a-time. They go
        through in passes of at most one context's padded tokens, the pass warm-up
        measured (:func:`backends.hf_batch.first_pass`).
        """
        model = self._require(Task.EMBED)
        for index, ids in enumerate(inputs):
            self._check_ids(ids, "input", f"input {index}")
        vectors: list[list[float]] = []
        while len(vectors) < len(inputs):
            rest = inputs[len(vectors) :]
            count = hf_batch.first_pass([len(ids) for ids in rest], self._info.context_length)
            vectors.extend(self._embed_pass(model, rest[:count]))
        return vectors

    def _embed_pass(self, model: Any, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        """One forward pass over ``inputs`` (at most a context's padded tokens)."""
        width = max(len(ids) for ids in inputs)
        pad_id = self._tokenizer.pad_token_id
        pad_id = 0 if pad_id is None else int(pad_id)
        batch = torch.full((len(inputs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for row, ids in enumerate(inputs):
            batch[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
            mask[row, : len(ids)] = 1
        with torch.inference_mode():
            batch, mask = batch.to(self._device), mask.to(self._device)
            out = model(input_ids=batch, attention_mask=mask, **self._no_cache)
            hidden = out.last_hidden_state.float()
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
            vectors = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
            result: list[list[float]] = vectors.cpu().tolist()
        return result

    # -- lifecycle --------------------------------------------------------------

    def warm_up(self) -> None:
        """Profile the largest pass the instance admits, then run one tiny real request.

        Where the load was given the footprint this version was measured at before
        (``LoadSpec.known``), the profile is taken from it instead of from a pass:
        the same options, batch limits and context give the same KV bytes per token
        and working memory, and the profile pass is most of a load's time.

        The profile is a prompt of the whole context: for generation, the prefill
        forward (the same ``_step`` requests use) and the sampling of its token;
        for embeddings, one input of that length through ``embed``. While it runs,
        the tensor memory it takes is measured and the KV cache it produced is
        weighed (see :func:`backends.hf_measure.measure`); ``measure_footprint``
        reports both.
        The tiny request then exercises the decode step as a client would.
        Raises OutOfMemory when the device cannot hold the profile.
        """
        ids = self.encode_prompt("Hello")
        length = self._info.context_length
        filler = self._tokenizer.encode(" hello", add_special_tokens=False) or ids
        profile_ids = (ids + filler * length)[:length]
        generating = self._info.task is Task.GENERATE
        model = self._require(self._info.task)

        def prefill() -> Any:
            prompt = torch.tensor([profile_ids], dtype=torch.long, device=self._device)
            logits, cache = self._step(model, prompt, None)
            hf_sampling.sample(logits, SamplingParams(max_tokens=1, temperature=0.0), None)
            return cache

        if self._known is not None:
            # One token: the prefill path every request takes, nothing more to measure.
            self._profile = self._profile_from(self._known)
            if generating:
                self.generate(Generation(ids, SamplingParams(max_tokens=1, temperature=0.0)))
            else:
                self.embed([ids])
            return
        self.profiled = True
        try:
            if generating:
                self._profile = hf_measure.measure(
                    prefill, self._model, self._device, cached_tokens=length
                )
                self.generate(Generation(ids, SamplingParams(max_tokens=2, temperature=0.0)))
            else:
                self._profile = hf_measure.measure(
                    lambda: self.embed([profile_ids]), self._model, self._device, cached_tokens=0
                )
                self.embed([ids])
        except torch.OutOfMemoryError as exc:
            traceback.clear_frames(exc.__traceback__)
            release_memory(self._device)
            raise OutOfMemory(
                f"model {self._name} cannot process a prompt of its whole context "
                f"({length} tokens) on {self._info.device}: {exc}"
            ) from exc

    def _profile_from(self, known: Footprint) -> hf_measure.Profile:
        """The profile a footprint measured before implies (``measure_footprint`` inverted)."""
        tokens = self._info.kv_tokens
        per_token = known.runtime / tokens if tokens else 0.0
        return hf_measure.Profile(kv_bytes_per_token=per_token, working=known.working)

    def measure_footprint(self) -> Footprint:
        """What the instance holds, measured; call after ``warm_up``.

        ``weights``: bytes of the module's parameters and buffers, each storage
        counted once (tied weights share one). ``runtime``: the KV bytes per token
        the warm-up's cache really held × ``info.kv_tokens``, the tokens the cache is
        reserved for (0 for embeddings), as the estimate counts them. ``working``: what
        the warm-up's profile measured, or one layer of that cache where larger
        (:func:`backends.footprint.reshape_bytes`), as the estimate counts it.
        An unloaded instance holds nothing.
        """
        if self._model is None:
            return Footprint(weights=0)
        if self._profile is None:
            raise BackendError(f"model {self._name} must be warmed up before it is measured")
        tensors = [*self._model.parameters(), *self._model.buffers()]
        runtime = round(self._profile.kv_bytes_per_token * self._info.kv_tokens)
        reshape = footprint.reshape_bytes(self._model.config, runtime)
        return Footprint(
            weights=sum(hf_measure.tensor_storages(tensors).values()),
            runtime=runtime,
            working=max(self._profile.working, reshape),
        )

    # -- the host-RAM tier (backends.base.Offloadable) ---------------------------------

    @property
    def can_offload(self) -> bool:
        """On the CPU the weights already are host memory; on a GPU they need pinned
        host memory to come back at copy speed, which CUDA provides."""
        return self._model is not None and self._device.type in ("cpu", "cuda")

    def offload(self) -> None:
        """Keep the weights in host memory, give back the rest.

        On a GPU each parameter and buffer is copied into pinned host memory and the
        device's copy freed, then the caching allocator's blocks are returned. On the
        CPU the weights stay where they are (host memory, often the checkpoint's own
        mapped pages); what a batch left in the allocator's pools goes back."""
        model = self._require(self._info.task)
        if self._device.type == "cuda":
            with torch.inference_mode():
                for tensor in _storages(model):
                    host = torch.empty_like(tensor.data, device="cpu", pin_memory=True)
                    host.copy_(tensor.data)
                    tensor.data = host
            torch.cuda.synchronize(self._device)
        release_memory(self._device)
        if self._release_memory is not None:
            self._release_memory()

    def restore(self) -> None:
        """The offloaded weights back onto the device: non-blocking copies from pinned
        memory, one synchronisation at the end (nothing to do on the CPU)."""
        model = self._require(self._info.task)
        if self._device.type == "cuda":
            with torch.inference_mode():
                for tensor in _storages(model):
                    tensor.data = tensor.data.to(self._device, non_blocking=True)
            torch.cuda.synchronize(self._device)

    def unload(self) -> None:
        tokenizer, self._tokenizer = self._tokenizer, None
        self._token_texts = hf_text.TokenTexts(None)  # holds neither texts nor the tokenizer
        model, self._model = self._model, None
        if tokenizer is not None and self._on_unload is not None:
            self._on_unload(tokenizer, model)  # the model's weights are emptied there
        del model
        release_memory(self._device)

    def _require(self, task: Task) -> Any:
        if self._model is None:
            raise BackendError(f"model {self._name} was unloaded")
        if self._info.task is not task:
            raise InvalidRequest(
                f"model {self._name} is loaded for {self._info.task.value}, not {task.value}",
                param="model",
            )
        return self._model


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """End-of-sequence ids: generation_config's list, else the tokenizer's eos."""
    config = getattr(model, "generation_config", None)
    value = getattr(config, "eos_token_id", None)
    if value is None:
        value = getattr(tokenizer, "eos_token_id", None)
    if value is None:
        return frozenset()
    if isinstance(value, int):
        return frozenset({value})
    return frozenset(int(v) for v in value)


def _storages(model: Any) -> list[torch.Tensor]:
    """Every parameter and buffer of ``model``, a tied weight once (moving it once keeps
    it tied: both modules hold the same ``Parameter``)."""
    seen: set[int] = set()
    tensors: list[torch.Tensor] = []
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors.append(tensor)
    return tensors


def release_memory(device: torch.device) -> None:
    """Give freed tensors' memory back now: collect cycles that still hold them, and
    return the CUDA caching allocator's free blocks so other instances can use them."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
