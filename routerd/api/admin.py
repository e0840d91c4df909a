"""The admin API under /admin/, which ``routerctl`` talks to (and nothing else does).

Handlers ask the scheduler and the registry; they never touch instances or SQL
themselves (DESIGN.md rule 1): a pin is asked of the scheduler, which keeps it in
the store; the handlers only read pins and events back from the store.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Final

from aiohttp import web

from routerd.api.errors import read_json_object
from routerd.api.keys import (
    AUDIT,
    DEVICES,
    LIVE,
    REGISTRY,
    REQUEST_LOG,
    ROUTER,
    SCHEDULER,
    STATS,
    STORE,
)
from routerd.config import ConfigError, parse_duration
from routerd.devices import DeviceInventory
from routerd.errors import BadRequest, NotFound
from routerd.explain import explain
from routerd.model_ids import split_model_id
from routerd.scheduler import InstanceSnapshot
from state import RequestUsage, VersionRecord, VersionSpec

routes = web.RouteTableDef()

_DEVICE: Final = re.compile(r"cpu|cuda(:[0-9]+)?")
"""Where ``POST /admin/load`` may be asked to put a version (omit it for the default)."""

WHY_HISTORY: Final = 1_000
"""How many of a version's latest events ``/admin/why`` reads: enough to find the load
that preceded its latest eviction."""


def _instance_json(snapshot: InstanceSnapshot) -> dict[str, Any]:
    return dataclasses.asdict(snapshot)


def _version_json(
    record: VersionRecord, request: web.Request, *, pinned: bool | None = None
) -> dict[str, Any]:
    """A version as routerctl shows it; ``pinned`` is read from the store unless given."""
    resident = request.app[SCHEDULER].instance(record.model_id)
    if pinned is None:
        pinned = request.app[STORE].is_pinned(record.name, record.version)
    return {
        "id": record.model_id,
        "name": record.name,
        "version": record.version,
        "backend": record.backend,
        "path": record.path,
        "options": record.options,
        "source": record.source,
        "created_at": record.created_at,
        "state": resident.state if resident else "unloaded",
        "device": resident.device if resident else None,
        "pinned": pinned,
    }


@routes.get("/admin/status")
async def status(request: web.Request) -> web.Response:
    scheduler = request.app[SCHEDULER]
    return web.json_response(
        {
            "devices": [dataclasses.asdict(d) for d in scheduler.devices()],
            "host_tier": dataclasses.asdict(scheduler.host_tier()),
            "instances": [_instance_json(i) for i in scheduler.instances()],
            "leaked": [dataclasses.asdict(leak) for leak in scheduler.leaks()],
            "failed": [dataclasses.asdict(f) for f in scheduler.failures()],
            "models": len(request.app[ROUTER].table.versions),
            "traffic": request.app[STATS].snapshot(),
            "accepting": request.app[LIVE].accepting,
            "memory_audit": request.app[AUDIT].status(),
        }
    )


@routes.get("/admin/models")
async def models(request: web.Request) -> web.Response:
    pinned = set(request.app[STORE].pinned_versions())
    return web.json_response(
        {
            "models": [
                _version_json(r, request, pinned=(r.name, r.version) in pinned)
                for r in request.app[REGISTRY].versions()
            ]
        }
    )


@routes.post("/admin/models")
async def register(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    for key in ("name", "path"):
        if not isinstance(body.get(key), str) or not body[key]:
            raise BadRequest(f"{key} is required and must be a string", param=key)
    options = body.get("options", {})
    if not isinstance(options, dict):
        raise BadRequest("options must be an object", param="options")
    version = body.get("version", "1")
    backend = body.get("backend", "transformers")
    if not isinstance(version, str) or not isinstance(backend, str):
        raise BadRequest("version and backend must be strings", param="version")
    spec = VersionSpec(
        name=body["name"], version=version, backend=backend, path=body["path"], options=options
    )
    record = request.app[REGISTRY].register(spec, source="api")
    return web.json_response(_version_json(record, request), status=201)


def _known_fields(body: dict[str, Any], *fields: str) -> None:
    """Refuse a field this endpoint does not take: it would otherwise be ignored."""
    unknown = body.keys() - set(fields)
    if unknown:
        key = min(unknown)
        raise BadRequest(f"Unrecognized request argument supplied: {key}", param=key)


def _model_param(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model is required (NAME or NAME@VERSION)", param="model")
    return model


def _device_param(body: dict[str, Any], devices: DeviceInventory) -> str | None:
    """``device`` if given: ``cpu``, ``cuda`` (the first GPU) or ``cuda:N``, and present."""
    device = body.get("device")
    if device is None:
        return None
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise BadRequest(f"device must be cpu, cuda or cuda:N, got {device!r}", param="device")
    here = devices.device_ids()
    present = any(d.startswith("cuda:") for d in here) if device == "cuda" else device in here
    if not present:
        raise BadRequest(
            f"device {device} does not exist here (devices: {', '.join(here) or 'none'})",
            param="device",
        )
    return device


def _force_param(body: dict[str, Any]) -> bool:
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise BadRequest(f"force must be a boolean, got {force!r}", param="force")
    return force


@routes.post("/admin/load")
async def load(request: web.Request) -> web.Response:
    """Load ``model`` now, on ``device`` if given (else where placement puts it);
    ``reprofile``: measure its footprint anew instead of trusting the stored one.

    ``already_loaded`` says the version was ready before this call, so that its
    ``load_ms`` (an earlier load's) is not taken for this call's."""
    body = await read_json_object(request)
    _known_fields(body, "model", "device", "reprofile")
    model = _model_param(body)
    device = _device_param(body, request.app[DEVICES])
    reprofile = body.get("reprofile", False)
    if not isinstance(reprofile, bool):
        raise BadRequest(f"reprofile must be a boolean, got {reprofile!r}", param="reprofile")
    record = request.app[ROUTER].resolve(model)
    snapshot, already = await request.app[SCHEDULER].load_or_find(
        record, device=device, reprofile=reprofile
    )
    return web.json_response({**_instance_json(snapshot), "already_loaded": already})


@routes.post("/admin/evict")
async def evict(request: web.Request) -> web.Response:
    """Evict ``NAME@VERSION``, or every resident version of ``NAME``.

    ``force``: do not wait for requests in flight; the scheduler ends them with an error.
    A pinned version is evicted too (a pin only keeps the scheduler from choosing it).
    """
    body = await read_json_object(request)
    _known_fields(body, "model", "force")
    model = _model_param(body)
    force = _force_param(body)
    router, scheduler = request.app[ROUTER], request.app[SCHEDULER]
    if "@" in model:
        targets = [router.resolve(model).model_id]
    else:
        if model not in router.table.latest:
            router.resolve(model)  # raises the 404 in the usual shape
        # One target per version: evicting a version takes all its replicas.
        targets = sorted(
            {i.model + "@" + i.version for i in scheduler.instances() if i.model == model}
        )
    if not targets or all(scheduler.instance(t) is None for t in targets):
        raise NotFound(f"{model} is not loaded", param="model")
    evicted = [
        _instance_json(await scheduler.evict(target, reason="manual", force=force))
        for target in targets
    ]
    return web.json_response({"evicted": evicted})


@routes.post("/admin/pin")
async def pin(request: web.Request) -> web.Response:
    """Pin ``model`` (NAME resolves through the router): the scheduler keeps it resident."""
    return await _set_pinned(request, pinned=True)


@routes.post("/admin/unpin")
async def unpin(request: web.Request) -> web.Response:
    return await _set_pinned(request, pinned=False)


async def _set_pinned(request: web.Request, *, pinned: bool) -> web.Response:
    scheduler = request.app[SCHEDULER]
    record = request.app[ROUTER].resolve(_model_param(await read_json_object(request)))
    try:
        if pinned:
            scheduler.pin(record)
        else:
            scheduler.unpin(record)
    except ValueError as exc:  # the store no longer has it: deleted since it was routed
        raise NotFound(str(exc), param="model") from exc
    return web.json_response(_version_json(record, request, pinned=pinned))


@routes.get("/admin/events")
async def events(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise BadRequest("limit must be an integer", param="limit") from None
    if not 1 <= limit <= 10_000:
        raise BadRequest("limit must be between 1 and 10000", param="limit")
    model = request.query.get("model")
    try:
        name, version = (None, None) if model is None else split_model_id(model)
        found = request.app[STORE].events(limit=limit, model=name, version=version)
    except ValueError as exc:
        raise BadRequest(str(exc), param="model") from exc
    return web.json_response({"events": [dataclasses.asdict(e) for e in found]})


@routes.get("/admin/why/{model_id}")
async def why(request: web.Request) -> web.Response:
    """Explain, from the event log, why ``model_id`` is (not) resident.

    ``NAME`` means the version the router resolves it to. ``NAME@VERSION`` may also
    name a version no longer registered, as long as the log has events of it.
    """
    router = request.app[ROUTER]
    model_id = request.match_info["model_id"]
    try:
        name, version = split_model_id(model_id)
    except ValueError as exc:
        raise BadRequest(str(exc), param="model") from exc
    if version is None:
        record = router.resolve(model_id)
        model_id, name, version = record.model_id, record.name, record.version
    try:
        history = request.app[STORE].events(limit=WHY_HISTORY, model=name, version=version)
    except ValueError as exc:
        raise BadRequest(str(exc), param="model") from exc
    if not history:
        router.resolve(model_id)  # an unknown version is a 404, not "never loaded"
    return web.json_response(
        {"model": model_id, "explanation": explain(model_id, history, time.time())}
    )


@routes.get("/admin/requests/usage")
async def request_usage(request: web.Request) -> web.Response:
    """The request log added up per model version over the last ``since`` (a duration
    such as ``24h``; without it, every row kept): what ``routerctl usage`` prints."""
    now = time.time()
    window = _since_param(request.query.get("since"))
    since = None if window is None else now - window
    usage = await request.app[REQUEST_LOG].usage(since=since)
    return web.json_response({"since": since, "now": now, "usage": [_usage_json(u) for u in usage]})


def _since_param(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        seconds = parse_duration(text, key="since")
    except ConfigError as exc:
        raise BadRequest(str(exc), param="since") from None
    if seconds < 0:
        raise BadRequest(f"since must not be negative, got {text!r}", param="since")
    return seconds


def _usage_json(usage: RequestUsage) -> dict[str, Any]:
    return {**dataclasses.asdict(usage), "error_rate": usage.error_rate}
