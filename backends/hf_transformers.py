"""The ``transformers`` backend: any local Hugging Face folder, run in-process by torch.

It serves two tasks: text generation (``*ForCausalLM`` checkpoints) and
embeddings (encoders such as BERT). It reads local folders only — never the
network — and only safetensors weights, so loading cannot run pickled code, unless a
model's options say ``allow_pickle = true`` and its folder has no safetensors.

Generation is a hand-written decode loop over the model's forward pass with its
KV cache rather than ``model.generate``: routerd needs to check cancellation,
stop strings and stream text between every two tokens. The loop decodes many
rows at once, which join and leave between steps (:mod:`backends.hf_batch`);
``generate`` is a batch of one. Its text-side parts (incremental detokenizing,
stop-string holdback) live in :mod:`backends.hf_text`.

Footprints (DESIGN.md rule 5): ``estimate_footprint`` reads config and
safetensors headers (arithmetic in :mod:`backends.footprint`); ``warm_up``
profiles a prompt of the whole context (measured by :mod:`backends.hf_measure`)
and ``measure_footprint`` reports what that really took.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import re
import threading
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from backends import footprint, hf_batch, hf_measure, hf_text
from backends.base import (
    MOVING_TO_DEVICE,
    READING_WEIGHTS,
    BackendError,
    Cancellation,
    Footprint,
    GenerationResult,
    GenerationRow,
    InvalidRequest,
    LoadSpec,
    ModelInfo,
    OutOfMemory,
    RowSource,
    SamplingParams,
    Task,
    TextSink,
    generate_alone,
)
from backends.options import invalid, is_positive_int, reject_unknown

_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_TASKS = ("auto", "generate", "embed")
_OPTION_KEYS = ("dtype", "task", "max_context", "max_concurrency", "allow_pickle")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


class _ProgressBars:
    """Hides transformers' "Loading weights" bars, which would litter daemon logs.

    Loads run in several executor threads at once, so hiding is reference-counted
    and the global switch is restored only when the last load finishes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._was_enabled = True

    @contextlib.contextmanager
    def hidden(self) -> Iterator[None]:
        from transformers.utils import logging

        hf_logging: Any = logging  # untyped module
        with self._lock:
            if self._users == 0:
                self._was_enabled = hf_logging.is_progress_bar_enabled()
                hf_logging.disable_progress_bar()
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0 and self._was_enabled:
                    hf_logging.enable_progress_bar()


_PROGRESS_BARS = _ProgressBars()


