"""Placement is pure: same inputs, same device, or a PlacementError saying why."""

from __future__ import annotations

import pytest

from policies.placement import PlacementError, is_device_preference, place


@pytest.mark.parametrize(
    ("preference", "devices", "expected"),
    [
        ("auto", ["cpu"], "cpu"),
        ("auto", ["cpu", "cuda:0", "cuda:1"], "cuda:0"),
        ("cuda", ["cpu", "cuda:1"], "cuda:1"),
        ("cpu", ["cpu", "cuda:0"], "cpu"),
        ("cuda:1", ["cpu", "cuda:0", "cuda:1"], "cuda:1"),
    ],
)
def test_place(preference, devices, expected):
    assert place(preference, devices) == expected


@pytest.mark.parametrize(
    ("preference", "devices", "message"),
    [
        ("cuda", ["cpu"], "no GPU"),
        ("cuda:2", ["cpu", "cuda:0"], "does not exist"),
        ("tpu", ["cpu"], "not one of"),
    ],
)
def test_place_refuses(preference, devices, message):
    with pytest.raises(PlacementError, match=message):
        place(preference, devices)


def test_preferences_are_checked_before_registration():
    assert is_device_preference("cuda:12")
    assert not is_device_preference("cuda:")
    assert not is_device_preference("gpu")
