"""Property tests: any body a client may send gets a typed request or a clear 4xx — never
a crash, never a 5xx, and the daemon keeps serving (DESIGN.md rule 7).

Two levels: the parsers (``routerd.api.schemas``) called directly with generated JSON
values, and the real app (middlewares, handlers, scheduler, fake backends) served on
a socket and sent generated bodies over HTTP: every route of its router that may take
a body, the OpenAI ones and the admin ones. The bodies are JSON text written by hand
(``tests.fuzzing``): all of Unicode with lone surrogates, numbers past a double's
range, NaN, nesting 10,000 deep, repeated keys; the fields are those of the request
tables (``routerd.api.fields``) and of the admin bodies in the OpenAPI document, so a
field added there is fuzzed here. Examples are few and unhurried (``deadline=None``)
so the suite stays quick on a shared CI machine.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract.errors import InvalidRequest
from policies.batching import MAX_BATCH_ROWS
from routerd.api import fields
from routerd.api.errors import decode_json_object
from routerd.api.openapi import document
from routerd.api.schemas import (
    MAX_STOP_SEQUENCES,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    parse_chat,
    parse_completion,
    parse_embedding,
)
from routerd.config import ConfigError, parse_duration
from routerd.errors import BadRequest
from routerd.rollout import parse_plan
from routerd.version_options import (
    BATCHING_OPTIONS,
    SCHEDULER_OPTIONS,
    VersionOptions,
    batching_policy,
    normalize,
)
from state.records import check_name
from state.routes import check_percent
from tests.fuzzing import (
    DEEP,
    ENDPOINTS,
    Pairs,
    Route,
    assert_answered_well,
    assert_still_serves,
    body_routes,
    body_schema,
    dump,
    first_path,
    json_values,
    numbers,
    paths,
    texts,
)
from tests.support import ADMIN_AUTH, ServedApp

pytestmark = pytest.mark.slow  # property-based runs of many examples each

# -- generated JSON values ------------------------------------------------------------

FIELDS = sorted(set(fields.COMPLETION) | set(fields.CHAT) | set(fields.EMBEDDING))
"""Every field of the three OpenAI request tables: a new field is fuzzed at once."""

# Plausible values reach deeper into the parsers than random ones alone.
plausible: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["a", "embedder", "a@1", "b", "b@2", "missing", " ", "", "a@"]),
    "prompt": st.one_of(
        texts(max_size=30),
        st.lists(st.integers(-3, 300), max_size=5),
        st.lists(texts(max_size=5), max_size=3),
        st.lists(st.lists(st.integers(0, 255), max_size=3), max_size=3),
    ),
    "messages": st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "robot"])},
            optional={"content": st.one_of(texts(max_size=10), json_values)},
        ),
        max_size=3,
    ),
    "input": st.one_of(texts(max_size=20), st.lists(texts(max_size=5), max_size=3)),
    "max_tokens": st.one_of(st.integers(-2, 100), numbers),
    "n": st.one_of(st.integers(-1, 4), numbers),
    "temperature": st.one_of(st.floats(-1, 3), numbers),
    "top_p": st.one_of(st.floats(-0.5, 1.5), numbers),
    "seed": numbers,
    "stop": st.one_of(texts(max_size=3), st.lists(texts(max_size=3), max_size=6)),
    "stream": st.booleans(),
    "keep_alive": st.one_of(st.sampled_from(["5m", "0", -1, 0, "-2s", "1h", "soon"]), numbers),
    "logit_bias": st.dictionaries(
        st.one_of(st.integers(0, 300).map(str), texts(max_size=4)), numbers, max_size=3
    ),
    # the admin API's fields
    "path": st.sampled_from(["/", "relative/path", "/nonexistent", ""]),
    "version": st.sampled_from(["1", "2", "3", "", "1.0"]),
    "backend": st.sampled_from(["fake", "transformers", "vllm", "nope"]),
    "options": st.dictionaries(
        st.one_of(st.sampled_from(sorted(SCHEDULER_OPTIONS)), texts(max_size=6)),
        st.one_of(json_values, st.sampled_from(["5m", "-1", "cpu", "cuda:0", "round_robin"])),
        max_size=3,
    ),
    "device": st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:1", "CPU", "gpu"]),
    "weights": st.dictionaries(
        st.one_of(st.sampled_from(["1", "2", "3"]), texts(max_size=3)),
        st.one_of(st.integers(-1, 5), numbers),
        max_size=3,
    ),
    "percent": st.one_of(st.floats(0, 100), numbers),
    "to": st.sampled_from(["1", "2", 2, 1, "3", 2.0]),
    "steps": st.one_of(
        st.sampled_from([[5, 25, 50, 100], [100], [50, 20, 100], []]),
        st.lists(numbers, max_size=4),
    ),
}

REGISTERED: str = "fuzz-registered"
"""The only valid name a generated ``POST /admin/models`` registers: the other admin
requests never name it, so no version registered with generated options is ever
loaded (a version that cannot be placed answers 503, rightly: no bad input there)."""


def _valid_name(text: str) -> bool:
    try:
        check_name(text)
    except ValueError:
        return False
    return True


# Names to register: every invalid one, and of the valid ones only REGISTERED.
plausible["name"] = st.one_of(texts().filter(lambda t: not _valid_name(t)), st.just(REGISTERED))


def _value_for(field: str) -> st.SearchStrategy[Any]:
    """A value for ``field``: plausible or of any type (the wrong ones included)."""
    anything = st.one_of(json_values, numbers)
    return st.one_of(plausible[field], anything) if field in plausible else anything


# A valid-looking base, then a few fields set to plausible or arbitrary values: each
# body is wrong in few places, so the checks behind the first one are reached too.
bodies = st.fixed_dictionaries(
    {k: v for k, v in plausible.items() if k in ("model", "prompt", "messages", "input")}
).flatmap(
    lambda base: (
        st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)
        .flatmap(lambda keys: st.fixed_dictionaries({k: _value_for(k) for k in keys}))
        .map(lambda extra: {**base, **extra})
    )
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
APP_FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _loads(body: Any) -> dict[str, Any]:
    """A generated body as the app reads it: as JSON text, decoded by the app's decoder
    (which may refuse it, with a 400, before any parser sees it)."""
    return decode_json_object(dump(body).encode())


def _check_sampling(req: CompletionRequest | ChatRequest) -> None:
    p = req.sampling.params
    assert math.isfinite(p.temperature) and 0 <= p.temperature <= 2
    assert math.isfinite(p.top_p) and 0 < p.top_p <= 1
    max_tokens = req.sampling.max_tokens
    assert max_tokens is None or (isinstance(max_tokens, int) and max_tokens >= 0)
    assert len(p.stop) <= MAX_STOP_SEQUENCES and all(isinstance(x, str) and x for x in p.stop)
    assert p.seed is None or -(2**63) <= p.seed < 2**64
    assert isinstance(req.stream, bool) and isinstance(req.include_usage, bool)


def _check_common(req: CompletionRequest | ChatRequest | EmbeddingRequest) -> None:
    assert isinstance(req.model, str) and req.model.strip() == req.model and req.model
    assert req.keep_alive is None or (req.keep_alive >= 0 and not math.isnan(req.keep_alive))
    assert all(isinstance(name, str) for name in req.ignored)


def _check_prompts(prompts: list[Any]) -> None:
    assert prompts
    for p in prompts:
        assert isinstance(p, str) or (
            p and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p)
        )


def _refused_cleanly(exc: BadRequest) -> None:
    assert exc.status == 400 and exc.message
    assert exc.param is None or isinstance(exc.param, str)


# -- the parsers --------------------------------------------------------------------


@FUZZ
@given(bodies)
def test_completion_parser_returns_a_valid_request_or_a_400(body):
    try:
        req = parse_completion(_loads(body))
    except BadRequest as exc:
        _refused_cleanly(exc)
        return
    _check_common(req)
    _check_sampling(req)
    _check_prompts(req.prompts)


@FUZZ
@given(bodies)
def test_chat_parser_returns_a_valid_request_or_a_400(body):
    try:
        req = parse_chat(_loads(body))
    except BadRequest as exc:
        _refused_cleanly(exc)
        return
    _check_common(req)
    _check_sampling(req)
    assert req.messages and all(
        set(m) == {"role", "content"} and isinstance(m["content"], str) for m in req.messages
    )


@FUZZ
@given(bodies)
def test_embedding_parser_returns_a_valid_request_or_a_400(body):
    try:
        req = parse_embedding(_loads(body))
    except BadRequest as exc:
        _refused_cleanly(exc)
        return
    _check_common(req)
    _check_prompts(req.inputs)
    assert req.encoding_format in ("float", "base64")


NUMBER_FIELDS = ["temperature", "top_p", "keep_alive", "max_tokens", "seed", "n", "top_k"]


@FUZZ
@given(
    field=st.sampled_from(NUMBER_FIELDS),
    value=st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**80), 2**80),
)
def test_numbers_out_of_every_range_are_refused(field, value):
    """NaN and infinities pass naive range checks (every comparison with NaN is false)."""
    completion = {"model": "a", "prompt": "x"}
    chat = {"model": "a", "messages": [{"role": "user", "content": "x"}]}
    for parse, body in ((parse_completion, completion), (parse_chat, chat)):
        try:
            req = parse({**body, field: value})
        except BadRequest as exc:
            assert exc.param == field
            continue
        _check_common(req)
        _check_sampling(req)


PAST_A_DOUBLE: dict[str, Any] = {
    "temperature": 10**400,
    "top_p": 10**400,
    "min_p": -(10**400),
    "presence_penalty": 10**400,
    "logit_bias": {"1": 10**400},
}


@pytest.mark.parametrize("field", sorted(PAST_A_DOUBLE))
def test_integers_past_a_double_are_refused_by_the_parsers(field):
    with pytest.raises(BadRequest) as caught:
        parse_completion({"model": "a", "prompt": "x", field: PAST_A_DOUBLE[field]})
    assert caught.value.param == field


# -- what the admin API checks ---------------------------------------------------------

# Python values a JSON body may hold, integers of any size among them (the app refuses
# those past a double's range as it reads a body; these checks must not need that).
odd_values: st.SearchStrategy[Any] = st.one_of(
    st.integers(-(2**1100), 2**1100),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    st.booleans(),
    texts(max_size=6),
    st.sampled_from(["5m", "-1", "1h30m", "9" * 400, "-" + "9" * 400 + "d", "0"]),
    st.lists(st.integers(-5, 200) | st.floats(), max_size=3),
    st.dictionaries(texts(max_size=3), st.integers(), max_size=2),
)


@FUZZ
@given(key=st.sampled_from(sorted(SCHEDULER_OPTIONS)), value=odd_values)
def test_version_options_are_normalized_or_refused(key, value):
    """``POST /admin/models``: routerd's own options (``options.keep_alive``, the
    batching policy's...) give a 400 naming the option, or options it can read."""
    try:
        normalized = normalize({key: value})
    except InvalidRequest as exc:
        assert exc.param is not None and exc.param.startswith("options.")
        return
    options = VersionOptions.of(normalized)
    if key in BATCHING_OPTIONS:
        policy = batching_policy(normalized, "cpu")
        assert isinstance(policy.max_rows, int) and 1 <= policy.max_rows <= MAX_BATCH_ROWS
    assert options.keep_alive is None or options.keep_alive >= 0


