"""The whole HTTP API fuzzed from its own OpenAPI document (``GET /openapi.json``).

schemathesis generates requests for every operation the document describes — the
OpenAI ones, the operations ones and the admin ones — valid ones and ones that break
the schema, and sends them to the real app (middlewares, handlers, scheduler, admin
API with its token, fake backends) on a loopback port. Whatever arrives, the answer
is never a 5xx, an error comes in the OpenAI shape, and the daemon still serves
afterwards. Examples per operation are few, so the suite stays quick on a shared CI
machine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from multidict import CIMultiDict

from routerd.api.openapi import document
from tests.fuzzing import assert_answered_well, assert_still_serves
from tests.support import ADMIN_AUTH, ServedApp

pytestmark = pytest.mark.slow  # property-based runs of many examples each

schema = schemathesis.openapi.from_dict(document())

OPERATIONS = {(method.upper(), path) for path, ops in document()["paths"].items() for method in ops}
called: set[tuple[str, str]] = set()  # the operations the run below sent requests to


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedApp]:
    with ServedApp(tmp_path_factory.mktemp("schemathesis")) as running:
        yield running


def test_the_run_covers_every_operation_the_app_describes(served: ServedApp) -> None:
    status, _, body = served.send("GET", "/openapi.json", b"")
    assert status == 200
    assert json.loads(body) == json.loads(json.dumps(document()))  # as served
    operations = {(op.method.upper(), op.path) for op in _operations()}
    assert operations == OPERATIONS
    assert any(path.startswith("/admin/") for _, path in operations)


def _operations() -> list[schemathesis.APIOperation]:
    return [result.ok() for result in schema.get_all_operations()]


@schema.parametrize()
@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_no_operation_answers_5xx(case: schemathesis.Case, served: ServedApp) -> None:
    called.add((case.operation.method.upper(), case.operation.path))
    response = case.call(base_url=f"http://127.0.0.1:{served.port}", headers=ADMIN_AUTH)
    headers = CIMultiDict((k, v) for k, values in response.headers.items() for v in values)
    assert_answered_well(response.status_code, headers, response.content)


def test_every_operation_was_called() -> None:
    if not called:
        pytest.skip("the operations' run was deselected")
    assert called == OPERATIONS


def test_still_serving_afterwards(served: ServedApp) -> None:
    assert_still_serves(served)
