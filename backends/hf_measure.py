"""Measuring what a transformers model really takes: the warm-up's profile.

DESIGN.md rule 5 wants footprints measured, not only estimated. The
``transformers`` backend's ``warm_up`` runs a prompt of the whole context
through the model under :func:`measure`, which reports two numbers:

- KV bytes per token: the bytes of the tensors in the KV cache the pass
  returned (found by :func:`tensor_storages`, which walks the cache's objects),
  divided by the tokens it holds.
- Working bytes: the activation and scratch memory of the pass, weights and
  KV excluded.

How working bytes are measured depends on the device:

- CUDA: the caching allocator's peak during the pass, minus what was allocated
  before it and minus the KV. ``reset_peak_memory_stats`` is per device and
  process-wide, so a lock keeps two warm-ups from resetting each other's peak.
- CPU: torch keeps no allocator statistics, and the process RSS is no use:
  safetensors weights are mmap'd, so their pages come and go with the page
  cache, and glibc/oneDNN arenas keep memory that tensors already freed. So a
  torch dispatch mode (:class:`_StorageTracker`) sees every tensor an
  operation creates on this thread and follows its storage until it is freed;
  :func:`backends.footprint.peak_live_bytes` turns those lifetimes into the
  most bytes alive at once.

The backend itself (:mod:`backends.hf_transformers` and :mod:`backends.hf_model`)
only calls :func:`measure` and, to weigh its weights, :func:`tensor_storages`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from backends import footprint

_CUDA_PROFILE_LOCK = threading.Lock()
_weak_ref: Any = StorageWeakRef  # untyped; ``.expired()`` says the storage was freed


@dataclass(frozen=True)
class Profile:
    """What one warm-up pass measured."""

    kv_bytes_per_token: float
    working: int


def measure(
    run: Callable[[], Any], model: Any, device: torch.device, cached_tokens: int
) -> Profile:
    """Run ``run`` (which returns the KV cache it built, if any) and measure it.

    KV: the bytes of the tensors in the returned cache, divided by the tokens
    it holds. Working: the activation and scratch memory of the run, KV excluded.

    - On CUDA: the caching allocator's peak during the run
      (``max_memory_allocated`` after ``reset_peak_memory_stats``) minus what
      was allocated before it (our weights and any other instance's) and minus
      the KV. It includes kernel workspaces (cuBLAS, attention). The profile
      holds a process-wide lock so two warm-ups do not reset each other's peak;
      requests of other instances on the same device still add to it.
    - On CPU torch keeps no allocator statistics and RSS is useless here:
      safetensors weights are mmap'd (pages come and go with the page cache)
      and glibc/oneDNN arenas keep freed memory. So a dispatch mode sees
      every tensor an operation creates on this thread and follows its
      storage until it is freed; working is the largest sum of storages alive
      at once (other than the weights and the returned KV). Scratch memory
      inside a kernel, never exposed as a tensor, is not seen.
    """
    if device.type == "cuda":
        with _CUDA_PROFILE_LOCK, torch.inference_mode():
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            cache = run()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            kv = tensor_storages(cache)
            working = max(0, peak - before - sum(kv.values()))
    else:
        weights = tensor_storages([*model.parameters(), *model.buffers()])
        tracker = _StorageTracker(set(weights))
        with torch.inference_mode(), tracker:
            cache = run()
        kv = tensor_storages(cache)
        working = footprint.peak_live_bytes(tracker.spans(exclude_live=set(kv)))
    kv_bytes = sum(kv.values())
    del cache
    per_token = kv_bytes / cached_tokens if cached_tokens else 0.0
    return Profile(kv_bytes_per_token=per_token, working=working)


def tensor_storages(root: Any) -> dict[int, int]:
    """``{storage address: bytes}`` of every tensor reachable from ``root``.

    Follows lists, tuples, dicts and object attributes (a transformers cache keeps
    its tensors in per-layer objects) a few levels deep; each storage counts once.
    """
    found: dict[int, int] = {}
    seen: set[int] = set()

    def visit(obj: Any, depth: int) -> None:
        if id(obj) in seen or depth > 4:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr():
                found[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, list | tuple):
            for item in obj:
                visit(item, depth + 1)
        elif isinstance(obj, dict):
            for item in obj.values():
                visit(item, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type | torch.nn.Module):
            for item in vars(obj).values():
                visit(item, depth + 1)

    visit(root, 0)
    return found


class _StorageTracker(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Follows the storages that operations create on this thread while active.

    Each new storage is kept as a weak reference with the step (operation count)
    it appeared at; the step at which it is found freed ends its span. Storages
    in ``existing`` (the weights) and views of live storages are not new.
    """

    def __init__(self, existing: set[int]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._existing = existing
        self._live: dict[int, tuple[Any, int, int]] = {}
        self._ended: list[tuple[int, int, int]] = []
        self._step = 0

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: Any = (),
        kwargs: Any = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        self._step += 1
        for address in [a for a, (ref, _, _) in self._live.items() if ref.expired()]:
            _, nbytes, born = self._live.pop(address)
            self._ended.append((nbytes, born, self._step))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor) and item.device.type != "meta":
                storage = item.untyped_storage()
                address = storage.data_ptr()
                if address and address not in self._existing and address not in self._live:
                    self._live[address] = (_weak_ref(storage), storage.nbytes(), self._step)
        return out

    def spans(self, exclude_live: set[int]) -> list[tuple[int, int, int]]:
        """``(nbytes, born, died)`` of every storage seen; those still alive end now.

        Storages still alive whose address is in ``exclude_live`` are left out.
        """
        end = self._step + 1
        alive = [
            (nbytes, born, end)
            for address, (ref, nbytes, born) in self._live.items()
            if address not in exclude_live and not ref.expired()
        ]
        return [*self._ended, *alive]
