"""This process's host memory: reading it, its peak, and giving freed heap back.

Readings come from ``/proc`` (``status`` fields in bytes; the peak ``VmHWM``, which
``clear_refs`` resets). The rest is about glibc's heap.

Tensors on the CPU come from glibc's ``malloc``. Memory a freed tensor held stays
in the process (glibc keeps it for the next allocation; its mmap threshold grows to
the largest block freed so far, so even large tensors end up on its heaps), and the
process's resident memory stays at the high-water mark of everything it ever
allocated. The ledger accounts what an instance may hold at once, not that mark, so
the transformers backend hands freed memory back after the passes that free the most
(a prefill, a batch reshaped, a batch drained), and the memory audit does before it
calls a reading a leak. ``malloc_trim(0)`` walks every arena and returns its free
pages; it costs milliseconds, which is why it runs after large passes only, never
after every decode step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path

PROC = Path("/proc")


@functools.cache
def glibc_trim() -> Callable[[], None] | None:
    """``malloc_trim(0)`` where the C library is glibc; None elsewhere (musl has none).
    Looked up once per process: finding the library runs a subprocess, and every
    loaded model asks."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def call() -> None:
        trim(0)

    return call


M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
EXACT_THRESHOLD = 1 << 20


def map_large_allocations(threshold: int = EXACT_THRESHOLD) -> bool:
    """Ask glibc to give every allocation of ``threshold`` bytes or more a mapping of
    its own, unmapped when freed, and to trim its heap top past ``threshold``; False
    where the C library is not glibc (nothing changed).

    By default glibc raises its mmap threshold to the largest block freed so far (up
    to 32 MiB), so a small model's activations (a few MiB each) come from the heap,
    and within one pass the heap fragments: measured here, a 2048-token prefill of
    demo-large held 70–140 MiB at its peak for 47 MiB of live tensors, different
    every pass. With a fixed 1 MiB threshold it held 42–50 MiB, every pass: the
    process holds what its tensors hold, which is what the ledger counts. The price
    is a fresh mapping (page faults, zeroed pages) per large tensor: prefill passes
    took about 1.5× as long there; decode steps allocate only small tensors and do
    not pay it. ``[devices] cpu_allocation = "pooled"`` keeps glibc's default.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, threshold))


def status_fields(pid: int, keys: Sequence[str], proc: Path = PROC) -> dict[str, int]:
    """Fields of ``/proc/<pid>/status`` in bytes (absent ones left out; none once gone)."""
    values: dict[str, int] = {}
    try:
        text = (proc / str(pid) / "status").read_text()
    except OSError:
        return values
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in keys:
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[key] = int(parts[0]) * 1024
    return values


def reset_peak(proc: Path = PROC) -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its RSS now; False where the kernel
    does not allow it. With :func:`peak_growth`, a test measures the most a stretch of
    synchronous work added, without a thread sampling beside it."""
    try:
        (proc / "self" / "clear_refs").write_text("5")
    except OSError:
        return False
    return True


def rss_now(proc: Path = PROC) -> int:
    """This process's resident memory (``VmRSS``) in bytes."""
    return status_fields(os.getpid(), ("VmRSS",), proc).get("VmRSS", 0)


def peak_growth(start_rss: int, proc: Path = PROC) -> int:
    """How far the peak RSS since :func:`reset_peak` rose above ``start_rss``."""
    peak = status_fields(os.getpid(), ("VmHWM",), proc).get("VmHWM", start_rss)
    return max(peak - start_rss, 0)
