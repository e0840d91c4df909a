"""The admin API under /admin/, which ``routerctl`` talks to (and nothing else does).

Handlers ask the scheduler and the registry; they never touch instances or SQL
themselves (DESIGN.md rule 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from routerd.api.errors import read_json_object
from routerd.errors import BadRequest, NotFound
from routerd.instance import InstanceSnapshot
from routerd.services import SERVICES, Services
from state import VersionRecord, VersionSpec

routes = web.RouteTableDef()


def _instance_json(snapshot: InstanceSnapshot) -> dict[str, Any]:
    return dataclasses.asdict(snapshot)


def _version_json(record: VersionRecord, services: Services) -> dict[str, Any]:
    resident = services.scheduler.instance(record.model_id)
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
    }


@routes.get("/admin/status")
async def status(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    return web.json_response(
        {
            "devices": [dataclasses.asdict(d) for d in services.scheduler.devices()],
            "instances": [_instance_json(i) for i in services.scheduler.instances()],
            "models": len(services.router.table.versions),
            "accepting": services.accepting,
        }
    )


@routes.get("/admin/models")
async def models(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    return web.json_response(
        {"models": [_version_json(r, services) for r in services.registry.versions()]}
    )


@routes.post("/admin/models")
async def register(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
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
    record = services.registry.register(spec, source="api")
    return web.json_response(_version_json(record, services), status=201)


def _model_param(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model is required (NAME or NAME@VERSION)", param="model")
    return model


@routes.post("/admin/load")
async def load(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    record = services.router.resolve(_model_param(await read_json_object(request)))
    snapshot = await services.scheduler.load(record)
    return web.json_response(_instance_json(snapshot))


@routes.post("/admin/evict")
async def evict(request: web.Request) -> web.Response:
    """Evict ``NAME@VERSION``, or every resident version of ``NAME``."""
    services = request.app[SERVICES]
    model = _model_param(await read_json_object(request))
    if "@" in model:
        targets = [services.router.resolve(model).model_id]
    else:
        if model not in services.router.table.latest:
            services.router.resolve(model)  # raises the 404 in the usual shape
        targets = [
            i.model + "@" + i.version for i in services.scheduler.instances() if i.model == model
        ]
    if not targets or all(services.scheduler.instance(t) is None for t in targets):
        raise NotFound(f"{model} is not loaded", param="model")
    evicted = [
        _instance_json(await services.scheduler.evict(target, reason="admin")) for target in targets
    ]
    return web.json_response({"evicted": evicted})


@routes.get("/admin/events")
async def events(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise BadRequest("limit must be an integer", param="limit") from None
    if not 1 <= limit <= 10_000:
        raise BadRequest("limit must be between 1 and 10000", param="limit")
    found = services.store.events(limit=limit, model=request.query.get("model"))
    return web.json_response({"events": [dataclasses.asdict(e) for e in found]})