class TransformersBackend:
    """Loads local Hugging Face folders with ``transformers`` on cpu or one cuda device."""

    kind = "transformers"

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Check ``dtype``, ``task``, ``max_context`` and ``max_concurrency``; fill in defaults.

        ``max_concurrency`` is how many sequences the instance decodes at once: its
        KV cache is reserved for that many full contexts. Default 1.
        """
        reject_unknown(options, _OPTION_KEYS, "transformers")
        dtype = options.get("dtype", "auto")
        if dtype not in _DTYPES:
            raise invalid("dtype", dtype, ", ".join(_DTYPES))
        task = options.get("task", "auto")
        if task not in _TASKS:
            raise invalid("task", task, ", ".join(_TASKS))
        normalized: dict[str, Any] = {"dtype": dtype, "task": task}
        allow_pickle = options.get("allow_pickle", False)
        if not isinstance(allow_pickle, bool):
            raise invalid("allow_pickle", allow_pickle, "true or false")
        if allow_pickle:
            normalized["allow_pickle"] = True
        for key in ("max_context", "max_concurrency"):
            if key in options:
                value = options[key]
                if not is_positive_int(value):
                    raise invalid(key, value, "a positive integer")
                normalized[key] = value
        return normalized

    def estimate_footprint(self, spec: LoadSpec) -> Footprint:
        """Bytes ``spec`` will need, from config and safetensors headers (no weights read).

        ``weights``: header tensor sizes in the load dtype (a causal checkpoint
        loaded for embeddings drops its ``lm_head``). ``runtime``: KV bytes per
        token × context length × ``max_concurrency`` for generation, 0 for
        embeddings. ``working``: :func:`backends.footprint.working_bytes` for one
        prompt of the whole context — the same pass ``warm_up`` measures; not
        multiplied by ``max_concurrency``, as an instance runs one pass at a time.
        """
        plan = self._plan(spec)
        if plan.pickled:
            # No headers to read: the files' size stands in until warm-up measures.
            return Footprint(weights=sum(p.stat().st_size for p in _pickle_files(plan.folder)))
        tensors = footprint.read_checkpoint(plan.folder)
        if plan.task is Task.EMBED and plan.causal:
            # AutoModel loads the base model of a *ForCausalLM checkpoint, without its head.
            tensors = {n: t for n, t in tensors.items() if not n.startswith("lm_head.")}
        dtype_bytes = plan.dtype.itemsize
        runtime = 0
        if plan.task is Task.GENERATE:
            per_token = footprint.kv_cache_bytes_per_token(plan.config, dtype_bytes)
            runtime = per_token * plan.context_length * plan.max_concurrency
        gated = any("gate_proj" in name or "gate_up_proj" in name for name in tensors)
        working = footprint.working_bytes(
            plan.config, plan.context_length, dtype_bytes, decoder=plan.causal, gated_mlp=gated
        )
        return Footprint(
            weights=footprint.weights_bytes(tensors.values(), dtype_bytes),
            runtime=runtime,
            working=working,
        )

    def load(self, spec: LoadSpec) -> TransformersModel:
        """Load tokenizer and model from ``spec.path`` onto ``spec.device``."""
        plan = self._plan(spec)
        device = _resolve_device(spec.device)
        task, dtype, folder = plan.task, plan.dtype, plan.folder

        AutoModel, AutoModelForCausalLM, AutoTokenizer = _auto_classes()[1:]

        auto_class: Any = AutoModelForCausalLM if task is Task.GENERATE else AutoModel
        model: Any = None
        weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        try:
            spec.report(READING_WEIGHTS, 0, weights)
            with _PROGRESS_BARS.hidden():
                tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
                model = auto_class.from_pretrained(
                    str(folder),
                    local_files_only=True,
                    use_safetensors=not plan.pickled,
                    dtype=dtype,
                )
            spec.report(READING_WEIGHTS, weights, weights)
            _move_to(model, device, spec)
        except Exception as exc:  # whatever failed, the caller needs one clear BackendError
            # A failed load must give back what it took (e.g. half-copied weights
            # after a CUDA OOM): the traceback's frames still hold the model.
            model = None
            traceback.clear_frames(exc.__traceback__)
            _release_memory(device)
            error = OutOfMemory if isinstance(exc, torch.OutOfMemoryError) else BackendError
            raise error(
                f"could not load {spec.name}@{spec.version} from {folder} "
                f"as a {task.value} model: {exc}"
            ) from exc
        model.eval()
        info = ModelInfo(
            task=task,
            context_length=plan.context_length,
            device=spec.device,
            dtype=str(dtype).removeprefix("torch."),
            has_chat_template=getattr(tokenizer, "chat_template", None) is not None,
            vocab_size=int(model.get_input_embeddings().num_embeddings),
        )
        return TransformersModel(model, tokenizer, info, device, spec.name, plan.max_concurrency)

    def _plan(self, spec: LoadSpec) -> _Plan:
        """What ``load`` will do with ``spec``, decided from small files only.

        ``load`` and ``estimate_footprint`` both start here, so the task, dtype
        and context length they use cannot disagree.
        """
        options = self.validate_options(spec.options)
        device_type = _parse_device(spec.device)[0]
        folder = Path(spec.path)
        raw_config = _read_config(folder)
        pickled = _check_weights(folder, allow_pickle=bool(options.get("allow_pickle")))
        AutoConfig = _auto_classes()[0]

        try:
            config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # unknown model_type, bad values: one clear error
            raise BackendError(f"cannot read the config in {folder}: {exc}") from exc
        return _Plan(
            folder=folder,
            config=config,
            task=_resolve_task(options["task"], raw_config),
            causal=_is_causal(raw_config),
            dtype=_resolve_dtype(options["dtype"], device_type),
            context_length=footprint.context_length(
                config, footprint.tokenizer_max_length(folder), options.get("max_context")
            ),
            max_concurrency=int(options.get("max_concurrency", 1)),
            pickled=pickled,
        )


@dataclass(frozen=True)
class _Plan:
    folder: Path
    config: Any  # a transformers PretrainedConfig
    task: Task
    causal: bool  # the checkpoint is a *ForCausalLM
    dtype: torch.dtype
    context_length: int
    max_concurrency: int
    pickled: bool = False  # weights in pickle files (``allow_pickle``), not safetensors


def _move_to(model: Any, device: torch.device, spec: LoadSpec) -> None:
    """``model.to(device)``, one top-level module at a time so progress can be told in bytes."""

    def size(module: Any) -> int:
        tensors = [*module.parameters(), *module.buffers()]
        return sum(hf_measure.tensor_storages(tensors).values())

    total = size(model)
    done = 0
    spec.report(MOVING_TO_DEVICE, 0, total)
    for child in model.children():
        child.to(device)
        done = min(done + size(child), total)
        spec.report(MOVING_TO_DEVICE, done, total)
    model.to(device)  # whatever the root module holds itself
    spec.report(MOVING_TO_DEVICE, total, total)


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _parse_device(name: str) -> tuple[str, int]:
    """``"cpu"`` → ("cpu", 0), ``"cuda:N"`` → ("cuda", N); checks the spelling only."""
    if name == "cpu":
        return "cpu", 0
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise BackendError(f"unknown device {name!r}; expected 'cpu' or 'cuda:N'")
    return "cuda", int(match.group(1) or 0)


def _resolve_device(name: str) -> torch.device:
    kind, index = _parse_device(name)
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise BackendError(
            f"device {name} was requested but CUDA is not available to torch "
            f"{torch.__version__} on this host"
        )
    if index >= torch.cuda.device_count():
        raise BackendError(
            f"device {name} does not exist; torch sees {torch.cuda.device_count()} CUDA device(s)"
        )
    return torch.device("cuda", index)


def _read_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise BackendError(f"model folder {folder} does not exist or is not a directory")
    path = folder / "config.json"
    if not path.is_file():
        raise BackendError(f"model folder {folder} has no config.json")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BackendError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise BackendError(f"{path} does not hold a JSON object")
    return config


_IMPORT_LOCK = threading.Lock()


def _auto_classes() -> tuple[Any, Any, Any, Any]:
    """transformers' AutoConfig, AutoModel, AutoModelForCausalLM and AutoTokenizer.

    transformers resolves these names lazily on first access, and two threads doing
    that at once (two models' first loads) can fail with an ImportError; the first
    access is therefore made under a lock.
    """
    with _IMPORT_LOCK:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    return AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer


def _pickle_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)


def _check_weights(folder: Path, *, allow_pickle: bool) -> bool:
    """Whether the folder's weights are pickled (allowed by the model's options).

    Safetensors are always preferred; pickled checkpoints can run code when read, so
    they are loaded only when ``allow_pickle`` says so and no safetensors exist.
    """
    if any(folder.glob("*.safetensors")):
        return False
    others = [p.name for p in _pickle_files(folder)]
    if others and allow_pickle:
        return True
    hint = (
        f" (found {', '.join(others)}: pickled weights can run code when loaded; "
        "set the model option allow_pickle = true only for a checkpoint you trust)"
        if others
        else ""
    )
    raise BackendError(f"model folder {folder} has no safetensors weights{hint}")


def _is_causal(config: Mapping[str, Any]) -> bool:
    architectures = config.get("architectures") or []
    return any(str(a).endswith("ForCausalLM") for a in architectures)


def _resolve_task(option: str, config: Mapping[str, Any]) -> Task:
    if option != "auto":
        return Task(option)
    return Task.GENERATE if _is_causal(config) else Task.EMBED


def _resolve_dtype(option: str, device_type: str) -> torch.dtype:
    chosen = _DTYPES[option]
    if chosen is not None:
        return chosen
    if device_type == "cpu":
        return torch.float32  # bf16 matmuls on many CPUs are slower and less exact
    # Either is 2 bytes, so an estimate made where CUDA is missing is still right.
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16 else torch.float16


class TransformersModel(hf_text.HfTokenizing):
    """One loaded folder on one device; implements ``backends.base.LoadedModel``."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        info: ModelInfo,
        device: torch.device,
        name: str,
        max_concurrency: int = 1,
    ) -> None:
        self._model: Any = model
        self._tokenizer: Any = tokenizer
        self._info = info
        self._device = device
        self._name = name
        self._max_concurrency = max_concurrency
        self._eos_ids = _eos_ids(model, tokenizer)
        params = inspect.signature(model.forward).parameters
        # transformers 5.x renamed past_key_values to cache.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_arg = "logits_to_keep" if "logits_to_keep" in params else None
        # Embeddings need no KV cache; decoders loaded as AutoModel build one unless told.
        self._no_cache = {"use_cache": False} if "use_cache" in params else {}
        self._profile: hf_measure.Profile | None = None  # what warm_up measured

    @property
    def info(self) -> ModelInfo:
        return self._info

    # -- tokenizing: encode_prompt, encode_chat, count_tokens (hf_text.HfTokenizing)

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

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_text: TextSink | None,
        cancellation: Cancellation,
    ) -> GenerationResult:
        """One row decoded alone: ``generate_batch`` with a batch of one."""
        self._require(Task.GENERATE)
        self._check_ids(prompt_ids, "prompt", "the prompt")
        return generate_alone(self.generate_batch, prompt_ids, params, on_text, cancellation)

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
        attend to the padding, so a batch gives the vectors of one-at-a-time.
        """
        model = self._require(Task.EMBED)
        if not inputs:
            return []
        for index, ids in enumerate(inputs):
            self._check_ids(ids, "input", f"input {index}")
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
            hf_batch.sample(logits, SamplingParams(max_tokens=1, temperature=0.0), None)
            return cache

        try:
            if generating:
                self._profile = hf_measure.measure(
                    prefill, self._model, self._device, cached_tokens=length
                )
                params = SamplingParams(max_tokens=2, temperature=0.0)
                self.generate(ids, params, None, Cancellation())
            else:
                self._profile = hf_measure.measure(
                    lambda: self.embed([profile_ids]), self._model, self._device, cached_tokens=0
                )
                self.embed([ids])
        except torch.OutOfMemoryError as exc:
            traceback.clear_frames(exc.__traceback__)
            _release_memory(self._device)
            raise OutOfMemory(
                f"model {self._name} cannot process a prompt of its whole context "
                f"({length} tokens) on {self._info.device}: {exc}"
            ) from exc

    def measure_footprint(self) -> Footprint:
        """What the instance holds, measured; call after ``warm_up``.

        ``weights``: bytes of the module's parameters and buffers, each storage
        counted once (tied weights share one). ``runtime``: the KV bytes per token
        the warm-up's cache really held × context length × ``max_concurrency``
        (0 for embeddings). ``working``: what the warm-up's profile measured.
        An unloaded instance holds nothing.
        """
        if self._model is None:
            return Footprint(weights=0)
        if self._profile is None:
            raise BackendError(f"model {self._name} must be warmed up before it is measured")
        tensors = [*self._model.parameters(), *self._model.buffers()]
        runtime = round(
            self._profile.kv_bytes_per_token * self._info.context_length * self._max_concurrency
        )
        return Footprint(
            weights=sum(hf_measure.tensor_storages(tensors).values()),
            runtime=runtime,
            working=self._profile.working,
        )

    def unload(self) -> None:
        self._model = None
        self._tokenizer = None
        _release_memory(self._device)

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
