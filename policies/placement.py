"""Placement: which device a version's instance goes on.

Pure (DESIGN.md rule 2): the caller passes the device preference and the devices
that exist; the answer is a device id or a ``PlacementError`` saying why none fits.
No I/O, no logging — the scheduler records the decision when it commits it.

Decision tree for ``place(preference, devices)``:

1. ``"auto"``: the first GPU (``cuda:0`` before ``cuda:1``), else ``"cpu"``.
2. ``"cuda"``: the first GPU; no GPU at all → PlacementError.
3. an exact id (``"cpu"``, ``"cuda:N"``): that device if it exists → else PlacementError
   naming the devices that do exist.

Memory-aware placement (best-fit over the ledger) extends step 1 and 2 by choosing
among GPUs by free memory instead of by index.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_DEVICE_ID = re.compile(r"^(cpu|cuda|cuda:\d+|auto)$")


class PlacementError(Exception):
    """No device can take the instance; the message says why."""


def is_device_preference(value: str) -> bool:
    """True for values ``place`` understands, so bad config is refused at registration."""
    return bool(_DEVICE_ID.match(value))


def place(preference: str, devices: Sequence[str]) -> str:
    """Choose a device id from ``devices`` for the given preference (see module tree)."""
    if not is_device_preference(preference):
        raise PlacementError(f"device {preference!r} is not one of auto, cpu, cuda, cuda:N")
    gpus = [d for d in devices if d.startswith("cuda:")]
    if preference == "auto":
        return gpus[0] if gpus else "cpu"
    if preference == "cuda":
        if not gpus:
            raise PlacementError("device 'cuda' was asked for but this host has no GPU")
        return gpus[0]
    if preference not in devices:
        raise PlacementError(
            f"device {preference!r} does not exist here (devices: {', '.join(devices)})"
        )
    return preference
