"""The ledger's invariant, searched for counterexamples (DESIGN.md rule 5).

Instances plus reservations never exceed a device's usable bytes, at any instant.
Hypothesis draws whole worlds (tests/worlds.py): one or two small fake GPUs, perhaps
a host tier; models of random sizes whose loads and unloads take random virtual time
and fail in random ways (load errors, out of memory, crashes while serving, unloads
that hang past the release timeout, memory that never comes back, measurements
above the estimate), some able to sleep; requests arriving at random times;
operators evicting now and then. Each world runs through the real scheduler, and at
every change three checks hold: the scheduler's own (``check_invariants``), its
published snapshots, and the memory the fake devices really hold. Every request
ends served or with a clear error within a virtual-time bound (and the loop never
stalls); then no reservation or claim is left; after shutdown, nothing but leaks.

Every world is one interleaving: the order of events follows from the drawn times
alone, so a failure replays and shrinks. 1,000 worlds run in about half a minute on
two cores; the ``slow`` run tries 3,000. Both draw the same worlds every run unless
``ROUTERD_EXPLORE=1`` asks for new ones. The worlds that once broke the invariant
(or a request) are kept below, each saying what broke.
"""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from tests.worlds import Model, Request, World, run_world

HALVES = st.integers(0, 8).map(lambda n: n / 2)  # coarse times collide: more races
TIMES = st.integers(0, 40).map(lambda n: n / 2)
SIZES = st.integers(50, 1300)
OVERRUNS = st.sampled_from([1.0] * 6 + [1.2, 1.5])  # measured ÷ estimated
UNLOADS = st.sampled_from([0.0, 0.5, 1.0, 3.0])  # 3 s: past the release timeout
FAILED_LOADS = st.sampled_from([0] * 8 + [1, 9])
OOM_LOADS = st.sampled_from([0] * 6 + [1, 2])
LEAKS = st.sampled_from([False] * 12 + [True])
TIERS = st.sampled_from(["", "", "sleep", "host"])  # how a model may rest in the host tier
CRASHES = st.sampled_from([False] * 9 + [True])
SETTINGS = st.fixed_dictionaries(
    {
        "placement": st.sampled_from(["best-fit", "first-fit", "spread"]),
        "min_residency": st.sampled_from([0.0, 1.0, 5.0]),
        "keep_alive": st.sampled_from([1.0, 5.0, 30.0, math.inf]),
        "load_wait_timeout": st.sampled_from([1.0, 5.0, 10.0]),
    }
)
HOSTS = st.sampled_from([0, 0, 400, 1500])  # the host tier's budget, for models that rest there


@st.composite
def models(draw: st.DrawFn, gpus: int) -> Model:
    size = draw(SIZES)
    tier = draw(TIERS)
    return Model(
        size=size,
        estimate=int(size / draw(OVERRUNS)),
        load_s=draw(HALVES),
        unload_s=draw(UNLOADS),
        fail_loads=draw(FAILED_LOADS),
        oom_loads=draw(OOM_LOADS),
        leaks=draw(LEAKS),
        device=draw(st.sampled_from([None, None, *(f"cuda:{i}" for i in range(gpus))])),
        sleeps=tier == "sleep",
        offloads=tier == "host",
    )


@st.composite
def worlds(draw: st.DrawFn) -> World:
    gpus = tuple(draw(st.lists(st.integers(600, 1500), min_size=1, max_size=2)))
    drawn = tuple(draw(st.lists(models(len(gpus)), min_size=1, max_size=4)))
    index = st.integers(0, len(drawn) - 1)
    requests = draw(
        st.lists(st.builds(Request, index, TIMES, HALVES, CRASHES), min_size=1, max_size=12)
    )
    evictions = draw(st.lists(st.tuples(TIMES, index, st.booleans()), max_size=2))
    return World(gpus, drawn, tuple(requests), tuple(evictions), draw(SETTINGS), draw(HOSTS))


# The same worlds on every run (``derandomize``), so a test run passes or fails on the
# code alone; ROUTERD_EXPLORE=1 draws new ones each run instead, to search further.
EXPLORE = os.environ.get("ROUTERD_EXPLORE") == "1"


def searching(worlds: int) -> settings:
    """Hypothesis settings for a search of ``worlds`` worlds (each takes real threads,
    so neither a deadline nor the too-slow health check applies)."""
    return settings(
        max_examples=worlds,
        deadline=None,
        derandomize=not EXPLORE,
        suppress_health_check=[HealthCheck.too_slow],
    )


def _live(world: World) -> None:
    note(repr(world))  # hypothesis prints a composite's value empty
    run_world(world, strict=False)


@searching(1000)
@given(worlds())
def test_no_interleaving_puts_a_device_over_its_budget(world: World) -> None:
    _live(world)


@pytest.mark.slow
@searching(3000)
@given(worlds())
def test_no_interleaving_puts_a_device_over_its_budget_thoroughly(world: World) -> None:
    _live(world)


# -- worlds that broke it once --------------------------------------------------------

QUICK = {"min_residency": 0.0, "keep_alive": 30.0, "load_wait_timeout": 5.0}

