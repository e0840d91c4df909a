"""What a reload of a transformers version reuses from its last load: config and tokenizer.

Parsing ``config.json`` into a transformers config and building a tokenizer (its
vocabulary, merges and chat template) take milliseconds to hundreds of milliseconds
for a large vocabulary, every estimate and every load, for files that did not change.
Both are kept per model folder, keyed by the folder's small files as they are now
(name, size and modification time of everything but the weights), so an edited
folder is read afresh.

- Configs are shared: planning only reads them. A load gets its own copy, because
  ``from_pretrained`` writes into the config it is given (dtype, attention kernel).
- Tokenizers are not shared: a fast tokenizer's padding and truncation state is set
  per call, so two instances must not use one at once. The shelf hands a kept
  tokenizer to one load (``take``) and takes it back when that instance unloads
  (``put``); a second replica loaded meanwhile builds its own.

- Module skeletons (CPU only): an unloaded model's modules, its parameters replaced by
  empty ``meta`` tensors, so it holds no weight memory. Building the modules of a
  model is most of ``from_pretrained``'s own time (tens of milliseconds for demo-large,
  more than reading its weights from a warm page cache); a reload fills a kept
  skeleton's parameters with the checkpoint's tensors, memory-mapped as
  ``from_pretrained`` maps them (:func:`fill_skeleton`). Lent like tokenizers.

A first load has no skeleton to reuse, so it builds one (:func:`build_skeleton`: the
modules on the ``meta`` device, no weight initialised) and fills it the same way;
``from_pretrained`` would also initialise every weight it then overwrites, and read
the checkpoint eagerly rather than as the first passes touch it.

All hold at most ``CAPACITY`` folders, the least recently used leaving first.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch.overrides import TorchFunctionMode

CAPACITY = 32
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")

T = TypeVar("T")
Key = tuple[str, tuple[tuple[str, int, int], ...]]


def folder_key(folder: Path) -> Key:
    """The folder and its small files as they are now: what a kept object was built from."""
    files: list[tuple[str, int, int]] = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES):
            stat = path.stat()
            files.append((path.name, stat.st_size, stat.st_mtime_ns))
    return str(folder.resolve()), tuple(files)


class _Kept(Generic[T]):
    """A bounded, thread-safe map from folder keys to what was built from them."""

    def __init__(self, capacity: int) -> None:
        self._items: OrderedDict[Key, T] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def get(self, key: Key) -> T | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def pop(self, key: Key) -> T | None:
        with self._lock:
            return self._items.pop(key, None)

    def set(self, key: Key, item: T) -> None:
        with self._lock:
            self._items[key] = item
            self._items.move_to_end(key)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class Shelf:
    """Configs (shared), tokenizers and module skeletons (lent) of the folders this
    backend loaded."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._configs: _Kept[Any] = _Kept(capacity)
        self._tokenizers: _Kept[Any] = _Kept(capacity)
        self._skeletons: _Kept[Any] = _Kept(capacity)

    def config(self, folder: Path, build: Callable[[], Any]) -> Any:
        """The config of ``folder``, built with ``build`` only if its files changed."""
        key = folder_key(folder)
        config = self._configs.get(key)
        if config is None:
            config = build()
            self._configs.set(key, config)
        return config

    def take_tokenizer(self, folder: Path) -> tuple[Key, Any | None]:
        """A kept tokenizer of ``folder`` as its files are now, now lent to the caller
        alone (None: build one); and the key to ``put`` it back under."""
        key = folder_key(folder)
        return key, self._tokenizers.pop(key)

    def put_tokenizer(self, key: Key, tokenizer: Any) -> None:
        """Keep ``tokenizer`` (its instance unloaded) for the folder's next load."""
        self._tokenizers.set(key, tokenizer)

    def take_skeleton(self, key: Key) -> Any | None:
        """A kept module skeleton for ``key`` (see :func:`skeleton_key`), lent to the caller."""
        return self._skeletons.pop(key)

    def put_skeleton(self, key: Key, model: Any) -> None:
        """Empty ``model``'s parameters (:func:`empty_parameters`) and keep it."""
        empty_parameters(model)
        self._skeletons.set(key, model)

    @property
    def sizes(self) -> tuple[int, int, int]:
        """(configs, tokenizers, skeletons) kept now."""
        return len(self._configs), len(self._tokenizers), len(self._skeletons)


def skeleton_key(folder: Path, task: str, dtype: Any) -> Key:
    """What a skeleton was built from: the folder's small files, the task, the dtype."""
    name, files = folder_key(folder)
    return f"{name}|{task}|{dtype}", files


def empty_parameters(model: Any) -> None:
    """Replace every parameter of ``model`` by an empty ``meta`` tensor of its shape.

    Parameters shared by several modules (tied embeddings) stay shared, so that
    :func:`fill_skeleton` fills them once and they stay tied.
    """
    emptied: dict[int, tuple[Any, Any]] = {}  # id → (the parameter, kept alive; its empty one)
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is None:
                continue
            if id(parameter) not in emptied:
                empty = torch.empty(parameter.shape, dtype=parameter.dtype, device="meta")
                emptied[id(parameter)] = (parameter, torch.nn.Parameter(empty, requires_grad=False))
            module._parameters[name] = emptied[id(parameter)][1]


def build_skeleton(auto_class: Any, config: Any, dtype: torch.dtype) -> Any | None:
    """The modules ``auto_class.from_config(config)`` builds, on the ``meta`` device and
    without initialising any weight: a skeleton for :func:`fill_skeleton`. ``config`` is
    written into (its dtype), as ``from_pretrained`` writes into its own copy.

    None where only ``from_pretrained`` builds the model right: a quantized checkpoint,
    or modules it keeps in float32 under a half-precision dtype.
    """
    if getattr(config, "quantization_config", None) is not None:
        return None
    with torch.device("meta"), _SkipMetaInit():
        model = auto_class.from_config(config, dtype=dtype)
    kept_fp32 = getattr(model, "_keep_in_fp32_modules", None) or getattr(
        model, "_keep_in_fp32_modules_strict", None
    )
    if kept_fp32 and dtype in (torch.float16, torch.bfloat16):
        return None
    return model


