"""Footprint arithmetic: what a checkpoint will need in memory, from its headers alone.

DESIGN.md rule 5: before a load, the scheduler places a version by an *estimate*;
after warm-up the backend *measures* and later placements trust the measurement.
This module is the estimate side, kept free of torch so that it is cheap to import
and every formula can be checked by hand in a unit test:

- :func:`read_checkpoint` reads the safetensors headers of a folder — the JSON
  table in front of the data, never the weights themselves;
- :func:`weights_bytes` converts those exact tensor sizes to the dtype the model
  will be loaded in;
- :func:`kv_cache_bytes_per_token` is the KV cache of one token of one sequence;
- :func:`working_bytes` approximates the activations of the largest forward pass
  an instance admits (a prompt of its whole context);
- :func:`peak_live_bytes` is the pure half of the CPU measurement: the largest
  sum of storages alive at the same time, given when each was created and freed.

Config values are read from either a ``transformers`` config object (attribute
maps and class defaults applied) or a plain ``config.json`` mapping.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.errors import BackendError

# Bits per element of every dtype the safetensors format defines.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "U16": 16,
    "I16": 16,
    "U32": 32,
    "I32": 32,
    "U64": 64,
    "I64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
    "F16": 16,
    "BF16": 16,
    "F32": 32,
    "F64": 64,
    "C64": 64,
}
# Floating-point weights are cast to the load dtype; the others keep their size.
FLOAT_DTYPES = frozenset(d for d in DTYPE_BITS if d.startswith("F") or d == "BF16")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The safetensors library refuses headers above 100 MB; so do we, before reading one.
_MAX_HEADER_BYTES = 100_000_000
# Tokenizers without a known limit report a huge sentinel (1e30); ignore those.
_SENSIBLE_MAX_LENGTH = 10_000_000
_FALLBACK_CONTEXT = 2048


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its checkpoint header describes it."""

    dtype: str  # a safetensors dtype name: "F32", "BF16", "I64", …
    shape: tuple[int, ...]
    nbytes: int  # bytes in the file, from data_offsets

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