BROKE_IT = {
    # m1 measures 800 where 600 were planned; m0 is evicted for the difference but its
    # memory never comes back, and m1 was made ready all the same: 1100 on 1000.
    "an overrun's victim leaks": World(
        (1000,),
        (Model(300, leaks=True), Model(800, estimate=600)),
        (Request(0, 0.0), Request(1, 2.0)),
        scheduler=QUICK,
    ),
    # m1 waits for m0, evicted for it, whose memory never comes back; when m1 gives up,
    # its claim (600, never allocated) was counted as held while it left: 1300 on 1000.
    "a claim given up is counted as held": World(
        (1000,),
        (Model(700, leaks=True), Model(600)),
        (Request(0, 0.0), Request(1, 2.0)),
        scheduler=QUICK,
    ),
    # m1 measures 400 where 350 were planned, m0 is busy, so m1 is discarded: but its
    # memory never comes back, and the ledger forgot it: the GPU held 628 of 600.
    "a failed load's memory is not verified back": World(
        (600,),
        (Model(228), Model(400, estimate=350, leaks=True)),
        (Request(0, 0.0, hold=5.0), Request(1, 1.0)),
        scheduler=QUICK,
    ),
    # m0 waits for room while m1 sleeps for it (31 bytes stay on the GPU); m1's wake-up
    # evicts m2 and claims its bytes back, which took the 31 it held out of the ledger's
    # used bytes: m0 allocated counting on them while m2 was still there: 944 on 922.
    "a waking instance's bytes on the device are held": World(
        (922,),
        (Model(409), Model(157, sleeps=True), Model(504)),
        (Request(1, 0.0, hold=4.0), Request(2, 2.5, 1.5), Request(0, 5.5, 2.0), Request(1, 8.5)),
        scheduler={**QUICK, "placement": "first-fit", "min_residency": 1.0, "keep_alive": 5.0},
        host=1500,
    ),
    # Not the ledger, but a request that ended without a clear error: m0's wake-up waits
    # for room while an operator evicts m0; when room came, it was claimed for an
    # instance already gone (IllegalTransition, gone → waiting).
    "a wake-up planned while its instance is evicted": World(
        (1000,),
        (Model(600, sleeps=True), Model(600)),
        (Request(0, 0.0), Request(1, 1.0, hold=10.0), Request(0, 2.0)),
        evictions=((3.0, 0, False),),
        scheduler={**QUICK, "load_wait_timeout": 30.0},
        host=1500,
    ),
    # Not the ledger, but a hang: m0 sleeps for m1, expires asleep and unloads; a request
    # for m0 then found it unloading with its "vacated" event already set (by the sleep)
    # and looped without ever yielding: the event loop, and every request, stood still.
    "a request for an instance unloading from sleep": World(
        (1000,),
        (Model(600, unload_s=1.0, sleeps=True), Model(600)),
        (Request(0, 0.0), Request(1, 2.0), Request(0, 3.5)),
        scheduler={**QUICK, "keep_alive": 1.0},
        host=1500,
    ),
    # m2 needs both m0 and m1 gone; each fits the host tier alone, so both were put to
    # sleep at once, each counting on the same free host RAM: 640 on 400.
    "two victims fall asleep into the same host RAM": World(
        (1000,),
        (Model(500, sleeps=True), Model(300, sleeps=True), Model(900)),
        (Request(0, 0.0), Request(1, 0.0), Request(2, 2.0)),
        scheduler=QUICK,
        host=400,
    ),
    # m3 evicts m0 (whose 50 bytes never come back) and puts m1 to sleep; a request for
    # m1 wakes it, planned while m0 was still leaving, so counting on m0's bytes: the
    # wake-up did not wait, as a load does, for its bytes to fit: 601 on 600.
    "a wake-up counts on a victim that leaks": World(
        (600,),
        (Model(50, leaks=True), Model(103, sleeps=True), Model(50), Model(448)),
        (Request(0, 0.0), Request(1, 0.0), Request(3, 1.0), Request(1, 1.0)),
        scheduler={
            "placement": "best-fit",
            "min_residency": 0.0,
            "keep_alive": 5.0,
            "load_wait_timeout": 1.0,
        },
        host=400,
    ),
}


@pytest.mark.xfail(strict=True, reason="a release is verified by the process's total alone")
def test_a_leak_hidden_by_another_release() -> None:
    """Not fixed: m0 and m1 leave for m2 at once; m0's memory never comes back, but m1's
    does, within m0's verification window, and the process's total drops by enough for
    both. The ledger forgets m0's bytes, and m2 is allocated on top of them: 1100 on
    1000. Telling them apart needs per-instance accounting (a process per engine)."""
    world = World(
        (1000,),
        (Model(300, leaks=True), Model(300, unload_s=1.0), Model(800)),
        (Request(0, 0.0), Request(1, 0.0), Request(2, 2.0)),
        scheduler=QUICK,
    )
    run_world(world)


@pytest.mark.parametrize("world", BROKE_IT.values(), ids=BROKE_IT.keys())
def test_worlds_that_broke_it_once(world: World) -> None:
    watch = run_world(world)
    assert watch.changes > 10 and "served" in watch.outcomes


@pytest.mark.parametrize("overrun", [1.0, 1.5])
def test_a_busy_world_ends_clean(overrun: float) -> None:
    """Two models taking turns on one device, each load evicting the other."""
    models = (Model(900, estimate=int(900 / overrun), load_s=1.0), Model(400, oom_loads=1))
    requests = tuple(Request(i % 2, i * 0.5, hold=1.0) for i in range(6))
    watch = run_world(World((1000,), models, requests, scheduler=QUICK))
    assert watch.changes > 20 and "served" in watch.outcomes


def test_models_take_turns_through_a_host_tier_that_holds_one() -> None:
    """Three models on a device that holds one, a tier that holds one's weights: each
    load offloads the last (the tier dropping the one before), one model's offload
    never gives its device memory back (it is unloaded, and leaks), and requests
    come back for models resting in the tier or on their way there."""
    models = (Model(600, offloads=True), Model(500, offloads=True, leaks=True), Model(400))
    requests = tuple(Request(i % 3, i * 0.7, hold=0.5) for i in range(9))
    watch = run_world(World((1000,), models, requests, scheduler=QUICK, host=600))
    assert {"offloading", "offloaded"} <= watch.states
    assert watch.changes > 30 and "served" in watch.outcomes
