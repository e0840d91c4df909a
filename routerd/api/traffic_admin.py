"""Admin API for traffic: routes, shadows, rollouts and per-version metrics.

``routerctl route`` and ``routerctl rollout`` talk to these. Route changes go through
the RouteManager (a rolling update: versions gaining traffic load first), rollouts
through the RolloutController; handlers only validate and render.

- ``GET /admin/routes``, ``GET /admin/routes/{name}`` (with its history)
- ``PUT /admin/routes/{name}`` ``{"weights": {"1": 90, "2": 10}}``;
  ``DELETE /admin/routes/{name}`` (back to the newest version)
- ``PUT /admin/routes/{name}/shadow`` ``{"version": "3", "percent": 20}``;
  ``DELETE /admin/routes/{name}/shadow``
- ``GET /admin/traffic``: per-version requests, errors, latency (primary, shadow)
- ``POST /admin/rollouts`` ``{"model", "to", "steps", "interval_s", "max_error_rate",
  "max_p95_ratio", "min_requests"}``; ``GET /admin/rollouts``;
  ``GET /admin/rollouts/{name}``; ``POST /admin/rollouts/{name}/{pause|resume|abort}``
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from routerd.api.errors import read_json_object
from routerd.api.keys import ROLLOUTS, ROUTER, ROUTES, SCHEDULER, SHADOWS, STATS, STORE
from routerd.errors import BadRequest, Conflict, NotFound
from routerd.rollout import parse_plan
from state import Store
from state.records import check_name

routes = web.RouteTableDef()

HISTORY_LIMIT = 50


def route_json(request: web.Request, name: str) -> dict[str, Any]:
    """A model's route as routerctl shows it: every version with its weight and share."""
    stored = request.app[ROUTES].current(name)
    table = request.app[ROUTER].table
    versions = sorted(
        (r for r in table.versions.values() if r.name == name), key=lambda r: r.created_at
    )
    live_route = table.routes.get(name)
    weights = dict(live_route.weights) if live_route is not None else {}
    if not weights:
        weights = {table.latest[name].version: 1}
    total = sum(weights.values())
    rows = []
    for record in versions:
        weight = weights.get(record.version, 0)
        resident = request.app[SCHEDULER].instance(record.model_id)
        rows.append(
            {
                "version": record.version,
                "weight": stored.weights.get(record.version, 0) if stored.explicit else None,
                "share": round(100.0 * weight / total, 3),
                "state": record.state,
                "instance": resident.state if resident else "unloaded",
            }
        )
    shadow = stored.shadow
    return {
        "name": name,
        "explicit": stored.explicit,
        "primary": table.latest[name].model_id,
        "versions": rows,
        "shadow": None if shadow is None else dataclasses.asdict(shadow),
    }


def _model_name(request: web.Request) -> str:
    """The ``{name}`` of the path, or 404: no model can have a name that is not valid."""
    name = request.match_info["name"]
    try:
        return check_name(name)
    except ValueError as exc:
        raise NotFound(f"no model named {name!r}: {exc}", param="model") from None


@routes.get("/admin/routes")
async def list_routes(request: web.Request) -> web.Response:
    names = sorted(request.app[ROUTER].table.latest)
    return web.json_response({"routes": [route_json(request, n) for n in names]})


@routes.get("/admin/routes/{name}")
async def get_route(request: web.Request) -> web.Response:
    name = _model_name(request)
    body = route_json(request, name)
    body["history"] = [
        dataclasses.asdict(change)
        for change in request.app[STORE].route_history(name, limit=HISTORY_LIMIT)
    ]
    return web.json_response(body)


@routes.put("/admin/routes/{name}")
async def set_route(request: web.Request) -> web.Response:
    name = _model_name(request)
    body = await read_json_object(request)
    weights = body.get("weights")
    if not isinstance(weights, dict) or not weights:
        raise BadRequest(
            'weights is required: an object of version → integer weight, e.g. {"1": 90, "2": 10}',
            param="weights",
        )
    for version, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise BadRequest(
                f"weight of version {version} must be an integer ≥ 0, got {weight!r}",
                param="weights",
            )
    if sum(weights.values()) <= 0:
        raise BadRequest("at least one weight must be above 0", param="weights")
    _no_live_rollout(request.app[STORE], name)
    await request.app[ROUTES].set_route(name, weights, reason=_reason(body))
    return web.json_response(route_json(request, name))


