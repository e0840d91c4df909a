"""What this process tree really holds, per device: the memory audit's real reader.

``routerd.memory_audit`` sets these readings beside the ledger. The sources:

- CPU: resident anonymous and shared-memory pages (``RssAnon`` + ``RssShmem`` of
  ``/proc/<pid>/status``) of this process and every process below it (vLLM's engine
  core and workers hold their models in children). File-backed pages (``RssFile``) are
  left out: they are the page cache of shared libraries and of memory-mapped weights,
  which the kernel drops and reads back as it likes, so they move without anything
  being allocated or freed. Shared memory mapped by several processes of the tree is
  counted once per process (rare: vLLM's small broadcast buffers).
- GPU: NVML's per-process bytes on the device for the same processes, or, where that
  is less, torch's caching allocator (``torch.cuda.memory_reserved``) — where torch is
  already imported and CUDA initialized; this module never imports torch. NVML sees
  what the driver gave each process, CUDA contexts included; torch's figure is the
  fallback where NVML shows no per-process numbers (a container whose PIDs NVML cannot
  match to ours).

Children are found through ``/proc/<pid>/task/<tid>/children``: a file per thread, where
``backends.proctree.descendants`` reads the ``stat`` of every process on the host (about
10 ms on a quiet machine, too slow to repeat every 10 ms). Kernels built without
``CONFIG_PROC_CHILDREN`` fall back to it. Even so, walking a daemon's threads costs
most of a reading (0.5 ms of 0.6), so the tree is looked up again only every
``tree_ttl`` seconds (0.5): a backend's child starts with its load, which takes longer.

Freed memory and RSS (the CPU caveat): glibc keeps memory that ``free`` returned —
below its mmap threshold, which grows to the largest block freed so far, tensors come
from its heaps — so RSS does not drop when a model is unloaded, and an eviction would
read as a leak of the whole model. ``trim`` calls ``malloc_trim(0)``, which returns
the free pages of every arena to the kernel; the audit calls it only when a reading is
over its allowance, then reads again. Judging instead against the most the ledger ever
accounted (memory may stay up to a past peak) needs no side effect, but it would also
forgive a real leak of anything up to that peak, which is what the audit is for; and
trimming is harmless (a few milliseconds, only when over) and gives the memory back to
the host, where the CPU budget says it belongs. Where there is no glibc (musl), there
is no trim, and use after an eviction reads as unaccounted until reused.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from backends import proctree
from backends.host_memory import glibc_trim, status_fields
from routerd.devices import DeviceInventory
from routerd.memory_audit import Measurement

PROC = Path("/proc")


def children(pid: int, proc: Path = PROC) -> set[int] | None:
    """The direct children of ``pid`` (any of its threads' children); None where the
    kernel does not offer ``task/<tid>/children``."""
    found: set[int] = set()
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
    except OSError:
        return found  # gone while we looked
    for task in tasks:
        try:
            found.update(int(p) for p in (task / "children").read_text().split())
        except FileNotFoundError:
            if not (task / "stat").exists():
                continue  # the thread ended
            return None
        except (OSError, ValueError):
            continue
    return found


def tree(pid: int, proc: Path = PROC) -> set[int]:
    """``pid`` and every living process below it."""
    found = {pid}
    stack = [pid]
    while stack:
        below = children(stack.pop(), proc)
        if below is None:
            return {pid} | proctree.descendants(pid, proc)
        for child in below - found:
            found.add(child)
            stack.append(child)
    return found


def cpu_measurement(pids: Sequence[int] | set[int], proc: Path = PROC) -> Measurement:
    """Resident anonymous + shared memory of ``pids``, with each part as a source."""
    anon = shmem = 0
    for pid in pids:
        fields = status_fields(pid, ("RssAnon", "RssShmem"), proc)
        anon += fields.get("RssAnon", 0)
        shmem += fields.get("RssShmem", 0)
    return Measurement(anon + shmem, {"rss_anon": anon, "rss_shmem": shmem, "processes": len(pids)})


def torch_reserved(index: int) -> int | None:
    """torch's caching allocator on GPU ``index``, if torch is imported and CUDA is up."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_initialized():
            return None
        return int(torch.cuda.memory_reserved(index))
    except Exception:  # an old torch, a lost device: no figure rather than no audit
        return None


class ProcessMemoryReader:
    """The real ``MemoryReader``: /proc for the CPU, NVML and torch for GPUs.

    ``inventory`` is the daemon's device inventory (its ``readings`` carry NVML's
    per-process bytes); ``pid`` the root of the tree (this process), whose members are
    looked up again after ``tree_ttl`` seconds. Reads do I/O, so the audit runs them off
    the event loop (``blocking``).
    """

    blocking = True

    def __init__(
        self,
        inventory: DeviceInventory,
        *,
        pid: int | None = None,
        proc: Path = PROC,
        trimmer: Callable[[], None] | None = None,
        tree_ttl: float = 0.5,
    ) -> None:
        self._inventory = inventory
        self._pid = os.getpid() if pid is None else pid
        self._proc = proc
        self._trim = trimmer if trimmer is not None else glibc_trim()
        self._tree_ttl = tree_ttl
        self._tree: set[int] = set()
        self._tree_at = -math.inf

    def pids(self) -> set[int]:
        """The processes of the tree, looked up at most every ``tree_ttl`` seconds."""
        now = time.monotonic()
        if now - self._tree_at >= self._tree_ttl:
            self._tree, self._tree_at = tree(self._pid, self._proc), now
        return self._tree

    def read(self, devices: Sequence[str]) -> dict[str, Measurement]:
        pids = self.pids()
        found: dict[str, Measurement] = {}
        if "cpu" in devices:
            found["cpu"] = cpu_measurement(pids, self._proc)
        gpus = [d for d in devices if d.startswith("cuda:")]
        if gpus:
            readings = {r.id: r for r in self._inventory.readings()}
            for device in gpus:
                reading = readings.get(device)
                if reading is None:
                    continue
                nvml = sum(b for p, b in reading.process_bytes.items() if p in pids)
                sources = {"nvml": nvml}
                reserved = torch_reserved(int(device.split(":")[1]))
                if reserved is not None:
                    sources["torch_reserved"] = reserved
                found[device] = Measurement(max(nvml, reserved or 0), sources)
        return found

    def trim(self) -> None:
        if self._trim is not None:
            self._trim()
