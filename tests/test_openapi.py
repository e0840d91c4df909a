"""/openapi.json describes every route the app serves, and nothing it does not."""

from __future__ import annotations

from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from routerd.app import build_app
from tests.fakes import FakeBackend
from tests.support import fake_services


async def test_every_route_is_described(tmp_path: Path) -> None:
    app = build_app(fake_services(tmp_path, FakeBackend()))
    served = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None and route.method not in ("HEAD", "OPTIONS")
    }
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/openapi.json")
        assert response.status == 200
        document = await response.json()
    described = {(path, method) for path, ops in document["paths"].items() for method in ops}
    assert served - described == set(), "routes missing from /openapi.json"
    assert described - served == set(), "/openapi.json describes routes that do not exist"
    assert document["openapi"].startswith("3.")
    assert ("/metrics", "get") in served and ("/openapi.json", "get") in served


async def test_references_resolve(tmp_path: Path) -> None:
    from routerd.api.openapi import document

    doc = document()
    schemas = doc["components"]["schemas"]

    def refs(node: object) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if "$ref" in node else []
            return found + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["summary"] and "200" in op["responses"], (path, method)


def test_max_completion_tokens_is_described_where_the_parsers_read_it() -> None:
    from routerd.api.openapi import SCHEMAS

    assert "max_completion_tokens" in SCHEMAS["ChatRequest"]["properties"]
    assert "max_completion_tokens" not in SCHEMAS["CompletionRequest"]["properties"]
    assert "max_tokens" in SCHEMAS["CompletionRequest"]["properties"]


def test_request_bodies_list_exactly_the_fields_the_parsers_know() -> None:
    from routerd.api.openapi import SCHEMAS
    from routerd.api.schemas import CHAT_FIELDS, COMPLETION_FIELDS, EMBEDDING_FIELDS

    documented = {
        name: set(SCHEMAS[name]["properties"])
        for name in ("CompletionRequest", "ChatRequest", "EmbeddingRequest")
    }
    # max_completion_tokens is known to completions only to refuse it with a pointer to
    # max_tokens, so the document leaves it out there.
    assert documented["CompletionRequest"] == COMPLETION_FIELDS - {"max_completion_tokens"}
    assert documented["ChatRequest"] == CHAT_FIELDS
    assert documented["EmbeddingRequest"] == EMBEDDING_FIELDS
    for name in documented:  # fields in neither schema are ignored, not refused
        assert "additionalProperties" not in SCHEMAS[name]
