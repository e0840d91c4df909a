"""Giving freed C-heap memory back to the kernel.

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
from collections.abc import Callable


def glibc_trim() -> Callable[[], None] | None:
    """``malloc_trim(0)`` where the C library is glibc; None elsewhere (musl has none)."""
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
