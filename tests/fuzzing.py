"""JSON text for fuzz tests, the routes it goes to, and what every answer must be.

The text is written by hand so that it can hold what a client may send but Python's
``json.dumps`` would not write from ordinary values:

- Strings come from all of Unicode, lone surrogates included: ``json.dumps`` (ASCII
  output) writes a lone surrogate as the escape ``"\\ud800"``, which JSON's grammar
  allows and no UTF-8 can carry.
- Numbers include literals no Python float or small int gives: ``1e309``, an integer
  of 1000 bits, ``-0.0``, ``NaN`` and ``Infinity`` (``Raw``).
- Objects may repeat a key (``Pairs``); a JSON decoder keeps the last one.
- ``DEEP`` is nesting 10,000 levels deep, which Python's ``json`` cannot decode
  (RecursionError).

The routes are read from the app's router (``body_routes``), their fields from the
OpenAI request tables (``routerd.api.fields``) or the OpenAPI document's bodies.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from hypothesis import strategies as st

from routerd.api import fields
from routerd.api.openapi import document
from tests.support import ServedApp


@dataclass(frozen=True)
class Raw:
    """JSON text written as it is."""

    text: str


@dataclass(frozen=True)
class Pairs:
    """A JSON object as its key/value pairs, in order; a key may come twice."""

    items: tuple[tuple[str, Any], ...]


def dump(value: Any) -> str:
    """``value`` as JSON text: ASCII, lone surrogates as escapes, ``Raw`` as it is."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Pairs | dict):
        items = value.items if isinstance(value, Pairs) else tuple(value.items())
        return "{" + ", ".join(f"{json.dumps(k)}: {dump(v)}" for k, v in items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(dump(v) for v in value) + "]"
    return json.dumps(value, allow_nan=True)  # NaN and Infinity as the literals


# -- strings ------------------------------------------------------------------------

SURROGATES = ("\ud800", "\udfff", "\udbff", "\udc00")
"""Lone surrogates: JSON text can escape them, no UTF-8 can encode them."""

ODD_CHARACTERS = (
    "\x00",
    "\n",
    "\r",
    "\x7f",
    "\u2028",  # a line separator: valid in JSON strings, not in JavaScript's
    "\ufeff",  # a byte order mark
    "\uffff",  # a noncharacter
    "\U0010ffff",
    "\U0001f600",  # beyond the BMP: a surrogate pair once escaped
    "\\",
    '"',
    "@",
    ",",
)
"""Characters that break careless code."""

ANY_CHARACTER = st.characters(min_codepoint=0, max_codepoint=sys.maxunicode, exclude_categories=())
"""Every code point, surrogates (category Cs) included (though they come rarely)."""
CONTROL = frozenset(map(chr, [*range(0x20), 0x7F]))


def texts(*, max_size: int = 12) -> st.SearchStrategy[str]:
    """Strings over all of Unicode; one in four may hold lone surrogates, so that the
    others reach the checks behind the one that refuses those."""

    def strings(*odd: str) -> st.SearchStrategy[str]:
        # A list of characters joined: hypothesis' text() would merge the alphabets
        # into one that leaves the sampled surrogates out.
        alphabet = st.one_of(ANY_CHARACTER, st.sampled_from(odd))
        return st.lists(alphabet, max_size=max_size).map("".join)

    plain = strings(*ODD_CHARACTERS)
    return st.one_of(plain, plain, plain, strings(*ODD_CHARACTERS, *SURROGATES))


# -- numbers ------------------------------------------------------------------------

NUMBER_LITERALS = (
    "1e308",
    "-1e308",
    "1e309",  # a double's range ends near 1.8e308: this is inf once read
    "-1e309",
    "1E400",
    "2.5e-400",  # 0 once read
    "4.9e-324",
    "-0.0",
    "-0",
    "0",
    "-1",
    "1.5",
    "101",
    "NaN",
    "Infinity",
    "-Infinity",
    str(2**1000),
    str(-(2**1000)),
    str(2**63),
    str(2**64),
    str(-(2**63) - 1),
    str(int(sys.float_info.max)),  # the largest integer a double holds
    str(int(sys.float_info.max) * 10),  # one digit more: beyond any double
    "1" + "0" * 400,
    "9" * 5000,  # past Python's limit on the digits of an int read from text
)

numbers: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(NUMBER_LITERALS).map(Raw),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
)

# -- any JSON -----------------------------------------------------------------------

scalars: st.SearchStrategy[Any] = st.one_of(st.none(), st.booleans(), numbers, texts())

