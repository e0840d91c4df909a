"""The HTTP API described as OpenAPI 3.1, served at ``GET /openapi.json``.

Written by hand next to the handlers' own validation (``routerd.api.schemas``), and
kept true by a test that compares its paths and methods with the app's router: a
route added without a description here fails the suite.
"""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from routerd import __version__
from routerd.api.fields import request_schema
from routerd.states import InstanceState

routes = web.RouteTableDef()

_STRING: Final = {"type": "string"}
_INT: Final = {"type": "integer"}
_MODEL_ID: Final = {
    "type": "string",
    "description": "NAME (routed to a version) or NAME@VERSION (that version).",
}

SCHEMAS: Final[dict[str, Any]] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type"],
                "properties": {
                    "message": _STRING,
                    "type": _STRING,
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    },
    "Model": {
        "type": "object",
        "properties": {
            "id": _STRING,
            "object": {"const": "model"},
            "created": _INT,
            "owned_by": _STRING,
            "root": _STRING,
            "versions": {
                "type": "array",
                "items": _STRING,
                "description": "routerd: every version of the name, each servable by its id",
            },
        },
    },
    "ModelList": {
        "type": "object",
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
        },
    },
    "CompletionRequest": request_schema("/v1/completions"),
    "ChatRequest": request_schema("/v1/chat/completions"),
    "EmbeddingRequest": request_schema("/v1/embeddings"),
    "Usage": {
        "type": "object",
        "properties": {"prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT},
    },
    "Completion": {
        "type": "object",
        "description": "A text_completion or chat.completion object; with stream=true, "
        "server-sent events of chunks ending with `data: [DONE]`. A stream that waits for "
        "a load first receives comment lines (`: loading NAME@VERSION 40%`).",
        "properties": {
            "id": _STRING,
            "object": _STRING,
            "created": _INT,
            "model": _STRING,
            "choices": {"type": "array", "items": {"type": "object"}},
            "usage": {"$ref": "#/components/schemas/Usage"},
        },
    },
    "EmbeddingList": {
        "type": "object",
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"type": "object"}},
            "model": _STRING,
            "usage": {"$ref": "#/components/schemas/Usage"},
        },
    },
    "Instance": {
        "type": "object",
        "description": "A resident (or loading) instance, as routerctl shows it.",
        "properties": {
            "model": _STRING,
            "version": _STRING,
            "replica": _INT,
            "backend": _STRING,
            "device": _STRING,
            "state": {
                "enum": [str(state) for state in InstanceState if state is not InstanceState.GONE]
            },
            "bytes": _INT,
            "estimated_bytes": _INT,
            "measured_bytes": {"type": ["integer", "null"]},
            "in_flight": _INT,
            "queued": _INT,
            "pinned": {"type": "boolean"},
            "last_used": {"type": "number"},
            "load_ms": {"type": ["number", "null"]},
            "expires_at": {"type": ["number", "null"]},
            "progress": {
                "type": ["object", "null"],
                "properties": {
                    "phase": {"enum": ["reading weights", "moving to device", "warm-up"]},
                    "done_bytes": _INT,
                    "total_bytes": _INT,
                },
            },
            "load_percent": {"type": ["integer", "null"]},
            "tier": {
                "enum": ["sleep", "host", None],
                "description": "Where its weights rest in the host-RAM tier, if they do.",
            },
            "host_bytes": _INT,
        },
    },
    "LoadedInstance": {
        "description": "POST /admin/load's answer: the instance, and whether it was ready before.",
        "allOf": [
            {"$ref": "#/components/schemas/Instance"},
            {
                "type": "object",
                "properties": {
                    "already_loaded": {
                        "type": "boolean",
                        "description": "ready before this call: load_ms is an earlier load's",
                    }
                },
            },
        ],
    },
    "Status": {
        "type": "object",
        "properties": {
            "devices": {"type": "array", "items": {"type": "object"}},
            "host_tier": {
                "type": "object",
                "description": "The host-RAM tier ([devices] host_cache).",
                "properties": {
                    "capacity_bytes": _INT,
                    "used_bytes": _INT,
                    "models": {"type": "array", "items": _STRING},
                },
            },
            "instances": {"type": "array", "items": {"$ref": "#/components/schemas/Instance"}},
            "leaked": {"type": "array", "items": {"type": "object"}},
            "models": _INT,
            "accepting": {"type": "boolean"},
        },
    },
    "Version": {
        "type": "object",
        "properties": {
            "id": _STRING,
            "name": _STRING,
            "version": _STRING,
            "backend": _STRING,
            "path": _STRING,
            "options": {"type": "object"},
            "source": _STRING,
            "created_at": {"type": "number"},
            "state": _STRING,
            "device": {"type": ["string", "null"]},
            "pinned": {"type": "boolean"},
        },
    },
    "RegisterRequest": {
        "type": "object",
        "required": ["name", "path"],
        "properties": {
            "name": _STRING,
            "version": {"type": "string", "default": "1"},
            "backend": {"type": "string", "default": "transformers"},
            "path": {"type": "string", "description": "an absolute folder path"},
            "options": {"type": "object"},
        },
    },
    "ModelRequest": {
        "type": "object",
        "required": ["model"],
        "properties": {
            "model": _MODEL_ID,
            "device": {"type": "string", "description": "load only: cpu, cuda or cuda:N"},
            "force": {"type": "boolean", "description": "evict only: end live requests"},
            "reprofile": {
                "type": "boolean",
                "description": "load only: measure the footprint anew (409 if resident)",
            },
        },
    },
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    meanings = {
        400: "invalid request (param named)",
        404: "unknown model or not loaded",
        409: "conflicts with the current state (e.g. a rollout in progress)",
        413: "body too large",
        429: "queue full; see Retry-After",
        503: "no capacity, load failed or shutting down; may carry Retry-After",
    }
    return {str(s): _json("Error", meanings[s]) for s in statuses}


