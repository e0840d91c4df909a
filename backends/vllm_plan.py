"""What a ``vllm`` version asks for, decided before any engine starts.

Its options are checked when the version is registered; at load (and estimate) time
they become a :class:`Plan` read from the folder's small files (config, safetensors
headers): dtype, context, KV cache wanted and the bytes the engine's processes will
hold. The plan also fits the KV cache into the bytes the scheduler granted, so a grant
too small is refused before a process is spawned.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends import footprint
from backends.base import LoadSpec
from backends.options import invalid, is_positive_int, reject_unknown
from contract.errors import BackendError, InvalidRequest
from contract.generation import Task

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
_DTYPES = {"auto": 0, "float32": 4, "bfloat16": 2, "float16": 2}
# Architectures whose runner vLLM's "auto" surely picks: a causal LM generates (GPT-2
# names its own ``GPT2LMHeadModel``), a BERT-family encoder pools. ``task_of`` names no
# task for the others (multimodal generators, classifiers, reward models, base decoders
# that vLLM may pool): the engine decides those.
_GENERATORS = ("ForCausalLM", "LMHeadModel")
_ENCODERS = ("BertModel", "RobertaModel")
# What an engine's processes hold beyond weights and KV cache: two Python processes
# with torch and vLLM imported on the CPU (measured: 1.44 GiB for the two, demo-medium),
# the CUDA context and activations on a GPU. Every start sets it aside in its grant
# (Plan.kv_for), so what is learned for a version never goes below it; the measured
# footprint raises it where the processes hold more.
_DEFAULT_OVERHEAD = {"cpu": 1536 << 20, "cuda": 1536 << 20}
_DEFAULT_MAX_NUM_SEQS = 16
_DEFAULT_MAX_CONTEXT = 2048


def validate_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Check the options; fill in ``dtype``, ``enforce_eager`` and sleep mode defaults.

    ``kv_cache_bytes``: the KV cache wanted (default: ``max_num_seqs`` full contexts);
    the grant may make it smaller. ``overhead_bytes``: what every start sets aside for
    the engine's processes besides weights and KV cache (they may hold more or less).
    ``task``: ``generate``, ``embed`` or ``auto`` (absent: vLLM decides from the
    architecture); ``pooling`` (``mean``, ``cls``, ``last``; with ``task = "embed"``
    only) overrides the pooler's default.
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


def task_of(path: str, options: Mapping[str, Any]) -> Task | None:
    """What a load will make of the version: the ``task`` option when it names one; for
    "auto", the architecture in config.json where vLLM's own choice is certain (a
    ``*ForCausalLM`` generates, a BERT-family encoder embeds), else None.

    Raises BackendError when config.json cannot be read.
    """
    option = options.get("task", "auto")
    if option in ("generate", "embed"):
        return Task(option)
    path_to = Path(path) / "config.json"
    try:
        config = json.loads(path_to.read_text())
    except (OSError, ValueError) as exc:
        raise BackendError(f"cannot read {path_to}: {exc}") from exc
    found = config.get("architectures") if isinstance(config, dict) else None
    names = [str(a) for a in found] if isinstance(found, list) else []
    if names and all(n.endswith(_GENERATORS) for n in names):
        return Task.GENERATE
    if names and all(n.endswith(_ENCODERS) for n in names):
        return Task.EMBED
    return None


@dataclass(frozen=True)
class Plan:
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

    @property
    def least_grant(self) -> int:
        """The smallest grant ``kv_for`` accepts: weights, overhead and one sequence of KV.

        The estimate reports it as its minimum, so that no grant (one learned from a
        measurement included) is smaller than what this engine needs to start.
        """
        return self.weights + self.overhead + self.kv_floor

    def kv_for(self, grant: int) -> int:
        """The KV cache that fits ``grant`` (0: no grant, take what is wanted)."""
        if grant <= 0:
            return self.kv_wanted
        room = grant - self.weights - self.overhead
        if grant < self.least_grant:
            raise BackendError(
                f"the {grant} bytes granted leave {max(room, 0)} bytes for the KV cache after "
                f"{self.weights} bytes of weights and {self.overhead} of overhead; one "
                f"sequence of {self.context_length} tokens needs {self.kv_floor}"
            )
        return min(room, self.kv_wanted)

    @property
    def runner(self) -> str:
        """vLLM's runner for the ``task`` option (absent: "auto", vLLM decides)."""
        return _RUNNERS[self.options.get("task", "auto")]

    @property
    def pooling_type(self) -> str | None:
        """vLLM's pooling type for the ``pooling`` option; None: the pooler's default."""
        pooling = self.options.get("pooling")
        return None if pooling is None else _POOLING[pooling]


def plan_load(spec: LoadSpec) -> Plan:
    """What loading ``spec`` will use: options checked, sizes from config and headers.

    ``VllmBackend.estimate_footprint`` and ``load`` both start here, so the estimate
    and the engine cannot disagree on dtype, context or KV cache.
    """
    options = validate_options(spec.options)
    device_kind = spec.device.split(":")[0]
    if device_kind not in _DEFAULT_OVERHEAD:
        raise BackendError(f"the vllm backend cannot run on device {spec.device!r}")
    if options["enable_sleep_mode"] and device_kind == "cpu":
        raise BackendError("vLLM's sleep mode needs a GPU; it is not supported on cpu")
    folder = Path(spec.path)
    config_path = folder / "config.json"
    try:
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
    return Plan(
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
