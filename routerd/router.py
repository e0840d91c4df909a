"""The router: a model id from a request → the registered version that serves it.

It works over an immutable snapshot of the registry and its routes, rebuilt and
swapped whole whenever either changes, so a request never sees half a change and
the hot path does no SQL.

Resolution:

1. ``name@version`` → exactly that version, or ModelNotFound. Routes are bypassed.
2. ``name`` with a route (weights set by ``routerctl route set`` or a rollout) → a
   version drawn by the weighted, sticky split of ``policies.split``; and, for a
   share of requests, a shadow version that gets a copy.
3. ``name`` without a route → its newest registered version (plus the shadow, if
   one is set).

``resolve`` is the deterministic form for operators (load, pin, why): a routed name
resolves to its primary version, the one with the largest weight.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from policies.split import choose_version, mirrors
from routerd.errors import ModelNotFound
from routerd.model_ids import split_model_id
from state import RouteRecord, VersionRecord


@dataclass(frozen=True)
class Route:
    """A model's route with its versions' records, ready for the hot path."""

    name: str
    weights: tuple[tuple[str, int], ...]  # (version, weight); empty: newest version
    shadow: tuple[VersionRecord, float] | None  # (version, percent)


@dataclass(slots=True)
class Routed:
    """Where one request goes: the version serving it, and a shadow copy if any.

    Not frozen, though never changed: one is built per request, and a frozen
    dataclass costs about four times as much to build."""

    record: VersionRecord
    shadow: VersionRecord | None


@dataclass(frozen=True)
class RoutingTable:
    """Immutable: built once from the registry, replaced, never edited."""

    versions: dict[str, VersionRecord]  # "name@version" → record
    latest: dict[str, VersionRecord]  # "name" → its primary version (see resolve)
    routes: dict[str, Route]  # "name" → its route, for names that have one or a shadow

    @classmethod
    def build(
        cls, records: Iterable[VersionRecord], routes: Iterable[RouteRecord] = ()
    ) -> RoutingTable:
        versions: dict[str, VersionRecord] = {}
        latest: dict[str, VersionRecord] = {}
        for record in records:
            versions[record.model_id] = record
            current = latest.get(record.name)
            if current is None or record.created_at >= current.created_at:
                latest[record.name] = record
        table: dict[str, Route] = {}
        for route in routes:
            weights = tuple(
                (version, weight)
                for version, weight in route.weights.items()
                if f"{route.name}@{version}" in versions
            )
            shadow = None
            if route.shadow is not None:
                target = versions.get(f"{route.name}@{route.shadow.version}")
                shadow = None if target is None else (target, route.shadow.percent)
            if any(weight > 0 for _, weight in weights):
                primary = max(weights, key=lambda vw: vw[1])[0]  # first of the heaviest
                latest[route.name] = versions[f"{route.name}@{primary}"]
            else:
                weights = ()
            if weights or shadow is not None:
                table[route.name] = Route(name=route.name, weights=weights, shadow=shadow)
        return cls(versions=versions, latest=latest, routes=table)


class Router:
    """Resolves model ids against the current RoutingTable."""

    def __init__(
        self,
        records: Iterable[VersionRecord] = (),
        routes: Iterable[RouteRecord] = (),
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._table = RoutingTable.build(records, routes)
        self._rng = rng or random.Random()

    def replace(self, records: Iterable[VersionRecord], routes: Iterable[RouteRecord] = ()) -> None:
        """Swap in a table built from ``records`` (the whole registry) and ``routes``."""
        self._table = RoutingTable.build(records, routes)

    @property
    def table(self) -> RoutingTable:
        return self._table

    def resolve(self, model_id: str) -> VersionRecord:
        table = self._table
        try:
            name, version = split_model_id(model_id)
        except ValueError:
            record = None  # malformed: no version can have this id
        else:
            record = table.latest.get(name) if version is None else table.versions.get(model_id)
        if record is None:
            raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")
        return record

    def route(self, model_id: str, sticky_key: str | None = None) -> Routed:
        """Where a client request for ``model_id`` goes (see the module docstring)."""
        table = self._table
        if "@" in model_id:
            return Routed(self.resolve(model_id), None)
        route = table.routes.get(model_id)
        if route is None:
            return Routed(self.resolve(model_id), None)
        if route.weights:
            version = choose_version(model_id, route.weights, sticky_key, self._rng)
            record = table.versions[f"{model_id}@{version}"]
        else:
            record = self.resolve(model_id)
        shadow = None
        if route.shadow is not None:
            target, percent = route.shadow
            if target.model_id != record.model_id and mirrors(percent, self._rng):
                shadow = target
        return Routed(record, shadow)