def _op(
    summary: str,
    tag: str,
    response: dict[str, Any],
    *,
    body: str | None = None,
    errors: tuple[int, ...] = (),
    parameters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": {"200": response}}
    op["responses"].update(_errors(*errors))
    if body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    if parameters:
        op["parameters"] = parameters
    return op


_PATH_MODEL: Final = [{"name": "model_id", "in": "path", "required": True, "schema": _STRING}]
_SERVED: Final = (
    "Headers: x-routerd-model (NAME@VERSION), x-routerd-device, and "
    "x-routerd-cold-start-ms when the request waited for a load."
)
_INFERENCE_ERRORS: Final = (400, 404, 413, 429, 503)


def _inference(summary: str, response: str, body: str) -> dict[str, Any]:
    """An OpenAI inference route (POST): its answer names what served it, and it fails
    the ways any request that leases a model may."""
    return {
        "post": _op(
            summary, "openai", _json(response, _SERVED), body=body, errors=_INFERENCE_ERRORS
        )
    }


PATHS: Final[dict[str, dict[str, Any]]] = {
    "/v1/models": {
        "get": _op("List servable models, each name once", "openai", _json("ModelList"))
    },
    "/v1/models/{model_id}": {
        "get": _op("One model", "openai", _json("Model"), errors=(404,), parameters=_PATH_MODEL)
    },
    "/v1/completions": _inference(
        "Text completion (stream with stream=true)", "Completion", "CompletionRequest"
    ),
    "/v1/chat/completions": _inference(
        "Chat completion (stream with stream=true)", "Completion", "ChatRequest"
    ),
    "/v1/embeddings": _inference("Embeddings", "EmbeddingList", "EmbeddingRequest"),
    "/health": {
        "get": _op("Liveness: the process and its loop run", "operations", {"description": "OK"})
    },
    "/ready": {
        "get": _op(
            "Readiness: store open, scheduler running, not shutting down",
            "operations",
            {"description": "ready (503 when not)"},
        )
    },
    "/metrics": {
        "get": _op(
            "Prometheus metrics",
            "operations",
            {"description": "text exposition", "content": {"text/plain": {"schema": _STRING}}},
        )
    },
    "/openapi.json": {"get": _op("This document", "operations", {"description": "OpenAPI 3.1"})},
    "/admin/status": {"get": _op("Devices and instances", "admin", _json("Status"))},
    "/admin/models": {
        "get": _op("Registered versions", "admin", {"description": "{models: [Version]}"}),
        "post": _op(
            "Register a version",
            "admin",
            _json("Version", "registered (201)"),
            body="RegisterRequest",
            errors=(400,),
        ),
    },
    "/admin/load": {
        "post": _op(
            "Load and warm up a version now; answers when it is ready. Its progress shows "
            "in /admin/status (instances[].progress, load_percent) meanwhile.",
            "admin",
            _json("LoadedInstance"),
            body="ModelRequest",
            errors=(400, 404, 409, 503),
        )
    },
    "/admin/evict": {
        "post": _op(
            "Drain and unload a version (or every version of NAME)",
            "admin",
            {"description": "{evicted: [Instance]}"},
            body="ModelRequest",
            errors=(400, 404),
        )
    },
    "/admin/pin": {
        "post": _op("Pin a version", "admin", _json("Version"), body="ModelRequest", errors=(404,))
    },
    "/admin/unpin": {
        "post": _op(
            "Unpin a version", "admin", _json("Version"), body="ModelRequest", errors=(404,)
        )
    },
    "/admin/events": {
        "get": _op(
            "Recent loads, evictions and failures, newest first",
            "admin",
            {"description": "{events: [...]}"},
            errors=(400,),
            parameters=[
                {"name": "model", "in": "query", "schema": _MODEL_ID},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "default": 100}},
            ],
        )
    },
    "/admin/requests/usage": {
        "get": _op(
            "The request log added up per model version: requests, errors (5xx and failed "
            "streams), error_rate, rejected (4xx), prompt and completion tokens, cold starts "
            "and mean_waited_ms; model null: requests that reached no model",
            "admin",
            {"description": "{since, now, usage: [{model, version, requests, errors, ...}]}"},
            errors=(400, 503),
            parameters=[
                {
                    "name": "since",
                    "in": "query",
                    "description": 'a duration back from now, e.g. "24h" (default: every row kept)',
                    "schema": _STRING,
                }
            ],
        )
    },
    "/admin/why/{model_id}": {
        "get": _op(
            "Why a version was last loaded or evicted",
            "admin",
            {"description": "{model, explanation}"},
            errors=(404,),
            parameters=_PATH_MODEL,
        )
    },
}