json_values: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(texts(max_size=6), inner, max_size=4),
        st.lists(st.tuples(texts(max_size=6), inner), max_size=4).map(
            lambda items: Pairs(tuple(items))
        ),
    ),
    max_leaves=8,
)
"""Any JSON value: what a field of the wrong type holds."""

DEPTH = 10_000
DEEP = (
    Raw("[" * DEPTH + "]" * DEPTH),
    Raw('{"a": ' * DEPTH + "1" + "}" * DEPTH),
    Raw("[" * DEPTH),  # deep and unfinished
)


# -- routes -------------------------------------------------------------------------

OPENAI_TABLES: dict[str, Mapping[str, fields.Field]] = {
    "/v1/completions": fields.COMPLETION,
    "/v1/chat/completions": fields.CHAT,
    "/v1/embeddings": fields.EMBEDDING,
}
ENDPOINTS = list(OPENAI_TABLES)


@dataclass(frozen=True)
class Route:
    """A route of the app that may take a body; ``path`` is its canonical one."""

    method: str
    path: str

    @property
    def openai(self) -> bool:
        return self.path in OPENAI_TABLES

    def field_names(self) -> list[str]:
        """The body's fields: the OpenAI request table, or the OpenAPI document's."""
        if self.openai:
            return sorted(OPENAI_TABLES[self.path])
        return sorted(body_schema(self.method, self.path).get("properties", {}))


DOCUMENT = document()


def body_schema(method: str, path: str) -> dict[str, Any]:
    """The JSON schema of a route's body in /openapi.json; {} where it describes none."""
    doc = DOCUMENT
    op = doc["paths"].get(path, {}).get(method.lower(), {})
    schema: dict[str, Any] = (
        op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
    )
    if "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def body_routes(app: web.Application) -> list[Route]:
    """Every route of ``app`` whose method may carry a body, from its router."""
    found = {
        Route(route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method in ("POST", "PUT", "PATCH", "DELETE")
    }
    return sorted(found, key=lambda r: (r.path, r.method))


PATH_VALUES: dict[str, list[str]] = {
    "name": ["a", "b"],
    "model_id": ["a", "b@2"],
    "action": ["pause", "resume", "abort"],
}


def paths(route: Route) -> st.SearchStrategy[str]:
    """``route``'s path with each ``{param}`` filled in by a served model (or action)."""
    params = re.findall(r"\{(\w+)\}", route.path)
    values = st.fixed_dictionaries({p: st.sampled_from(PATH_VALUES.get(p, ["a"])) for p in params})
    return values.map(lambda v: re.sub(r"\{(\w+)\}", lambda m: v[m.group(1)], route.path))


def first_path(route: Route) -> str:
    """``route``'s path with each ``{param}`` filled in by the first of its values."""
    return re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES.get(m.group(1), ["a"])[0], route.path)


# -- answers ------------------------------------------------------------------------


class Headers(Protocol):
    """Response headers as ``http.client`` or ``requests`` hold them."""

    def get(self, name: str, default: Any = None) -> Any: ...


def assert_answered_well(status: int, headers: Headers, payload: bytes) -> None:
    """Below 500 (DESIGN.md rule 7); an error in the OpenAI shape; headers a client can
    read; no stream that answered 200 and then ended with a server error."""
    assert status < 500, payload[:500]
    ignored = headers.get("x-routerd-ignored-fields")
    if ignored is not None:  # read as latin-1: anything else would not have arrived
        assert ignored.isascii() and not CONTROL.intersection(ignored), ignored
    kind = headers.get("Content-Type", "")
    if status >= 400:
        assert kind.startswith("application/json"), kind
        body = json.loads(payload)
        assert set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str) and error["type"] != "server_error"
        assert error["param"] is None or isinstance(error["param"], str)
        assert error["code"] is None or isinstance(error["code"], str)
    elif kind.startswith("text/event-stream"):
        for error in _stream_errors(payload):
            assert error["type"] != "server_error", error
    elif kind.startswith("application/json"):
        json.loads(payload)


def _stream_errors(payload: bytes) -> list[dict[str, Any]]:
    """The error events of a stream."""
    events = [
        json.loads(line[len(b"data: ") :])
        for line in payload.split(b"\n")
        if line.startswith(b"data: ") and line != b"data: [DONE]"
    ]
    return [e["error"] for e in events if "error" in e]


def assert_still_serves(served: ServedApp) -> None:
    """A good request to ``served`` is answered as ever (model ``a`` reverses its prompt)."""
    raw = json.dumps({"model": "a", "prompt": "ok", "max_tokens": 2}).encode()
    status, payload = served.post("/v1/completions", raw)
    assert status == 200, payload
    assert json.loads(payload)["choices"][0]["text"] == "ko"
