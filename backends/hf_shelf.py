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

All hold at most ``CAPACITY`` folders, the least recently used leaving first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

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
    """Replace every parameter of ``model`` by an empty ``meta`` tensor of its shape."""
    import torch

    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None:
                empty = torch.empty(parameter.shape, dtype=parameter.dtype, device="meta")
                module._parameters[name] = torch.nn.Parameter(empty, requires_grad=False)


def fill_skeleton(model: Any, files: list[Path]) -> bool:
    """Give ``model``'s empty parameters the tensors of the safetensors ``files``
    (memory-mapped, converted only where the dtype differs); False, with the model
    left unusable, where a parameter is missing from them or its shape differs
    (a checkpoint that ties or renames weights): the caller loads it afresh."""
    import torch
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for path in files:
        tensors.update(load_file(path))
    # A base model loaded from a checkpoint of the model with a head (AutoModel from a
    # *ForCausalLM folder) finds its weights under the head model's prefix.
    prefix = getattr(model, "base_model_prefix", "")
    for module_name, module in model.named_modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is None:
                continue
            full = f"{module_name}.{name}" if module_name else name
            tensor = tensors.get(full)
            if tensor is None and prefix:
                tensor = tensors.get(f"{prefix}.{full}")
            if tensor is None or tuple(tensor.shape) != tuple(parameter.shape):
                return False
            if tensor.dtype != parameter.dtype:
                tensor = tensor.to(parameter.dtype)
            module._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
    return True