_PATH_NAME: Final = [{"name": "name", "in": "path", "required": True, "schema": _STRING}]
_WEIGHTS_BODY = {
    "type": "object",
    "required": ["weights"],
    "properties": {
        "weights": {
            "type": "object",
            "description": 'version → integer weight ≥ 0, e.g. {"1": 90, "2": 10}',
            "additionalProperties": {"type": "integer", "minimum": 0},
        },
        "reason": _STRING,
    },
}
_SHADOW_BODY = {
    "type": "object",
    "required": ["version"],
    "properties": {
        "version": _STRING,
        "percent": {"type": "number", "minimum": 0, "maximum": 100, "default": 100},
        "reason": _STRING,
    },
}
_ROLLOUT_BODY = {
    "type": "object",
    "required": ["model", "to"],
    "properties": {
        "model": {"type": "string", "description": "the model NAME (no @version)"},
        "to": {"oneOf": [_STRING, _INT]},
        "steps": {"type": "array", "items": {"type": "number"}},
        "interval_s": {"type": "number"},
        "max_error_rate": {"type": "number", "minimum": 0, "maximum": 1},
        "max_p95_ratio": {"type": "number"},
        "min_requests": {"type": "integer"},
        "latency_floor_ms": {"type": "number", "minimum": 0},
    },
}


def _with_body(op: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    return op


_ROUTE: Final = {"description": "{name, explicit, primary, versions, shadow}"}
_ROLLOUT: Final = {"description": "the rollout: {id, name, from, to, status, step, ...}"}
PATHS.update(
    {
        "/admin/routes": {
            "get": _op("Every model's route", "traffic", {"description": "{routes}"})
        },
        "/admin/routes/{name}": {
            "get": _op("A model's route and its history", "traffic", _ROUTE, parameters=_PATH_NAME),
            "put": _with_body(
                _op(
                    "Set weights (a rolling update: new versions load before traffic moves)",
                    "traffic",
                    _ROUTE,
                    errors=(400, 404, 409, 503),
                    parameters=_PATH_NAME,
                ),
                _WEIGHTS_BODY,
            ),
            "delete": _op(
                "Clear the route (the newest version serves)",
                "traffic",
                _ROUTE,
                errors=(404, 409),
                parameters=_PATH_NAME,
            ),
        },
        "/admin/routes/{name}/shadow": {
            "put": _with_body(
                _op(
                    "Mirror a share of requests to a version",
                    "traffic",
                    _ROUTE,
                    errors=(400, 404),
                    parameters=_PATH_NAME,
                ),
                _SHADOW_BODY,
            ),
            "delete": _op(
                "Stop mirroring", "traffic", _ROUTE, errors=(404,), parameters=_PATH_NAME
            ),
        },
        "/admin/traffic": {
            "get": _op(
                "Per-version requests, errors and latency (primary and shadow)",
                "traffic",
                {"description": "{versions, shadow_in_flight, shadow_dropped}"},
            )
        },
        "/admin/rollouts": {
            "get": _op("Rollouts, newest first", "traffic", {"description": "{rollouts}"}),
            "post": _with_body(
                _op(
                    "Start a canary rollout (201)",
                    "traffic",
                    _ROLLOUT,
                    errors=(400, 404, 409, 503),
                ),
                _ROLLOUT_BODY,
            ),
        },
        "/admin/rollouts/{name}": {
            "get": _op(
                "A model's latest rollout",
                "traffic",
                _ROLLOUT,
                errors=(404,),
                parameters=_PATH_NAME,
            )
        },
        "/admin/rollouts/{name}/{action}": {
            "post": _op(
                "pause, resume or abort a rollout",
                "traffic",
                _ROLLOUT,
                errors=(404, 409),
                parameters=[
                    *_PATH_NAME,
                    {
                        "name": "action",
                        "in": "path",
                        "required": True,
                        "schema": {"enum": ["pause", "resume", "abort"]},
                    },
                ],
            )
        },
    }
)


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "routerd",
            "version": __version__,
            "description": "OpenAI-compatible serving of many models from one host, and its "
            "admin API (used by routerctl). Errors use the OpenAI shape.",
        },
        "paths": PATHS,
        "components": {"schemas": SCHEMAS},
    }


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document())
