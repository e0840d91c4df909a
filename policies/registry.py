"""One registry for every policy kind, extensible through Python entry points.

Built-in policies live in their modules (``policies.routing``, ``.batching``,
``.placement``, ``.eviction``). Third parties add theirs with entry points in group
``routerd.policies``, named ``<kind>.<policy-name>`` (``routing.sticky-first``) and
pointing to a factory called with the policy's parameters from config. Names are
checked when config is loaded, so an unknown one fails at start, listing the known.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

log = logging.getLogger("routerd.policies")

GROUP = "routerd.policies"
KINDS = ("routing", "batching", "placement", "eviction")


def _builtins(kind: str) -> dict[str, Callable[..., Any]]:
    if kind == "routing":
        from policies.routing import ROUTING_POLICIES

        return dict(ROUTING_POLICIES)
    if kind == "batching":
        from policies.batching import BATCHING_POLICIES

        return dict(BATCHING_POLICIES)
    if kind == "placement":
        from policies.eviction import LeastRecentlyUsed
        from policies.placement import STRATEGIES, PlacementPolicy

        def factory(strategy: str) -> Callable[..., Any]:
            def make(eviction: Any = None, **_: Any) -> PlacementPolicy:
                return PlacementPolicy(strategy, eviction or LeastRecentlyUsed())

            return make

        return {name: factory(name) for name in STRATEGIES}
    if kind == "eviction":
        from policies.eviction import EVICTION_POLICIES

        return dict(EVICTION_POLICIES)
    raise ValueError(f"unknown policy kind {kind!r} (known: {', '.join(KINDS)})")


@functools.cache
def _plugins() -> dict[tuple[str, str], EntryPoint]:
    """Entry points by (kind, name), read once; malformed names are logged and skipped."""
    found: dict[tuple[str, str], EntryPoint] = {}
    for point in entry_points(group=GROUP):
        kind, dot, name = point.name.partition(".")
        if not dot or kind not in KINDS or not name:
            log.warning("ignoring policy entry point %r: expected <kind>.<name>", point.name)
            continue
        found[(kind, name)] = point
    return found


def reload_plugins() -> None:
    """Forget the cached entry points (after installing a plug-in at run time, or in tests)."""
    _plugins.cache_clear()


def known(kind: str) -> list[str]:
    names = set(_builtins(kind))
    names.update(name for (k, name) in _plugins() if k == kind)
    return sorted(names)


def check(kind: str, name: str) -> None:
    """ValueError naming the known policies unless ``name`` is one of ``kind``."""
    if name not in known(kind):
        raise ValueError(f"unknown {kind} policy {name!r} (known: {', '.join(known(kind))})")


def create(kind: str, name: str, **params: Any) -> Any:
    """A new policy object of ``kind`` called ``name``, built with ``params``."""
    builtins = _builtins(kind)
    if name in builtins:
        return builtins[name](**params)
    point = _plugins().get((kind, name))
    if point is None:
        check(kind, name)
        raise AssertionError("unreachable")
    try:
        factory = point.load()
    except Exception as exc:
        dist = point.dist.name if point.dist is not None else "an unknown distribution"
        raise ValueError(f"{kind} policy {name!r} from {dist} could not be loaded: {exc}") from exc
    return factory(**params)
