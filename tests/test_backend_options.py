"""Option checks every backend shares: the same words for the same mistake, and the key
at fault named as the error's ``param`` (the OpenAI error shape shows it)."""

from __future__ import annotations

import pytest

from backends.options import invalid, is_int, is_positive_int, reject_unknown
from backends.registry import BackendRegistry
from contract.errors import InvalidRequest

KNOWN = {
    "echo": "task, context, latency_ms, fail_rate, seed, bytes, inline",
    "transformers": "dtype, task, max_context, max_concurrency, allow_pickle",
    "vllm": (
        "dtype, max_context, max_num_seqs, kv_cache_bytes, overhead_bytes, "
        "enforce_eager, enable_sleep_mode, task, pooling"
    ),
}


@pytest.mark.parametrize("kind", sorted(KNOWN))
def test_an_unknown_option_is_named_with_the_backends_known_ones(kind: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        BackendRegistry().validate_options(kind, {"zeta": 1, "alpha": 2})
    assert error.value.param == "alpha"
    assert str(error.value) == (
        f"unknown option 'alpha' for the {kind} backend; allowed: {KNOWN[kind]}"
    )


@pytest.mark.parametrize(
    ("kind", "key"),
    [("echo", "context"), ("transformers", "max_context"), ("vllm", "max_context")],
)
@pytest.mark.parametrize("value", [0, -3, True, 2.0, "8"])
def test_a_count_must_be_a_positive_integer(kind: str, key: str, value: object) -> None:
    with pytest.raises(InvalidRequest) as error:
        BackendRegistry().validate_options(kind, {key: value})
    assert error.value.param == key
    assert str(error.value) == (
        f"option {key!r} has invalid value {value!r}; allowed: a positive integer"
    )


@pytest.mark.parametrize(
    ("kind", "key"),
    [("echo", "inline"), ("transformers", "allow_pickle"), ("vllm", "enforce_eager")],
)
def test_a_switch_must_be_true_or_false(kind: str, key: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        BackendRegistry().validate_options(kind, {key: 1})
    assert error.value.param == key
    assert str(error.value).endswith("allowed: true or false")


def test_the_helpers_alone() -> None:
    reject_unknown({"b": 1}, ("b", "a"), "some")
    with pytest.raises(InvalidRequest, match=r"for the some backend; allowed: b, a$"):
        reject_unknown({"c": 1}, ("b", "a"), "some")
    error = invalid("k", [1], "a list of none")
    assert (str(error), error.param) == (
        "option 'k' has invalid value [1]; allowed: a list of none",
        "k",
    )
    assert [is_int(v) for v in (0, -1, True, 1.0, "1")] == [True, True, False, False, False]
    assert [is_positive_int(v) for v in (1, 0, -1, True, 1.5)] == [True, False, False, False, False]
