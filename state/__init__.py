"""routerd's persistent state: the registry of model versions, pins, measured
footprints, the event log, routes, shadows and rollouts (``state.routes``), and the
per-request log (``state.requests``).

One SQLite file (through sqlite-utils) holds what must outlive the process: which
models and versions exist and where they came from, which versions are pinned, what
each was measured to occupy per kind of device, and a log of loads, evictions and
failures with their reasons. All SQL lives in this package; the rest of routerd sees
only the records and the ``Store`` methods below. The schema moves forward by numbered
migrations (``state.migrations``), applied when the store opens.

A ``Store`` is used from one thread, the event loop's (see ``state.store``).
"""

from state.records import (
    EVENT_KINDS,
    EVICT_REASONS,
    FOOTPRINT_PARTS,
    NAME_MAX_LEN,
    SOURCES,
    VERSION_MAX_LEN,
    VERSION_STATES,
    Event,
    FootprintRecord,
    StoreError,
    SyncResult,
    VersionRecord,
    VersionSpec,
)
from state.requests import (
    REQUEST_COLUMNS,
    RequestEntry,
    RequestRow,
    RequestTuple,
    RequestUsage,
    check_request_row,
)
from state.routes import (
    LIVE_ROLLOUT_STATUSES,
    ROLLOUT_STATUSES,
    RolloutRecord,
    RolloutStep,
    RouteChange,
    RouteRecord,
    Shadow,
)
from state.store import Store

__all__ = [
    "EVENT_KINDS",
    "EVICT_REASONS",
    "FOOTPRINT_PARTS",
    "LIVE_ROLLOUT_STATUSES",
    "NAME_MAX_LEN",
    "REQUEST_COLUMNS",
    "ROLLOUT_STATUSES",
    "SOURCES",
    "VERSION_MAX_LEN",
    "VERSION_STATES",
    "Event",
    "FootprintRecord",
    "RequestEntry",
    "RequestRow",
    "RequestTuple",
    "RequestUsage",
    "RolloutRecord",
    "RolloutStep",
    "RouteChange",
    "RouteRecord",
    "Shadow",
    "Store",
    "StoreError",
    "SyncResult",
    "VersionRecord",
    "VersionSpec",
    "check_request_row",
]
