"""What the store hands out and what it accepts: records, specs, the one error, the checks.

Kept apart from the SQL so that config, the API handlers and the router can use the
types without knowing how they are stored, and so that every value is checked once,
here at the store's boundary, before it can reach the database: a name that could not
be routed (``name@version``), put in a URL or a header never gets a row. The checks
raise ``ValueError`` whose message names the offending field, which the API turns into
a 400 with that field as ``param``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

SOURCES: Final = ("config", "api", "demo")
"""Where a version came from: ``[[models]]`` in config, ``routerctl register``, ``--demo``."""

NAME_MAX_LEN: Final = 128
VERSION_MAX_LEN: Final = 64

# Letters, digits and . _ - : only. '@' separates name from version in model ids and
# '/' would split URLs and paths, so both are out, as is whitespace (headers, logs).
_ID_CHARS = re.compile(r"[A-Za-z0-9._:\-]+")


class StoreError(Exception):
    """The database could not do what was asked: locked, corrupt, unwritable, too new.

    The message says what was being done, on which file, and what to do about it.
    Bad *input* is a ``ValueError`` instead, raised before the database is touched.
    """


@dataclass(frozen=True)
class VersionSpec:
    """A version as config or ``routerctl register`` describes it, before it is stored."""

    name: str
    version: str
    backend: str
    path: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class VersionRecord:
    """A stored version. ``created_at`` survives updates; ``updated_at`` moves with them."""

    name: str
    version: str
    backend: str
    path: str
    options: dict[str, Any]
    source: str
    created_at: float
    updated_at: float
    state: str = "active"  # one of VERSION_STATES (schema 3)
    # ``name@version``, made once: every request reads it several times (routing,
    # leases, metrics, headers), and a record never changes.
    model_id: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_id", f"{self.name}@{self.version}")


VERSION_STATES: Final = ("staged", "active", "retired")
"""A version's place in its model's life: ``staged`` (registered while the model has a
route, so it gets no traffic until a route or rollout gives it some), ``active`` (has
weight in the route, or is served by name without one), ``retired`` (lost its weight:
replaced by a rollout or a route change, or rolled back)."""


@dataclass(frozen=True)
class SyncResult:
    """Model ids (``name@version``) a sync inserted, changed and deleted."""

    added: list[str]
    updated: list[str]
    removed: list[str]

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.removed)


EVENT_KINDS: Final = ("load", "load_failed", "evict", "leak", "failed")
"""The kinds of event routerd itself records. ``Store.record_event`` accepts any kind
that is a valid identifier (so a newer routerd's rows still read back); these are the
ones the rest of the code knows how to describe:

- ``load``: a version became resident (``device``, ``bytes``, ``duration_ms``: how
  long the load and warm-up took; ``reason``: why it was loaded).
- ``load_failed``: a load did not complete; ``reason`` is the backend's message.
- ``evict``: a version was unloaded; ``reason`` is one of ``EVICT_REASONS``,
  ``bytes`` what it freed, ``trigger`` the model id of the load that needed the room.
- ``failed``: a loaded instance failed (backend errors in a row, a hang, a crash);
  ``reason`` says which. An ``evict`` event with reason ``failed`` follows.
- ``leak``: after an eviction the device reading did not show the memory the
  instance held as free again; ``bytes`` is what it held, ``reason`` says more.
"""

EVICT_REASONS: Final = (
    "lru",  # the eviction policies' names: the policy chose it to make room
    "lfu",
    "gdsf",
    "cost",
    "ttl",
    "manual",
    "pressure",
    "shutdown",
    "oom-retry",
    "reload",
    "retired",
    "failed",
)
"""Why an instance is evicted (``Event.reason`` of an ``evict`` event)."""

FOOTPRINT_PARTS: Final = ("weights", "runtime", "working")
"""The terms a measured footprint is split into (``Store.record_footprint``)."""


@dataclass(frozen=True)
class Event:
    """One entry of the event log (loads, evictions, failures), with why it happened.

    ``bytes``, ``duration_ms`` and ``trigger`` (schema 2) are None on rows recorded
    without them, including every row written before schema 2.
    """

    id: int
    ts: float
    kind: str
    model: str
    version: str
    device: str | None
    reason: str | None
    detail: dict[str, Any]
    bytes: int | None = None
    duration_ms: float | None = None
    trigger: str | None = None

    @property
    def model_id(self) -> str:
        return f"{self.model}@{self.version}"


@dataclass(frozen=True)
class FootprintRecord:
    """What one version was measured to occupy on one kind of device (``cpu``, ``cuda``).

    ``measured_bytes`` is ``weights_bytes + runtime_bytes + working_bytes``;
    ``estimated_bytes`` is what was predicted before the load (None if nothing was).
    """

    name: str
    version: str
    device_kind: str
    estimated_bytes: int | None
    measured_bytes: int
    weights_bytes: int
    runtime_bytes: int
    working_bytes: int
    measured_at: float

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.version}"


# -- checks ------------------------------------------------------------------------


def check_identifier(field_name: str, value: object, max_len: int) -> str:
    """Return ``value`` if it is a usable model name / version / event kind, else ValueError."""
    if not isinstance(value, str):
        raise ValueError(f"{field_name} must be a string, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{field_name} must not be empty")
    if len(value) > max_len:
        raise ValueError(
            f"{field_name} is {len(value)} characters long; at most {max_len} are allowed"
        )
    if any(ch.isspace() for ch in value):
        raise ValueError(f"{field_name} {value!r} must not contain whitespace")
    if "@" in value:
        raise ValueError(
            f"{field_name} {value!r} must not contain '@' (it separates name and version)"
        )
    if "/" in value:
        raise ValueError(f"{field_name} {value!r} must not contain '/'")
    if not _ID_CHARS.fullmatch(value):
        bad = next(ch for ch in value if not _ID_CHARS.fullmatch(ch))
        raise ValueError(
            f"{field_name} {value!r} contains {bad!r}; "
            "only letters, digits, '.', '_', '-' and ':' are allowed"
        )
    return value


def check_name(value: object) -> str:
    return check_identifier("name", value, NAME_MAX_LEN)


def check_version(value: object) -> str:
    return check_identifier("version", value, VERSION_MAX_LEN)


def check_text(field_name: str, value: object) -> str:
    """A required free-text field (backend kind, path, device): a non-blank string."""
    if not isinstance(value, str):
        raise ValueError(f"{field_name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{field_name} must not be empty")
    if "\x00" in value:
        raise ValueError(f"{field_name} must not contain NUL characters")
    return value


def check_byte_count(field_name: str, value: object) -> int:
    """A non-negative integer number of bytes (``bool`` is refused), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field_name} must be an integer, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{field_name} must not be negative, got {value}")
    return value


def check_duration_ms(field_name: str, value: object) -> float:
    """A finite, non-negative number of milliseconds, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{field_name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{field_name} must be a finite, non-negative number, got {value}")
    return float(value)


def check_source(value: object) -> str:
    if value not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}; got {value!r}")
    return str(value)


def dump_json_object(field_name: str, value: object) -> str:
    """``value`` (a mapping with string keys) as canonical JSON, else ValueError.

    Keys are sorted so that equal option sets have equal text, which is how a sync
    tells whether a version changed.
    """
    if not isinstance(value, Mapping):
        raise ValueError(f"{field_name} must be a mapping, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise ValueError(f"{field_name} keys must be strings, got {key!r}")
    try:
        return json.dumps(dict(value), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{field_name} must be JSON-serializable: {exc}") from exc


def load_json_object(text: str) -> dict[str, Any]:
    """Inverse of ``dump_json_object`` for text read back from the database."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value
