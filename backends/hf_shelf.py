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

Both hold at most ``CAPACITY`` folders, the least recently used leaving first.
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
    """Configs (shared) and tokenizers (lent) of the folders this backend loaded."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._configs: _Kept[Any] = _Kept(capacity)
        self._tokenizers: _Kept[Any] = _Kept(capacity)

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

    @property
    def sizes(self) -> tuple[int, int]:
        """(configs, tokenizers) kept now."""
        return len(self._configs), len(self._tokenizers)
