"""``name@version`` ids are split in one place (``routerd.model_ids``), and every
caller refuses the same malformed ones."""

from __future__ import annotations

import pytest

from routerd.errors import ModelNotFound
from routerd.explain import explain
from routerd.model_ids import split_model_id
from routerd.router import Router
from state import VersionRecord


@pytest.mark.parametrize(
    ("model_id", "parts"),
    [
        ("llama@1", ("llama", "1")),
        ("qwen2.5-0.5b@2024-09:rc1", ("qwen2.5-0.5b", "2024-09:rc1")),
        ("m@v", ("m", "v")),
    ],
)
def test_name_at_version_splits_into_both(model_id: str, parts: tuple[str, str]) -> None:
    assert split_model_id(model_id) == parts


@pytest.mark.parametrize("model_id", ["llama", "m", "a.b_c-d:e"])
def test_a_bare_name_has_no_version(model_id: str) -> None:
    assert split_model_id(model_id) == (model_id, None)


@pytest.mark.parametrize(
    ("model_id", "problem"),
    [
        ("", "empty name"),
        ("@1", "empty name"),
        ("@", "empty name"),
        ("llama@", "empty version"),
        ("llama@1@2", "more than one '@'"),
        ("llama@@1", "more than one '@'"),
        ("llama@1@", "more than one '@'"),
    ],
)
def test_empty_parts_and_extra_ats_are_refused(model_id: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as raised:
        split_model_id(model_id)
    assert repr(model_id) in str(raised.value)


def _record(version: str) -> VersionRecord:
    return VersionRecord("m", version, "echo", "/x", {}, "api", 1.0, 1.0)


@pytest.mark.parametrize("model_id", ["m@", "@1", "m@1@1", ""])
def test_the_router_answers_a_malformed_id_as_an_unknown_model(model_id: str) -> None:
    router = Router([_record("1")])
    assert router.resolve("m@1").version == "1"
    with pytest.raises(ModelNotFound, match=f"The model '{model_id}' does not exist"):
        router.resolve(model_id)
    with pytest.raises(ModelNotFound):
        router.route(model_id)


def test_explain_refuses_a_malformed_id() -> None:
    with pytest.raises(ValueError, match="empty version"):
        explain("m@", [], 0.0)