@FUZZ
@given(
    key=st.sampled_from(["steps", "interval_s", "max_error_rate", "max_p95_ratio",
                         "min_requests", "latency_floor_ms"]),
    value=odd_values,
    listed=st.booleans(),
)  # fmt: skip
def test_rollout_plans_are_valid_or_a_400(key, value, listed):
    """``POST /admin/rollouts``: a plan, or a 400."""
    try:
        plan = parse_plan({key: [value] if listed else value})
    except BadRequest as exc:
        _refused_cleanly(exc)
        return
    assert plan.steps[-1] == 100 and math.isfinite(plan.interval_s)


@FUZZ
@given(value=odd_values)
def test_shadow_percent_and_durations_are_numbers_or_refused(value):
    """``PUT /admin/routes/{name}/shadow``'s percent; a duration (``keep_alive``,
    ``since``): a finite number, or a ValueError the handlers turn into a 400."""
    try:
        percent = check_percent(value)
    except ValueError:
        pass
    else:
        assert 0 < percent <= 100
    try:
        seconds = parse_duration(value, key="since")
    except ConfigError:
        pass
    else:
        assert math.isfinite(seconds)


# -- the real app over HTTP -----------------------------------------------------------

BODY_LIMIT = 256 * 1024
"""The served app's ``server.max_body_bytes``: small, so that going past it is cheap."""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedApp]:
    with ServedApp(tmp_path_factory.mktemp("fuzz"), max_body_bytes=BODY_LIMIT) as running:
        yield running


