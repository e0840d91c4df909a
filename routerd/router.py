"""The router: a model id from a request → the registered version that serves it.

It works over an immutable snapshot of the registry, rebuilt and swapped whole
whenever the registry changes, so a request never sees half a change and the hot
path does no SQL.

Resolution:

1. ``name@version`` → exactly that version, or ModelNotFound.
2. ``name`` → the newest registered version of that name (the route a model has
   until weighted routes are set for it), or ModelNotFound.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from routerd.errors import ModelNotFound
from state import VersionRecord


@dataclass(frozen=True)
class RoutingTable:
    """Immutable: built once from the registry, replaced, never edited."""

    versions: dict[str, VersionRecord]  # "name@version" → record
    latest: dict[str, VersionRecord]  # "name" → its newest version

    @classmethod
    def build(cls, records: Iterable[VersionRecord]) -> RoutingTable:
        versions: dict[str, VersionRecord] = {}
        latest: dict[str, VersionRecord] = {}
        for record in records:
            versions[record.model_id] = record
            current = latest.get(record.name)
            if current is None or record.created_at >= current.created_at:
                latest[record.name] = record
        return cls(versions=versions, latest=latest)


class Router:
    """Resolves model ids against the current RoutingTable."""

    def __init__(self, records: Iterable[VersionRecord] = ()) -> None:
        self._table = RoutingTable.build(records)

    def replace(self, records: Iterable[VersionRecord]) -> None:
        """Swap in a table built from ``records`` (the whole registry)."""
        self._table = RoutingTable.build(records)

    @property
    def table(self) -> RoutingTable:
        return self._table

    def resolve(self, model_id: str) -> VersionRecord:
        table = self._table
        name, sep, _ = model_id.partition("@")
        record = table.versions.get(model_id) if sep else table.latest.get(name)
        if record is None:
            raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")
        return record
