"""Placement and eviction are pure: same world in, same plan out."""

from __future__ import annotations

import pytest

from policies import registry
from policies.eviction import LeastRecentlyUsed
from policies.placement import expand_tiers, is_device_preference, placement_policy
from policies.types import DeviceRoom, LoadRequest, Plan, Refusal, Resident

GiB = 1024**3


def resident(model_id, device="cuda:0", size=GiB, last_used=0.0, loaded_at=0.0, **kw):
    return Resident(
        model_id=model_id,
        device=device,
        bytes=size,
        last_used=last_used,
        loaded_at=loaded_at,
        in_flight=kw.get("in_flight", 0),
        pinned=kw.get("pinned", False),
        ready=kw.get("ready", True),
    )


def room(device, capacity, free):
    return DeviceRoom(id=device, kind=device.split(":")[0], capacity=capacity, free=free)


def place(strategy, need, rooms, residents=(), prefs=("auto",), now=100.0, min_residency=0.0):
    policy = placement_policy(strategy, LeastRecentlyUsed())
    request = LoadRequest("new@1", list(prefs), need)
    return policy.place(request, rooms, list(residents), now=now, min_residency=min_residency)


@pytest.mark.parametrize(
    ("prefs", "devices", "tiers"),
    [
        (["auto"], ["cpu", "cuda:0", "cuda:1"], [["cuda:0", "cuda:1"], ["cpu"]]),
        (["auto"], ["cpu"], [["cpu"]]),
        (["cuda", "cpu"], ["cpu", "cuda:1"], [["cuda:1"], ["cpu"]]),
        (["cuda:1"], ["cpu", "cuda:0", "cuda:1"], [["cuda:1"]]),
        (["cuda:3"], ["cpu", "cuda:0"], []),
    ],
)
def test_preferences_expand_into_tiers(prefs, devices, tiers):
    assert expand_tiers(prefs, devices) == tiers


def test_strategies_choose_among_gpus_that_fit():
    rooms = [room("cuda:0", 80 * GiB, 10 * GiB), room("cuda:1", 80 * GiB, 40 * GiB)]
    need = {"cuda:0": 8 * GiB, "cuda:1": 8 * GiB}
    assert place("best-fit", need, rooms) == Plan("cuda:0")
    assert place("spread", need, rooms) == Plan("cuda:1")
    assert place("first-fit", need, rooms) == Plan("cuda:0")
    need_big = {"cuda:0": 20 * GiB, "cuda:1": 20 * GiB}
    assert place("best-fit", need_big, rooms) == Plan("cuda:1")


def test_gpu_tier_is_preferred_even_when_it_must_evict():
    rooms = [room("cuda:0", 10 * GiB, 0), room("cpu", 64 * GiB, 64 * GiB)]
    residents = [resident("old@1", size=4 * GiB)]
    need = {"cuda:0": 4 * GiB, "cpu": 8 * GiB}
    assert place("best-fit", need, rooms, residents) == Plan("cuda:0", ("old@1",))
    assert place("best-fit", need, rooms, residents, prefs=["cpu"]) == Plan("cpu")


def test_lru_evicts_oldest_first_and_only_as_many_as_needed():
    residents = [
        resident("b@1", last_used=20),
        resident("a@1", last_used=10),
        resident("c@1", last_used=30),
    ]
    lru = LeastRecentlyUsed()
    assert lru.victims(residents, need=GiB, free=0, now=100, min_residency=0) == ("a@1",)
    assert lru.victims(residents, need=2 * GiB, free=0, now=100, min_residency=0) == (
        "a@1",
        "b@1",
    )
    assert lru.victims(residents, need=GiB, free=GiB, now=100, min_residency=0) == ()
    assert lru.victims(residents, need=4 * GiB, free=0, now=100, min_residency=0) is None


def test_busy_pinned_and_young_instances_are_never_victims():
    residents = [
        resident("busy@1", last_used=1, in_flight=1),
        resident("pinned@1", last_used=2, pinned=True),
        resident("young@1", last_used=3, loaded_at=95),
        resident("leaving@1", last_used=0, ready=False),
        resident("ok@1", last_used=50),
    ]
    lru = LeastRecentlyUsed()
    assert lru.victims(residents, need=GiB, free=0, now=100, min_residency=10) == ("ok@1",)
    assert lru.victims(residents, need=2 * GiB, free=0, now=100, min_residency=10) is None


def test_too_large_is_refused_at_once_naming_bytes_and_largest_device():
    rooms = [room("cuda:0", 10 * GiB, 10 * GiB), room("cpu", 4 * GiB, 4 * GiB)]
    result = place("best-fit", {"cuda:0": 12 * GiB, "cpu": 12 * GiB}, rooms)
    assert isinstance(result, Refusal) and not result.retry
    assert "cuda:0" in result.reason and str(12 * GiB) in result.reason


def test_pinned_instances_make_a_final_refusal():
    rooms = [room("cuda:0", 10 * GiB, 2 * GiB)]
    residents = [resident("p@1", size=8 * GiB, pinned=True)]
    result = place("best-fit", {"cuda:0": 4 * GiB}, rooms, residents)
    assert isinstance(result, Refusal) and not result.retry
    assert "pinned" in result.reason


def test_busy_room_is_a_refusal_to_retry():
    rooms = [room("cuda:0", 10 * GiB, 2 * GiB)]
    residents = [resident("busy@1", size=8 * GiB, in_flight=2)]
    result = place("best-fit", {"cuda:0": 4 * GiB}, rooms, residents)
    assert isinstance(result, Refusal) and result.retry


def test_eviction_choice_frees_the_fewest_bytes():
    rooms = [room("cuda:0", 10 * GiB, 0), room("cuda:1", 10 * GiB, 0)]
    residents = [
        resident("big@1", device="cuda:0", size=8 * GiB, last_used=1),
        resident("small@1", device="cuda:1", size=3 * GiB, last_used=5),
    ]
    assert place("best-fit", {"cuda:0": 3 * GiB, "cuda:1": 3 * GiB}, rooms, residents) == Plan(
        "cuda:1", ("small@1",)
    )


def test_unknown_policies_list_the_known_ones():
    with pytest.raises(ValueError, match="best-fit"):
        placement_policy("worst-fit", LeastRecentlyUsed())
    with pytest.raises(ValueError, match="lru"):
        registry.check("eviction", "random")


def test_preferences_are_checked_before_registration():
    assert is_device_preference("cuda:12")
    assert not is_device_preference("cuda:")
    assert not is_device_preference("gpu")