@routes.delete("/admin/routes/{name}")
async def clear_route(request: web.Request) -> web.Response:
    name = _model_name(request)
    _no_live_rollout(request.app[STORE], name)
    await request.app[ROUTES].clear_route(name)
    return web.json_response(route_json(request, name))


@routes.put("/admin/routes/{name}/shadow")
async def set_shadow(request: web.Request) -> web.Response:
    route_manager = request.app[ROUTES]
    name = _model_name(request)
    body = await read_json_object(request)
    version = body.get("version")
    if not isinstance(version, str) or not version:
        raise BadRequest("version is required and must be a string", param="version")
    percent = body.get("percent", 100)
    if isinstance(percent, bool) or not isinstance(percent, int | float):
        raise BadRequest(f"percent must be a number, got {percent!r}", param="percent")
    route_manager.current(name)
    route_manager.set_shadow(name, version, percent, reason=_reason(body))
    return web.json_response(route_json(request, name))


@routes.delete("/admin/routes/{name}/shadow")
async def clear_shadow(request: web.Request) -> web.Response:
    name = _model_name(request)
    request.app[ROUTES].clear_shadow(name)
    return web.json_response(route_json(request, name))


@routes.get("/admin/traffic")
async def traffic(request: web.Request) -> web.Response:
    shadows = request.app[SHADOWS]
    return web.json_response(
        {
            "versions": request.app[STATS].snapshot(),
            "shadow_in_flight": shadows.in_flight,
            "shadow_dropped": shadows.dropped,
        }
    )


@routes.post("/admin/rollouts")
async def start_rollout(request: web.Request) -> web.Response:
    rollouts = request.app[ROLLOUTS]
    body = await read_json_object(request)
    name = body.get("model")
    if not isinstance(name, str) or not name or "@" in name:
        raise BadRequest("model is required: the model NAME (no @version)", param="model")
    to = body.get("to")
    if isinstance(to, int) and not isinstance(to, bool):
        to = str(to)
    if not isinstance(to, str) or not to:
        raise BadRequest("to is required: the version to roll out", param="to")
    plan = parse_plan(body)
    rollout = await rollouts.begin(name, to, plan)
    return web.json_response(rollouts.describe(rollout, log=True), status=201)


@routes.get("/admin/rollouts")
async def list_rollouts(request: web.Request) -> web.Response:
    return web.json_response({"rollouts": request.app[ROLLOUTS].list()})


@routes.get("/admin/rollouts/{name}")
async def rollout_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[ROLLOUTS].status(_model_name(request)))


@routes.post("/admin/rollouts/{name}/{action}")
async def rollout_action(request: web.Request) -> web.Response:
    name, action = _model_name(request), request.match_info["action"]
    controller = request.app[ROLLOUTS]
    if action == "pause":
        rollout = await controller.pause(name)
    elif action == "resume":
        rollout = await controller.resume(name)
    elif action == "abort":
        rollout = await controller.abort(name)
    else:
        raise NotFound(f"unknown rollout action {action!r}: pause, resume or abort", param=None)
    return web.json_response(controller.describe(rollout, log=True))


def _no_live_rollout(store: Store, name: str) -> None:
    if store.rollouts(name=name, live=True, limit=1):
        raise Conflict(
            f"a rollout of {name} is in progress; pause it and abort it "
            f"(routerctl rollout abort {name}) before changing the route by hand",
            param="model",
        )


def _reason(body: dict[str, Any]) -> str:
    reason = body.get("reason", "manual")
    if not isinstance(reason, str) or not reason.strip():
        raise BadRequest("reason must be a non-empty string", param="reason")
    return reason
