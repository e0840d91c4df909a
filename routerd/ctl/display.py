"""What routerctl prints for people about models and memory, from the admin API's JSON.

``status``, ``ps``, ``models``, ``events``, ``usage`` and ``load``'s progress line. Kept apart from
the command plumbing so each view can be tested on plain data.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from routerd.ctl.formatting import bytes_or_dash, clip, human_age, human_until, table
from routerd.model_ids import split_model_id
from routerd.units import human_bytes

# -- status -----------------------------------------------------------------------


def format_status(status: dict[str, Any]) -> str:
    devices = table(
        ["DEVICE", "TOTAL", "USED", "BUDGET", "RESERVED", "ROUTERD"],
        [
            [
                d["id"],
                human_bytes(d["total_bytes"]),
                human_bytes(d["used_bytes"]),
                bytes_or_dash(_budget(d)),
                human_bytes(d["reserved_bytes"]),
                human_bytes(d.get("routerd_bytes", 0)),
            ]
            for d in status["devices"]
        ],
    )
    instances = status["instances"]
    traffic = _format_traffic(status.get("traffic") or [])
    text = devices + "\n" + _DEVICE_COLUMNS + _format_tier(status.get("host_tier"))
    text += "\n\n" + (format_instances(instances) if instances else "no models loaded")
    return text + _format_failed(status.get("failed") or []) + traffic


_DEVICE_COLUMNS = "(TOTAL and USED count the whole device; BUDGET is what routerd may use of it)"
"""Without it a CPU row reads as if routerd could fill the machine's RAM, when its
budget (``devices.cpu_memory``) may be a small part of it."""


def _budget(device: dict[str, Any]) -> int | None:
    """What routerd may use of a device: its budget less other processes' use and the
    headroom (``capacity_bytes``); None from a daemon that does not report it."""
    for key in ("capacity_bytes", "budget_bytes"):
        value = device.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _format_tier(tier: dict[str, Any] | None) -> str:
    """One line for the host-RAM tier, when there is one."""
    if not tier or not tier.get("capacity_bytes"):
        return ""
    resting = ", ".join(tier.get("models") or []) or "nothing"
    return (
        f"\nhost tier: {human_bytes(tier['used_bytes'])} of "
        f"{human_bytes(tier['capacity_bytes'])} (holds {resting})"
    )


def _format_failed(failed: Sequence[dict[str, Any]]) -> str:
    """Versions whose instance failed (restarted on their next request), if any."""
    if not failed:
        return ""
    return "\n\nfailed instances (loaded again on the next request):\n" + table(
        ["MODEL", "DEVICE", "WHEN", "TIMES", "REASON"],
        [
            [
                f"{f['model']}@{f['version']}",
                f["device"],
                human_age(f["at"]),
                str(f["times"]),
                clip(f["reason"]),
            ]
            for f in failed
        ],
    )


def format_instances(instances: Sequence[dict[str, Any]]) -> str:
    """One row per instance. ESTIMATED (before the load) and EXPIRES (keep-alive) only
    when the daemon reports them; SIZE is the measured footprint ("-" until measured)."""
    estimated = any("estimated_bytes" in i for i in instances)
    expiring = any(i.get("expires_at") is not None for i in instances)
    headers = ["MODEL", "DEVICE", "STATE", *(["ESTIMATED"] if estimated else []), "SIZE"]
    headers += ["IN FLIGHT", "LAST USED", *(["EXPIRES"] if expiring else [])]
    rows = []
    for i in instances:
        row = [
            f"{i['model']}@{i['version']}",
            i["device"],
            i["state"] + (", pinned" if i.get("pinned") else ""),
        ]
        if estimated:
            row.append(bytes_or_dash(i.get("estimated_bytes") or None))
        row += [bytes_or_dash(_measured(i)), str(i["in_flight"]), human_age(i["last_used"])]
        if expiring:
            expires_at = i.get("expires_at")
            row.append("-" if expires_at is None else human_until(expires_at))
        rows.append(row)
    return table(headers, rows)


def _measured(instance: dict[str, Any]) -> int | None:
    """The measured footprint; daemons that predate ``measured_bytes`` report ``bytes``."""
    if "measured_bytes" in instance:
        measured: int | None = instance["measured_bytes"]
        return measured
    return int(instance["bytes"])


def _format_traffic(versions: list[dict[str, Any]]) -> str:
    """Per-version traffic for ``routerctl status``: a blank line and a table, or nothing."""
    rows = []
    for entry in versions:
        for kind in ("primary", "shadow"):
            stats = entry.get(kind)
            if not stats:
                continue
            p95 = stats.get("window_p95_ms")
            rows.append(
                [
                    entry["model"],
                    kind,
                    str(stats["requests"]),
                    str(stats["errors"]),
                    f"{stats['window_error_rate']:.1%}",
                    "-" if p95 is None else f"{p95:.1f} ms",
                ]
            )
    if not rows:
        return ""
    headers = ["MODEL", "TRAFFIC", "REQUESTS", "ERRORS", "ERROR RATE", "P95"]
    return "\n\n" + table(headers, rows)


# -- models and events ------------------------------------------------------------


def format_models(models: Sequence[dict[str, Any]]) -> str:
    if not models:
        return "no models registered"
    return table(
        ["MODEL", "BACKEND", "STATE", "PINNED", "SOURCE", "PATH"],
        [
            [
                m["id"],
                m["backend"],
                m["state"],
                "yes" if m.get("pinned") else "no",
                m["source"],
                m["path"],
            ]
            for m in models
        ],
    )


def format_events(events: Sequence[dict[str, Any]]) -> str:
    if not events:
        return "no events"
    return table(
        ["TIME", "KIND", "MODEL", "DEVICE", "REASON", "BYTES", "FOR", "WHERE"],
        [
            [
                human_age(e["ts"]),
                e["kind"],
                f"{e['model']}@{e['version']}",
                e.get("device") or "-",
                clip(e.get("reason") or "-"),
                bytes_or_dash(_event_bytes(e)),
                e.get("trigger") or "-",
                _where(e),
            ]
            for e in events
        ],
    )


def _where(event: dict[str, Any]) -> str:
    """Where a load's weights came from (``disk``, ``host``, ``sleep``) or where an
    eviction's went (``host``, ``sleep``, ``gone``); ``-`` for other events."""
    detail = event.get("detail") or {}
    where = detail.get("source") if event["kind"] == "load" else detail.get("tier")
    return str(where) if where else "-"