# -- safetensors headers ------------------------------------------------------------


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensors of one ``.safetensors`` file, from its header only.

    The format: 8 bytes little-endian header length N, N bytes of JSON mapping each
    tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into
    the data that follows; ``__metadata__`` holds free-form strings), then the data.
    Raises BackendError for a missing, truncated or garbled file.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise BackendError(
                    f"{path} is truncated: {size} bytes, shorter than the 8-byte header length"
                )
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER_BYTES:
                raise BackendError(
                    f"{path} is not a safetensors file: header length {length} is implausible"
                )
            if 8 + length > size:
                raise BackendError(
                    f"{path} is truncated: its header needs {8 + length} bytes, the file has {size}"
                )
            raw = handle.read(length)
    except OSError as exc:
        raise BackendError(f"cannot read safetensors file {path}: {exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BackendError(f"{path} has a garbled safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise BackendError(f"{path} has a garbled safetensors header: not a JSON object")
    data_size = size - 8 - length
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        info = _tensor_info(path, name, entry)
        end = entry["data_offsets"][1]
        if end > data_size:
            raise BackendError(
                f"{path} is truncated: tensor {name!r} ends at data byte {end}, "
                f"the file holds {data_size} bytes of data"
            )
        tensors[name] = info
    return tensors


def _tensor_info(path: Path, name: str, entry: Any) -> TensorInfo:
    def garbled(why: str) -> BackendError:
        return BackendError(f"{path} has a garbled safetensors header: tensor {name!r} {why}")

    if not isinstance(entry, dict):
        raise garbled("is not described by an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise garbled(f"has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise garbled(f"has invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise garbled(f"has invalid data_offsets {offsets!r}")
    info = TensorInfo(dtype=dtype, shape=tuple(shape), nbytes=offsets[1] - offsets[0])
    expected = math.ceil(info.numel * DTYPE_BITS[dtype] / 8)
    if info.nbytes != expected:
        raise garbled(f"holds {info.nbytes} bytes; {dtype} {list(shape)} needs {expected}")
    return info


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files that hold the checkpoint in ``folder``.

    ``model.safetensors`` if present; else the shards named by
    ``model.safetensors.index.json``; else every ``*.safetensors`` in the folder.
    """
    single = folder / SINGLE_FILE
    if single.is_file():
        return [single]
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BackendError(f"{index} is not a valid safetensors index: {exc!r}") from exc
        if not shards or not all(isinstance(s, str) and "/" not in s for s in shards):
            raise BackendError(f"{index} is not a valid safetensors index: bad weight_map")
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise BackendError(f"{index} names shard(s) missing from {folder}: {missing}")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BackendError(f"model folder {folder} has no safetensors weights")
    return files


def read_checkpoint(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint in ``folder``, from headers (no weights read)."""
    tensors: dict[str, TensorInfo] = {}
    for path in checkpoint_files(folder):
        for name, info in read_safetensors_header(path).items():
            tensors.setdefault(name, info)
    return tensors


# -- the context an instance grants ---------------------------------------------------


def tokenizer_max_length(folder: Path) -> int | None:
    """``model_max_length`` from ``tokenizer_config.json``, the value AutoTokenizer uses."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("model_max_length") if isinstance(config, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def context_length(config: Any, tokenizer_max: int | None, max_context: int | None) -> int:
    """The smallest of the model's positions, the tokenizer's limit and the option.

    Sizes both the prompts a loaded model accepts and the KV cache it is granted,
    so the backend's ``load`` and ``estimate_footprint`` both use this.
    """
    limits: list[int] = []
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = _positive(config, attr)
        if value is not None:
            limits.append(value)
            break
    if tokenizer_max is not None and 0 < tokenizer_max < _SENSIBLE_MAX_LENGTH:
        limits.append(tokenizer_max)
    if max_context is not None:
        limits.append(max_context)
    return min(limits) if limits else _FALLBACK_CONTEXT


# -- the estimate -------------------------------------------------------------------


def weights_bytes(tensors: Iterable[TensorInfo], target_dtype_bytes: int) -> int:
    """Bytes the tensors occupy once loaded with floating weights in the target dtype.

    Floating tensors (F64/F32/F16/BF16/F8…) become ``target_dtype_bytes`` per
    element, as ``from_pretrained(dtype=…)`` casts them; integer and bool tensors
    keep their size. A weight tied to another (``tie_word_embeddings``) is stored
    once in the file, so it is counted once here too.
    """
    total = 0
    for info in tensors:
        total += info.numel * target_dtype_bytes if info.is_float else info.nbytes
    return total


def config_value(config: Any, name: str) -> Any:
    """``config.name`` for a transformers config, ``config[name]`` for a mapping."""
    if isinstance(config, Mapping):
        return config.get(name)
    return getattr(config, name, None)


def _positive(config: Any, *names: str) -> int | None:
    for name in names:
        value = config_value(config, name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _text_config(config: Any) -> Any:
    """The language model's part of a config (multimodal configs nest it)."""
    if _positive(config, "num_hidden_layers") is None:
        nested = config_value(config, "text_config")
        if nested is not None:
            return nested
    return config


def head_dim(config: Any) -> int:
    """``config.head_dim``, else ``hidden_size // num_attention_heads``."""
    config = _text_config(config)
    explicit = _positive(config, "head_dim")
    if explicit is not None:
        return explicit
    hidden = _positive(config, "hidden_size")
    heads = _positive(config, "num_attention_heads")
    if hidden is None or heads is None:
        raise BackendError("config lacks hidden_size or num_attention_heads")
    return hidden // heads


def kv_cache_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """KV cache of one token of one sequence: keys and values of every layer.

    2 × num_hidden_layers × num_key_value_heads (default num_attention_heads) ×
    head_dim × dtype bytes.
    """
    config = _text_config(config)
    layers = _positive(config, "num_hidden_layers")
    heads = _positive(config, "num_attention_heads")
    if layers is None or heads is None:
        raise BackendError("config lacks num_hidden_layers or num_attention_heads")
    kv_heads = _positive(config, "num_key_value_heads") or heads
    return 2 * layers * kv_heads * head_dim(config) * dtype_bytes


def working_bytes(
    config: Any, tokens: int, dtype_bytes: int, *, decoder: bool, gated_mlp: bool
) -> int:
    """Activations of one forward pass over ``tokens`` tokens (one sequence), KV excluded.

    The peak of a transformer's forward pass sits in the MLP of its last layer:
    there, besides the weights and the KV cache, live

    - the MLP's ``[tokens, intermediate_size]`` tensors: 3 for a gated MLP
      (activation of the gate, up projection, their product), 2 otherwise
      (first projection and its activation);
    - ``[tokens, hidden_size]`` hidden states still referenced: 4 in a decoder
      (embeddings, two residual sums, the normalized MLP input), 3 in an encoder;
    - a decoder's rotary tables (cos and sin, ``[tokens, head_dim]`` each);
    - int64 bookkeeping per token (ids, positions or attention mask);

    and a decoder adds the logits of one position, in the model's dtype and in the
    fp32 copy sampling makes. Attention is assumed fused (SDPA), so no
    ``[heads, tokens, tokens]`` score matrix is materialized. This mirrors the
    ``transformers`` implementations of Llama-style decoders and BERT-style
    encoders; it is an estimate, replaced by the measurement after warm-up.
    """
    config = _text_config(config)
    hidden = _positive(config, "hidden_size")
    if hidden is None:
        raise BackendError("config lacks hidden_size")
    intermediate = _positive(config, "intermediate_size", "n_inner") or 4 * hidden
    per_token = (3 if gated_mlp else 2) * intermediate + (4 if decoder else 3) * hidden
    if decoder:
        per_token += 2 * head_dim(config)
    total = tokens * (per_token * dtype_bytes + 2 * 8)
    if decoder:
        total += (_positive(config, "vocab_size") or 0) * (dtype_bytes + 4)
    return total


def reshape_bytes(config: Any, runtime: int) -> int:
    """The most a batch's cache holds beyond itself while it is reshaped: one layer.

    A running batch's cache (``backends.hf_cache``) is rebuilt layer by layer when
    rows join or leave and when its room runs out: each layer's new buffer exists
    beside the old one until the old is freed, so at most one layer of the reserved
    cache (``runtime`` ÷ layers) is held twice. It happens between forward passes,
    never during one, so it shares the working memory with the pass's activations:
    the footprint's ``working`` is the larger of the two.
    """
    layers = _positive(_text_config(config), "num_hidden_layers")
    return -(-runtime // layers) if layers and runtime > 0 else 0


# -- the measurement's arithmetic ----------------------------------------------------


def peak_live_bytes(spans: Iterable[tuple[int, int, int]]) -> int:
    """The most bytes alive at once, from ``(nbytes, born, died)`` spans.

    ``born`` and ``died`` count steps (e.g. operations): a span is alive at every
    step ``t`` with ``born <= t < died``.
    """
    changes: dict[int, int] = {}
    for nbytes, born, died in spans:
        if died <= born:
            continue
        changes[born] = changes.get(born, 0) + nbytes
        changes[died] = changes.get(died, 0) - nbytes
    live = peak = 0
    for step in sorted(changes):
        live += changes[step]
        peak = max(peak, live)
    return peak