OPENAI_BODIES: dict[str, dict[str, Any]] = {
    "/v1/completions": {"model": "a", "prompt": "hi", "max_tokens": 2},
    "/v1/chat/completions": {
        "model": "a",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
    },
    "/v1/embeddings": {"model": "embedder", "input": "hi"},
}


def _valid_bodies(tmp: Path) -> dict[Route, dict[str, Any]]:
    """A body each route accepts, for the served models: generated fields replace some
    of its own, so that a body is wrong in few places."""
    return {
        **{Route("POST", path): body for path, body in OPENAI_BODIES.items()},
        Route("POST", "/admin/models"): {
            "name": REGISTERED,
            "path": str(tmp / "models" / "b-2"),
            "backend": "fake",
        },
        Route("POST", "/admin/load"): {"model": "b@2"},
        Route("POST", "/admin/evict"): {"model": "b@2"},
        Route("POST", "/admin/pin"): {"model": "b"},
        Route("POST", "/admin/unpin"): {"model": "b"},
        Route("PUT", "/admin/routes/{name}"): {"weights": {"1": 1}},
        Route("PUT", "/admin/routes/{name}/shadow"): {"version": "1", "percent": 50},
        Route("POST", "/admin/rollouts"): {"model": "b", "to": "2", "interval_s": 3600},
    }


