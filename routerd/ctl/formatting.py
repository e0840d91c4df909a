"""Small text helpers every routerctl view shares: times, durations and plain tables.

Byte counts come from ``routerd.units.human_bytes``, which ``routerd.explain`` uses too.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from routerd.units import human_bytes


def human_age(timestamp: float, now: float | None = None) -> str:
    seconds = max(0.0, (now or time.time()) - timestamp)
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def human_until(timestamp: float, now: float | None = None) -> str:
    seconds = max(0.0, timestamp - (now or time.time()))
    if seconds < 60:
        return f"in {seconds:.0f}s"
    if seconds < 3600:
        return f"in {seconds / 60:.0f}m"
    return f"in {seconds / 3600:.1f}h"


def human_duration(seconds: float) -> str:
    """``850 ms``, ``12.3 s``, ``4m 10s``, ``2h 5m``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m {int(seconds % 60)}s"
    return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60)}m"


def bytes_or_dash(n: int | None) -> str:
    """A size, or ``-`` where the daemon has none (not measured yet, or not recorded)."""
    return "-" if n is None else human_bytes(n)


def clip(text: str, width: int = 60) -> str:
    """Long free text (reasons) cut to ``width`` so one row stays one line."""
    return text if len(text) <= width else text[: width - 1] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)
