"""What the ``transformers`` backend will do with a version, decided from small files.

Its options are checked when the version is registered; at load (and estimate) time
they become a :class:`Plan`: the task (from the config's architecture when "auto"),
the dtype for the device, the context length and whether the weights are safetensors
or, where the options allow, pickled. Reading only config, tokenizer config and file
names, a plan is cheap enough to make before every placement.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from backends import footprint
from backends.base import LoadSpec
from backends.hf_shelf import Shelf
from backends.options import invalid, is_positive_int, reject_unknown
from contract.errors import BackendError
from contract.generation import Task

_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_TASKS = ("auto", "generate", "embed")
_OPTION_KEYS = ("dtype", "task", "max_context", "max_concurrency", "allow_pickle")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def validate_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``dtype``, ``task``, ``max_context`` and ``max_concurrency``; fill in defaults.

    ``max_concurrency``, when set, reserves the KV cache for that many full contexts
    instead of for the batch limits (:func:`kv_tokens`); the batcher then keeps its
    batches within it.
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


@dataclass(frozen=True)
class Plan:
    """What a load will use: the folder, its config, and the settings resolved for it."""

    folder: Path
    config: Any  # a transformers PretrainedConfig
    task: Task
    causal: bool  # the checkpoint is a *ForCausalLM
    dtype: torch.dtype
    context_length: int
    kv_tokens: int  # what the KV cache is reserved for (:func:`kv_tokens`)
    pickled: bool = False  # weights in pickle files (``allow_pickle``), not safetensors


def plan_load(spec: LoadSpec, shelf: Shelf | None = None) -> Plan:
    """What ``load`` will do with ``spec``, decided from small files only.

    ``TransformersBackend.load`` and ``estimate_footprint`` both start here, so the task, dtype
    and context length they use cannot disagree. With a ``shelf`` the parsed config is
    reused while the folder's small files stay as they were.
    """
    options = validate_options(spec.options)
    device_type = _parse_device(spec.device)[0]
    folder = Path(spec.path)
    if not folder.is_dir():
        raise BackendError(f"model folder {folder} does not exist or is not a directory")

    def build() -> tuple[dict[str, Any], Any, int | None]:
        raw = _read_config(folder)
        try:
            parsed = auto_classes()[0].from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # unknown model_type, bad values: one clear error
            raise BackendError(f"cannot read the config in {folder}: {exc}") from exc
        return raw, parsed, footprint.tokenizer_max_length(folder)

    raw_config, config, tokenizer_max = build() if shelf is None else shelf.config(folder, build)
    pickled = _check_weights(folder, allow_pickle=bool(options.get("allow_pickle")))
    context = footprint.context_length(config, tokenizer_max, options.get("max_context"))
    return Plan(
        folder=folder,
        config=config,
        task=_resolve_task(options["task"], raw_config),
        causal=_is_causal(raw_config),
        dtype=_resolve_dtype(options["dtype"], device_type),
        context_length=context,
        kv_tokens=kv_tokens(context, options.get("max_concurrency"), spec),
        pickled=pickled,
    )


def kv_tokens(context_length: int, max_concurrency: int | None, spec: LoadSpec) -> int:
    """Tokens the instance's KV cache is reserved for: the one number that bounds both
    its footprint and its batches.

    A batch's rows sit in one padded cache, so it holds rows × its longest row. The
    batcher admits a row only while that product stays within this number, and the
    footprint (estimated and measured alike) reserves KV bytes for exactly this many:

    1. ``max_concurrency`` set → that many full contexts.
    2. Otherwise the batch limits the instance's batcher keeps to: ``batch_tokens``,
       but no more than ``batch_rows`` full contexts (a larger budget could never fill).
    3. Never less than one full context: any single request must fit.
    """
    if max_concurrency is not None:
        return max_concurrency * context_length
    most = max(spec.batch_rows, 1) * context_length
    if spec.batch_tokens > 0:
        most = min(most, spec.batch_tokens)
    return max(most, context_length)


def _parse_device(name: str) -> tuple[str, int]:
    """``"cpu"`` → ("cpu", 0), ``"cuda:N"`` → ("cuda", N); checks the spelling only."""
    if name == "cpu":
        return "cpu", 0
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise BackendError(f"unknown device {name!r}; expected 'cpu' or 'cuda:N'")
    return "cuda", int(match.group(1) or 0)


def resolve_device(name: str) -> torch.device:
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


def auto_classes() -> tuple[Any, Any, Any, Any]:
    """transformers' AutoConfig, AutoModel, AutoModelForCausalLM and AutoTokenizer.

    transformers resolves these names lazily on first access, and two threads doing
    that at once (two models' first loads) can fail with an ImportError; the first
    access is therefore made under a lock.
    """
    with _IMPORT_LOCK:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    return AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer


def pickle_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)


def _check_weights(folder: Path, *, allow_pickle: bool) -> bool:
    """Whether the folder's weights are pickled (allowed by the model's options).

    Safetensors are always preferred; pickled checkpoints can run code when read, so
    they are loaded only when ``allow_pickle`` says so and no safetensors exist.
    """
    if any(folder.glob("*.safetensors")):
        return False
    others = [p.name for p in pickle_files(folder)]
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