def _bodies(route: Route, base: dict[str, Any]) -> st.SearchStrategy[str]:
    """JSON text for ``route``: ``base`` less at most one of its fields, then generated
    fields (mostly known names, else any over all of Unicode) with plausible or
    arbitrary values."""
    names = route.field_names()
    anything = texts()
    keys = st.one_of(*[st.sampled_from(names)] * 3, anything) if names else anything
    pairs = st.lists(keys.flatmap(lambda k: st.tuples(st.just(k), _value_for(k))), max_size=4)
    dropped = st.sampled_from([None] * 4 + sorted(base))
    return st.tuples(dropped, pairs).map(
        lambda drawn: dump(
            Pairs(tuple((k, v) for k, v in base.items() if k != drawn[0]) + tuple(drawn[1]))
        )
    )


def _fuzz_then_serve(served: ServedApp, run: Callable[[], None]) -> None:
    """Run a property test against ``served``, then check it still serves."""
    run()
    assert_still_serves(served)


def test_the_fuzzed_routes_are_every_route_that_takes_a_body(served):
    assert served.app is not None
    routes = body_routes(served.app)
    described = {
        Route(method.upper(), path)
        for path, ops in document()["paths"].items()
        for method, op in ops.items()
        if "requestBody" in op
    }
    assert described <= set(routes), "a route with a body in /openapi.json is not fuzzed"
    assert {Route("POST", e) for e in ENDPOINTS} <= set(routes)
    assert set(_valid_bodies(served.tmp)) <= described, "a valid body for no route"


def test_every_route_answers_generated_bodies_without_5xx(served):
    assert served.app is not None
    valid = _valid_bodies(served.tmp)
    cases = st.sampled_from(body_routes(served.app)).flatmap(
        lambda route: st.tuples(st.just(route), paths(route), _bodies(route, valid.get(route, {})))
    )

    @settings(APP_FUZZ, max_examples=250)
    @given(case=cases)
    def fuzz(case: tuple[Route, str, str]) -> None:
        route, path, text = case
        raw = text.encode()  # ASCII: dump escapes everything else
        assert_answered_well(*served.send(route.method, path, raw, ADMIN_AUTH))

    _fuzz_then_serve(served, fuzz)


def _malformed(route: Route) -> st.SearchStrategy[bytes]:
    """Bodies no route can take: not an object, empty, not UTF-8, nested too deeply."""
    names = route.field_names() or ["model"]
    field = st.sampled_from(names)
    return st.one_of(
        st.sampled_from([b"", b" ", b"null", b"[]", b'"{}"', b"1e309", b"NaN", b"{", b"}"]),
        json_values.map(lambda v: dump([v]).encode()),  # an array, never an object
        st.binary(max_size=200),
        st.binary(min_size=1, max_size=8).map(lambda b: b'{"model": "' + b + b'"}'),
        st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]).map(
            lambda bad: b'{"model": "a", "prompt": "' + bad + b'"}'  # invalid UTF-8
        ),
        st.just(b'\xef\xbb\xbf{"model": "a"}'),  # a byte order mark
        st.sampled_from(DEEP).map(lambda deep: dump(deep).encode()),
        st.tuples(field, st.sampled_from(DEEP)).map(
            lambda fd: dump(Pairs(((fd[0], fd[1]),))).encode()
        ),
    )


