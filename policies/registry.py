"""One registry for every policy kind, extensible through Python entry points.

Kinds: ``routing``, ``batching``, ``placement``, ``eviction``. Built-in policies live
in their modules (``policies.routing``, ``.batching``, ``.placement``, ``.eviction``),
imported the first time their kind is asked for. Third parties add policies with
entry points in group ``routerd.policies``, named ``<kind>.<policy-name>`` and
pointing to a factory (usually the class) called with the policy's parameters as
keywords::

    [project.entry-points."routerd.policies"]
    "routing.sticky-first" = "acme_policies:StickyFirst"

A built-in name cannot be replaced by a plug-in. Placement factories are called
with ``eviction=`` (the eviction policy object); the others with what config gives.

Who calls what:

- ``check(kind, name)`` — config loading (``[scheduler] placement / eviction /
  routing``) and model registration (``options.routing``, ``options.batching``),
  so an unknown or broken policy fails at start, naming the known ones.
- ``create(kind, name, **params)`` — the app (placement, eviction), the scheduler
  (routing, once per name) and each instance's batcher (batching): a new object.
- ``known(kind)`` — error messages and ``routerctl``-style listings.
- ``reload_plugins()`` — after installing a plug-in into a running process, and tests.

Entry points are read once and cached; a plug-in's module is imported only when its
policy is checked or created, so a broken plug-in fails only the lookups of its
own name — with the distribution that declared it in the message.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

log = logging.getLogger("routerd.policies")

GROUP = "routerd.policies"
KINDS = ("routing", "batching", "placement", "eviction")

Factory = Callable[..., Any]


# -- built-ins ---------------------------------------------------------------------


def _routing() -> Mapping[str, Factory]:
    from policies.routing import ROUTING_POLICIES

    return ROUTING_POLICIES


def _batching() -> Mapping[str, Factory]:
    # Imported by name: policies.batching may not exist yet in every checkout.
    module = importlib.import_module("policies.batching")
    table: Mapping[str, Factory] = getattr(module, "BATCHING_POLICIES", {})
    return table


def _placement() -> Mapping[str, Factory]:
    from policies.placement import STRATEGIES

    return {name: functools.partial(_make_placement, name) for name in STRATEGIES}


def _make_placement(strategy: str, *, eviction: Any = None) -> Any:
    from policies.eviction import DEFAULT_EVICTION, EVICTION_POLICIES
    from policies.placement import placement_policy

    return placement_policy(
        strategy, eviction if eviction is not None else EVICTION_POLICIES[DEFAULT_EVICTION]()
    )


def _eviction() -> Mapping[str, Factory]:
    from policies.eviction import EVICTION_POLICIES

    return EVICTION_POLICIES


_BUILTIN_LOADERS: dict[str, Callable[[], Mapping[str, Factory]]] = {
    "routing": _routing,
    "batching": _batching,
    "placement": _placement,
    "eviction": _eviction,
}
_builtin_tables: dict[str, dict[str, Factory]] = {}


def _builtins(kind: str) -> dict[str, Factory]:
    table = _builtin_tables.get(kind)
    if table is not None:
        return table
    loader = _BUILTIN_LOADERS.get(kind)
    if loader is None:
        raise ValueError(f"unknown policy kind {kind!r} (known: {', '.join(KINDS)})")
    try:
        table = dict(loader())
    except ModuleNotFoundError as exc:
        if exc.name != f"policies.{kind}":
            raise
        return {}  # that module is not written yet: no built-ins (not cached)
    _builtin_tables[kind] = table
    return table


# -- plug-ins ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Plugin:
    point: EntryPoint
    dist: str  # "acme-policies 0.1", for messages

    def describe(self) -> str:
        return f"distribution {self.dist} (entry point {self.point.name} = {self.point.value})"


def _dist_name(point: EntryPoint) -> str:
    dist = point.dist
    if dist is None:
        return "<unknown distribution>"
    try:
        return f"{dist.name} {dist.version}"
    except Exception:  # metadata without Name/Version
        return "<unnamed distribution>"


@functools.cache
def _plugins() -> dict[tuple[str, str], _Plugin]:
    """Entry points by (kind, name), read once; bad names and clashes are logged, skipped."""
    found: dict[tuple[str, str], _Plugin] = {}
    for point in entry_points(group=GROUP):
        plugin = _Plugin(point, _dist_name(point))
        kind, dot, name = point.name.partition(".")
        if not dot or kind not in KINDS or not name:
            log.warning(
                "ignoring %s: its name should be <kind>.<policy> with kind one of %s",
                plugin.describe(),
                ", ".join(KINDS),
            )
            continue
        if name in _builtins(kind):
            log.warning("ignoring %s: %r is a built-in %s policy", plugin.describe(), name, kind)
            continue
        previous = found.get((kind, name))
        if previous is not None:
            if previous.point.value != point.value:
                log.warning(
                    "ignoring %s: %s already declares %s policy %r",
                    plugin.describe(),
                    previous.dist,
                    kind,
                    name,
                )
            continue
        found[(kind, name)] = plugin
    return found


_loaded: dict[tuple[str, str], Factory] = {}


def _load(kind: str, name: str, plugin: _Plugin) -> Factory:
    factory = _loaded.get((kind, name))
    if factory is not None:
        return factory
    try:
        obj: object = plugin.point.load()
    except Exception as exc:
        raise ValueError(
            f"{kind} policy {name!r} from {plugin.describe()} could not be loaded: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not callable(obj):
        raise ValueError(
            f"{kind} policy {name!r} from {plugin.describe()} is not a class or factory"
        )
    _loaded[(kind, name)] = factory = obj
    return factory


def reload_plugins() -> None:
    """Forget the cached entry points and loaded plug-ins; the next lookup reads them again."""
    _plugins.cache_clear()
    _loaded.clear()
    _refusal.cache_clear()


# -- the API -----------------------------------------------------------------------


def known(kind: str) -> list[str]:
    """Names of the ``kind`` policies available: built-in and declared by plug-ins, sorted.

    A declared plug-in is listed even if its module turns out broken; ``check`` says so.
    """
    names = set(_builtins(kind))
    names.update(name for (k, name) in _plugins() if k == kind)
    return sorted(names)


def _factory(kind: str, name: str) -> Factory:
    builtin = _builtins(kind).get(name)
    if builtin is not None:
        return builtin
    plugin = _plugins().get((kind, name))
    if plugin is None:
        names = ", ".join(known(kind)) or "none"
        raise ValueError(f"unknown {kind} policy {name!r} (known: {names})")
    return _load(kind, name, plugin)


def check(kind: str, name: str) -> None:
    """Nothing if ``name`` is a usable ``kind`` policy; else ValueError saying why.

    Unknown → ``unknown routing policy 'x' (known: a, b, c)``. A plug-in whose module
    cannot be imported → the message names its distribution and the import error.
    """
    _factory(kind, name)


def create(kind: str, name: str, **params: Any) -> Any:
    """A new ``kind`` policy object called ``name``, built with ``params`` (keywords).

    ValueError for an unknown or broken policy, or for parameters it does not take.
    """
    factory = _factory(kind, name)
    refusal = _refusal(factory, tuple(sorted(params)))
    if refusal is not None:
        raise ValueError(f"{kind} policy {name!r}: {refusal}")
    return factory(**params)


@functools.lru_cache(maxsize=256)
def _refusal(factory: Factory, keywords: tuple[str, ...]) -> str | None:
    """Why ``factory`` cannot be called with these keywords, or None; read once per
    factory and set of keywords: batchers and loads create policies often, and
    reading a signature costs more than building most policies."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some callables have no signature to read
        return None
    try:
        signature.bind(**dict.fromkeys(keywords))
    except TypeError as exc:
        accepted = ", ".join(
            p.name
            for p in signature.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        )
        return f"{exc} (parameters: {accepted or 'none'})"
    return None