def _event_bytes(event: dict[str, Any]) -> int | None:
    """``bytes``; events recorded before it existed kept it in ``detail``."""
    value = event.get("bytes")
    if value is None:
        value = (event.get("detail") or {}).get("bytes")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# -- ps and load progress ---------------------------------------------------------


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
    if instance.get("tier"):  # resting in the host tier: where its weights wait
        return f"{instance['state']} ({human_bytes(instance.get('host_bytes') or 0)} in host RAM)"
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
    name, version = split_model_id(model)
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


# -- usage ------------------------------------------------------------------------


_USAGE_COLUMNS = [
    "MODEL",
    "REQUESTS",
    "ERRORS",
    "ERROR RATE",
    "REJECTED",
    "TOKENS IN",
    "TOKENS OUT",
    "COLD STARTS",
    "MEAN WAIT",
]


def format_usage(result: dict[str, Any], since: str) -> str:
    """The request log per model version, as ``GET /admin/requests/usage`` adds it up."""
    rows = result["usage"]
    window = "in the request log" if since == "all" else f"in the last {since}"
    if not rows:
        return f"no requests {window}"
    body = table(
        _USAGE_COLUMNS,
        [
            [
                "(no model)" if u["model"] is None else f"{u['model']}@{u['version']}",
                str(u["requests"]),
                str(u["errors"]),
                f"{u['error_rate']:.1%}",
                str(u["rejected"]),
                str(u["prompt_tokens"]),
                str(u["completion_tokens"]),
                str(u["cold_starts"]),
                "-" if u["mean_waited_ms"] is None else f"{u['mean_waited_ms']:.0f} ms",
            ]
            for u in rows
        ],
    )
    total = sum(u["requests"] for u in rows)
    return f"{total} requests {window}\n{body}"