def test_every_route_answers_malformed_bodies_without_5xx(served):
    assert served.app is not None
    cases = st.sampled_from(body_routes(served.app)).flatmap(
        lambda route: st.tuples(st.just(route), paths(route), _malformed(route))
    )

    @settings(APP_FUZZ, max_examples=150)
    @given(case=cases)
    def fuzz(case: tuple[Route, str, bytes]) -> None:
        route, path, raw = case
        assert_answered_well(*served.send(route.method, path, raw, ADMIN_AUTH))

    _fuzz_then_serve(served, fuzz)


def test_deep_nesting_is_a_400_on_every_route_that_reads_a_body(served):
    assert served.app is not None
    for route in body_routes(served.app):
        if not body_schema(route.method, route.path):
            continue  # it reads no body
        path = first_path(route)
        for deep in DEEP:
            status, headers, payload = served.send(
                route.method, path, deep.text.encode(), ADMIN_AUTH
            )
            assert_answered_well(status, headers, payload)
            assert status == 400, (route, payload)
    assert_still_serves(served)


def test_bodies_over_the_limit_are_413_on_every_route_that_reads_a_body(served):
    assert served.app is not None
    over = b'{"model": "a", "prompt": "' + b"x" * BODY_LIMIT + b'"}'
    for route in body_routes(served.app):
        status, headers, payload = served.send(route.method, first_path(route), over, ADMIN_AUTH)
        assert_answered_well(status, headers, payload)
        if body_schema(route.method, route.path):
            assert status == 413, (route, payload[:300])
            assert json.loads(payload)["error"]["code"] == "request_too_large"
    assert_still_serves(served)


@APP_FUZZ
@given(endpoint=st.sampled_from(ENDPOINTS), body=bodies)
def test_the_app_answers_generated_json_without_5xx(served, endpoint, body):
    assert_answered_well(*served.send("POST", endpoint, dump(body).encode()))


@settings(max_examples=60, deadline=None)
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    raw=st.one_of(
        st.binary(max_size=200),
        st.integers(1, 50_000).map(lambda depth: b"[" * depth + b"]" * depth),
        st.integers(1, 50_000).map(lambda depth: b'{"model": ' + b"[" * depth),
    ),
)
def test_the_app_answers_raw_bytes_without_5xx(served, endpoint, raw):
    assert_answered_well(*served.send("POST", endpoint, raw))


# -- unknown fields: ignored, and named in an ASCII header ------------------------------

LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # once decoded: a pair is one character


def test_unknown_fields_are_named_in_an_ascii_header(served):
    unknown = texts(max_size=80).filter(lambda k: k not in FIELDS)

    @APP_FUZZ
    @given(
        endpoint=st.sampled_from(ENDPOINTS),
        keys=st.lists(unknown, min_size=1, max_size=40, unique=True),
        stream=st.booleans(),
    )
    def fuzz(endpoint: str, keys: list[str], stream: bool) -> None:
        body = dict(OPENAI_BODIES[endpoint])
        if stream and endpoint != "/v1/embeddings":
            body["stream"] = True
        text = dump(Pairs((*body.items(), *((k, 1) for k in keys))))
        status, headers, payload = served.send("POST", endpoint, text.encode())
        assert_answered_well(status, headers, payload)
        if any(LONE_SURROGATE.search(json.loads(dump(k))) for k in keys):
            assert status == 400  # not Unicode text: refused as the body is read
        else:
            assert status == 200, payload[:300]
            assert headers["x-routerd-ignored-fields"] is not None

    _fuzz_then_serve(served, fuzz)


@pytest.mark.parametrize("key", ["a\r\nb", "\x00", "x\ty\x1f", "\x7f"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_control_character_in_an_unknown_field_breaks_nothing(served, endpoint, key):
    text = dump(Pairs((*OPENAI_BODIES[endpoint].items(), (key, 1))))
    try:
        assert_answered_well(*served.send("POST", endpoint, text.encode()))
    finally:
        assert_still_serves(served)


def test_the_app_still_serves_after_the_fuzzing(served):
    assert_still_serves(served)
