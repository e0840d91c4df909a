"""Byte counts in words, for routerctl's tables and ``routerd.explain``'s sentences.

Standard library only (routerctl imports it and must start fast, without torch).
"""

from __future__ import annotations

_LARGER_UNITS = ("KiB", "MiB", "GiB")


def human_bytes(n: float, *, spelled_out: bool = False) -> str:
    """``512 B``, ``2.0 KiB``, ``5.5 MiB``, … up to TiB, binary units.

    Below 1 KiB a table says ``512 B``; with ``spelled_out`` a sentence says
    ``512 bytes`` (``1 byte``). Larger amounts read the same either way.
    """
    if abs(n) < 1024:
        if not spelled_out:
            return f"{n:.0f} B"
        return "1 byte" if n == 1 else f"{n:.0f} bytes"
    for unit in _LARGER_UNITS:
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"
