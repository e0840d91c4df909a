"""What ``routerctl ps`` and ``routerctl load`` draw, from the admin API's JSON.

Kept apart from the command plumbing in ``routerd.ctl`` so it can be tested on plain
data; like ``routerd.ctl`` it needs only the standard library.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from routerd.units import human_bytes


def _until(instance: dict[str, Any], now: float) -> str:
    """When an instance will unload by itself, in words (``ollama ps``'s UNTIL)."""
    if instance.get("pinned"):
        return "pinned"
    if instance["state"] != "ready":
        return "-"
    expires_at = instance.get("expires_at")
    if expires_at is None:
        return "while busy" if instance.get("in_flight") else "forever"
    seconds = max(0.0, expires_at - now)
    if seconds < 1:
        return "now"
    if seconds < 60:
        return f"{seconds:.0f} seconds from now"
    if seconds < 3600:
        minutes = round(seconds / 60)
        return f"{minutes} minute{'s' if minutes != 1 else ''} from now"
    hours = seconds / 3600
    return f"{hours:.1f} hours from now"


def _state(instance: dict[str, Any]) -> str:
    percent = instance.get("load_percent")
    if percent is not None and instance["state"] in ("waiting", "loading", "warming"):
        return f"{instance['state']} {percent}%"
    return str(instance["state"])


def _name(instance: dict[str, Any]) -> str:
    name = f"{instance['model']}@{instance['version']}"
    return name + (f"#{instance['replica']}" if instance.get("replica") else "")


def format_ps(status: dict[str, Any], now: float | None = None) -> str:
    """``NAME DEVICE SIZE STATE IN FLIGHT UNTIL``, one row per instance."""
    instances = status.get("instances", [])
    if not instances:
        return "no models loaded"
    now = time.time() if now is None else now
    rows = [
        [
            _name(i),
            i["device"],
            human_bytes(i["bytes"]),
            _state(i),
            str(i["in_flight"]) + (f" (+{i['queued']} queued)" if i.get("queued") else ""),
            _until(i, now),
        ]
        for i in sorted(instances, key=lambda i: (i["model"], i["version"], i.get("replica", 0)))
    ]
    headers = ["NAME", "DEVICE", "SIZE", "STATE", "IN FLIGHT", "UNTIL"]
    widths = [max(len(h), *(len(r[c]) for r in rows)) for c, h in enumerate(headers)]
    lines = ["   ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def load_progress(instances: Sequence[dict[str, Any]], model: str) -> tuple[str, str] | None:
    """(phase, line) for ``model``'s load in progress, or None when none is in progress.

    ``model`` is ``NAME`` or ``NAME@VERSION``; the line reads e.g.
    ``loading demo-large@1 on cpu: reading weights 40.0 MiB / 98.0 MiB (24%)``.
    """
    name, _, version = model.partition("@")
    for i in instances:
        if i["model"] != name or (version and i["version"] != version):
            continue
        if i["state"] not in ("waiting", "loading", "warming"):
            continue
        where = f"loading {i['model']}@{i['version']} on {i['device']}"
        progress = i.get("progress")
        percent = i.get("load_percent") or 0
        if i["state"] == "waiting":
            return "waiting", f"{where}: waiting for room ({percent}%)"
        if not progress:
            return "starting", f"{where}: starting ({percent}%)"
        phase = str(progress["phase"])
        done, total = progress.get("done_bytes", 0), progress.get("total_bytes", 0)
        amount = f" {human_bytes(done)} / {human_bytes(total)}" if total else ""
        return phase, f"{where}: {phase}{amount} ({percent}%)"
    return None