class _SkipMetaInit(TorchFunctionMode):
    """Skips weight initialisers applied to ``meta`` tensors: they have no data to fill,
    yet each still costs a dispatch through meta kernels: a quarter of the time
    demo-large's modules take to build. Initialisers of real tensors run as usual."""

    _INITIALIZERS = frozenset(
        [
            *(
                getattr(torch.nn.init, name)
                for name in (
                    "uniform_",
                    "normal_",
                    "trunc_normal_",
                    "constant_",
                    "ones_",
                    "zeros_",
                    "eye_",
                    "dirac_",
                    "xavier_uniform_",
                    "xavier_normal_",
                    "kaiming_uniform_",
                    "kaiming_normal_",
                    "orthogonal_",
                    "sparse_",
                )
            ),
            torch.Tensor.uniform_,
            torch.Tensor.normal_,
            torch.Tensor.zero_,
            torch.Tensor.fill_,
        ]
    )

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in self._INITIALIZERS:
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def fill_skeleton(model: Any, files: list[Path]) -> bool:
    """Give ``model``'s empty parameters the tensors of the safetensors ``files``
    (memory-mapped, converted only where the dtype differs); False, with the model
    left unusable, where a parameter is missing from them or its shape differs
    (a checkpoint that ties or renames weights): the caller loads it afresh.

    Buffers still on ``meta`` (a skeleton from :func:`build_skeleton`) take the
    checkpoint's tensor where it holds them; the others, computed rather than saved
    (rotary frequencies, position ids), are initialised by the model's own
    ``initialize_weights`` as ``from_pretrained`` initialises them, the filled tensors
    marked so that it leaves them alone.
    """
    tensors = map_safetensors(files)
    if tensors is None:
        return False
    # A base model loaded from a checkpoint of the model with a head (AutoModel from a
    # *ForCausalLM folder) finds its weights under the head model's prefix.
    prefix = getattr(model, "base_model_prefix", "")

    def saved(name: str, like: torch.Tensor) -> torch.Tensor | None:
        tensor = tensors.get(name)
        if tensor is None and prefix:
            tensor = tensors.get(f"{prefix}.{name}")
        if tensor is None or tuple(tensor.shape) != tuple(like.shape):
            return None
        return tensor if tensor.dtype == like.dtype else tensor.to(like.dtype)

    # Tied weights are one parameter under several names: filled once, from whichever
    # of its names the checkpoint holds.
    places: dict[int, list[tuple[Any, str, str]]] = {}
    parameters: dict[int, Any] = {}
    for full, module, name, parameter in _slots(model, "_parameters"):
        places.setdefault(id(parameter), []).append((module, name, full))
        parameters[id(parameter)] = parameter
    for key, slots in places.items():
        found = (saved(full, parameters[key]) for _, _, full in slots)
        tensor = next((t for t in found if t is not None), None)
        if tensor is None:
            return False
        filled = _initialized(torch.nn.Parameter(tensor, requires_grad=False))
        for module, name, _ in slots:
            module._parameters[name] = filled

    computed = False
    for full, module, name, buffer in _slots(model, "_buffers"):
        if not buffer.is_meta:
            continue
        persistent = name not in module._non_persistent_buffers_set
        tensor = saved(full, buffer) if persistent else None
        if tensor is None:
            module._buffers[name] = torch.empty_like(buffer, device="cpu")
            computed = True
        else:
            module._buffers[name] = _initialized(tensor)
    if computed:
        model.initialize_weights()
    return not any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def _initialized(tensor: Any) -> Any:
    """``tensor`` marked as ``from_pretrained`` marks what it loaded, for
    ``initialize_weights`` to leave alone."""
    tensor._is_hf_initialized = True
    return tensor


def _slots(model: Any, kind: str) -> Iterator[tuple[str, Any, str, torch.Tensor]]:
    """(full name, module, name, tensor) for each parameter or buffer (``kind``) of ``model``."""
    for module_name, module in model.named_modules():
        for name, tensor in list(getattr(module, kind).items()):
            if tensor is not None:
                yield (f"{module_name}.{name}" if module_name else name), module, name, tensor


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def map_safetensors(files: list[Path]) -> dict[str, torch.Tensor] | None:
    """The tensors of the safetensors ``files``, each a view of a private memory map of
    its file: nothing is read until a page is first touched, and that page comes from
    the page cache (where the load's reader put it) rather than from a copy.
    ``safetensors.torch.load_file`` would read every byte before returning, after the
    modules are built, where this leaves the reading to overlap with building them.
    None where a file is not one this reads (an unknown dtype, a malformed header).
    """
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        mapped = _map_file(path)
        if mapped is None:
            return None
        tensors.update(mapped)
    return tensors


def _map_file(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
            # Private: a write to a tensor (none is expected) changes this process's copy,
            # never the file.
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError, struct.error):
        return None
    if not isinstance(header, dict):
        return None
    start = 8 + length
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(n) for n in info["shape"]]
            begin, end = (start + int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            return None
        size = dtype.itemsize
        if end - begin != math.prod(shape) * size or end > len(data) or begin % size:
            return None
        if begin == end:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            flat = torch.frombuffer(data, dtype=dtype, count=(end - begin) // size, offset=begin)
            tensors[name] = flat.view(shape)
    return tensors
