"""A version's own settings, typed: what the registry stores reads back as attributes."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from contract.errors import InvalidRequest
from routerd.version_options import VersionOptions, normalize, options_of
from state import VersionRecord


def record(**options: object) -> VersionRecord:
    return VersionRecord(
        name="m",
        version="1",
        backend="fake",
        path="/models/m",
        options=dict(options),
        source="test",
        created_at=0.0,
        updated_at=0.0,
    )


def test_defaults_leave_every_choice_to_the_daemon() -> None:
    options = VersionOptions.of({"dtype": "float32"})  # a backend's key: not routerd's
    assert options == VersionOptions()
    assert options.devices == ("auto",) and options.keep_alive is None
    assert (options.replicas, options.max_replicas, options.several) == (1, 1, False)
    assert options.max_queue is None and options.max_tokens is None and options.routing is None
    assert dict(options.batching) == {}


def test_stored_options_read_back_typed() -> None:
    stored = normalize(
        {
            "devices": ["cuda", "cpu"],
            "keep_alive": "-1",
            "max_queue": 0,
            "replicas": 2,
            "max_replicas": 3,
            "scale_up_queue": 2,
            "scale_down_idle": "90s",
            "routing": "least-outstanding",
            "max_tokens": 64,
            "batching": "none",
            "context": 128,
        }
    )
    assert stored["keep_alive"] == -1 and stored["scale_down_idle"] == 90.0
    assert stored["context"] == 128, "backend keys pass through untouched"
    options = VersionOptions.of(stored)
    assert options.devices == ("cuda", "cpu")
    assert math.isinf(options.keep_alive or 0.0)
    assert (options.max_queue, options.replicas, options.max_replicas) == (0, 2, 3)
    assert options.several and options.scale_up_queue == 2
    assert (options.scale_down_idle, options.routing, options.max_tokens) == (
        90.0,
        "least-outstanding",
        64,
    )
    assert dict(options.batching) == {"batching": "none"}
    assert VersionOptions.of({"device": "cpu", "max_replicas": 2}).devices == ("cpu",)
    assert VersionOptions.of({"replicas": 3}).max_replicas == 3, "at least replicas"


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"device": "tpu"}, "options.device"),
        ({"devices": []}, "options.devices"),
        ({"keep_alive": "soon"}, "options.keep_alive"),
        ({"replicas": 0}, "options.replicas"),
        ({"replicas": 3, "max_replicas": 2}, "options.max_replicas"),
        ({"max_queue": -1}, "options.max_queue"),
        ({"max_tokens": True}, "options.max_tokens"),
        ({"scale_down_idle": "later"}, "options.scale_down_idle"),
        ({"routing": "no-such-policy"}, "options.routing"),
        ({"batching": "no-such-policy"}, "options.batching"),
    ],
)
def test_bad_options_are_refused_naming_the_key(options: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        normalize(options)
    assert caught.value.param == param


def test_options_of_parses_a_record_once_and_a_new_record_again() -> None:
    first = record(max_queue=3)
    assert options_of(first) is options_of(first)
    assert options_of(first).max_queue == 3
    changed = replace(first, options={"max_queue": 5})
    assert options_of(changed).max_queue == 5, "a re-registered version is a new record"
