"""The transition table: every legal move is taken, every other one refused."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest

from routerd.instance import Instance
from routerd.states import INITIAL, TRANSITIONS, IllegalTransition, InstanceState
from state import VersionRecord

RECORD = VersionRecord(
    name="m",
    version="1",
    backend="fake",
    path=str(Path("/nonexistent")),
    options={},
    source="test",
    created_at=0.0,
    updated_at=0.0,
    state="active",
)


def paths_from_initial() -> dict[InstanceState, list[InstanceState]]:
    """The shortest legal path from the initial state to every state it reaches."""
    paths = {INITIAL: [INITIAL]}
    queue = deque([INITIAL])
    while queue:
        state = queue.popleft()
        for target in sorted(TRANSITIONS[state]):
            if target not in paths:
                paths[target] = [*paths[state], target]
                queue.append(target)
    return paths


def instance_in(state: InstanceState) -> Instance:
    """A fresh instance walked, by legal moves only, into ``state``."""
    instance = Instance(RECORD, "cpu", reserved_bytes=1, estimated_bytes=1, keep_alive=1, now=0)
    for step in paths_from_initial()[state][1:]:
        instance.move_to(step)
    assert instance.state is state
    instance.close_executor()
    return instance


def test_the_table_names_every_state_once() -> None:
    assert set(TRANSITIONS) == set(InstanceState)
    for targets in TRANSITIONS.values():
        assert targets <= set(InstanceState)


def test_every_state_is_reachable_and_every_state_can_end() -> None:
    assert set(paths_from_initial()) == set(InstanceState)
    # gone is reachable from every state, and only gone has nowhere to go
    for state in InstanceState:
        seen, queue = {state}, deque([state])
        while queue:
            for target in TRANSITIONS[queue.popleft()]:
                if target not in seen:
                    seen.add(target)
                    queue.append(target)
        assert InstanceState.GONE in seen, f"{state} can never leave"
        assert bool(TRANSITIONS[state]) == (state is not InstanceState.GONE)


@pytest.mark.parametrize(
    ("current", "target"),
    [(c, t) for c in InstanceState for t in InstanceState if t in TRANSITIONS[c]],
    ids=str,
)
def test_every_legal_move_is_taken(current: InstanceState, target: InstanceState) -> None:
    instance = instance_in(current)
    instance.move_to(target)
    assert instance.state is target


@pytest.mark.parametrize(
    ("current", "target"),
    [(c, t) for c in InstanceState for t in InstanceState if t not in TRANSITIONS[c]],
    ids=str,
)
def test_every_other_move_is_refused(current: InstanceState, target: InstanceState) -> None:
    instance = instance_in(current)
    with pytest.raises(IllegalTransition, match=f"{current} → {target}"):
        instance.move_to(target)
    assert instance.state is current, "a refused move changes nothing"


def test_the_swap_and_adapter_states_have_their_place() -> None:
    s = InstanceState
    assert TRANSITIONS[s.DRAINING] >= {s.OFFLOADING, s.SLEEPING, s.UNLOADING}
    assert TRANSITIONS[s.OFFLOADING] == {s.OFFLOADED, s.UNLOADING}
    assert TRANSITIONS[s.OFFLOADED] == {s.WAITING, s.DRAINING}  # back, or dropped from the tier
    assert TRANSITIONS[s.READY] == {s.DRAINING, s.FAILED}  # nothing else leaves ready
    assert s.LOADING.allocating and s.WARMING.allocating and not s.WAITING.allocating
    assert {x for x in s if x.loading} == {s.WAITING, s.LOADING, s.WARMING}


def test_resting_is_the_host_tier() -> None:
    s = InstanceState
    assert {state for state in s if state.resting} == {s.SLEEPING, s.OFFLOADED}
