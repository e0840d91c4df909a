"""The whole HTTP API fuzzed from its own OpenAPI document (``GET /openapi.json``).

schemathesis generates requests for every operation the document describes — valid
ones and ones that break the schema — and sends them to the real app (middlewares,
handlers, scheduler, admin API with its token, a fake backend) on a loopback port.
Whatever arrives, the answer is never a 5xx, and the daemon still serves afterwards.
Examples per operation are few, so the suite stays quick on a shared CI machine.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from routerd.api.openapi import document
from tests.support import ADMIN_AUTH, ServedApp

pytestmark = pytest.mark.slow  # property-based runs of many examples each

schema = schemathesis.openapi.from_dict(document())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedApp]:
    with ServedApp(tmp_path_factory.mktemp("schemathesis")) as running:
        yield running


@schema.parametrize()
@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_no_operation_answers_5xx(case: schemathesis.Case, served: ServedApp) -> None:
    response = case.call(base_url=f"http://127.0.0.1:{served.port}", headers=ADMIN_AUTH)
    assert response.status_code < 500, (case.method, case.path, response.text[:300])


def test_still_serving_afterwards(served: ServedApp) -> None:
    status, body = served.post(
        "/v1/completions", b'{"model": "a", "prompt": "hi", "max_tokens": 2}'
    )
    assert status == 200, body[:300]
