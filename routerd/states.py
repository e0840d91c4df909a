"""The states an instance moves through, and the one table of legal moves.

Only ``routerd.scheduler.lifecycle`` moves instances (``Instance.move_to``), and
every move is checked against ``TRANSITIONS``: a move the table does not list is a
bug, raised as ``IllegalTransition`` rather than left to corrupt residency.

::

    waiting ─▶ loading ─▶ warming ─▶ ready ─▶ draining ─▶ unloading ─▶ gone
    loading, warming ─▶ unloading                      (a failed load)
    ready ─▶ failed ─▶ unloading                       (a failed instance)
    draining ─▶ sleeping                               (into the host tier, engine's sleep)
    draining ─▶ offloading ─▶ offloaded                (into the host tier, routerd's offload)
    offloading ─▶ unloading                            (an offload that failed)
    sleeping, offloaded ─▶ waiting                     (brought back by a request)
    sleeping, offloaded ─▶ draining                    (dropped from the tier)

``sleeping`` and ``offloaded`` are the two ways of resting in routerd's host-RAM tier
(``[devices] host_cache``): ``sleeping`` is an engine's own sleep (vLLM), where the
weights wait in host RAM inside the engine, which keeps its working memory on the
device; ``offloading``/``offloaded`` is routerd's offload, where the whole instance
leaves the device and only its weights stay in host memory. Either comes back when a
request wants it (``→ waiting``, no load, no warm-up) or leaves the tier when room is
needed there or an operator evicts it (``→ draining → unloading → gone``). A LoRA
adapter resident in a base instance moves through the same states; a base's adapters
leave before it does.
"""

from __future__ import annotations

from enum import StrEnum


class InstanceState(StrEnum):
    WAITING = "waiting"  # placed and its bytes claimed; its victims are still leaving
    LOADING = "loading"  # weights coming onto the device (or waking)
    WARMING = "warming"  # one real request, then the footprint is measured
    READY = "ready"  # takes leases
    DRAINING = "draining"  # no new leases; live ones finish
    SLEEPING = "sleeping"  # the engine's sleep: weights in host RAM, woken by a request
    OFFLOADING = "offloading"  # weights being copied to the host-RAM tier
    OFFLOADED = "offloaded"  # weights in the host-RAM tier; nothing on the device
    UNLOADING = "unloading"  # giving its memory back
    FAILED = "failed"  # its backend kept failing or hung; no longer routed to
    GONE = "gone"  # left the residency table; its memory came back (or was reported leaked)

    @property
    def allocating(self) -> bool:
        """Its device memory is being taken: the ledger counts it as a load in flight."""
        return self in (InstanceState.LOADING, InstanceState.WARMING)

    @property
    def resting(self) -> bool:
        """In the host-RAM tier: asleep in its engine, or offloaded by routerd."""
        return self in (InstanceState.SLEEPING, InstanceState.OFFLOADED)

    @property
    def loading(self) -> bool:
        """Not ready yet: placed, loading or warming up."""
        return self in (InstanceState.WAITING, InstanceState.LOADING, InstanceState.WARMING)


_S = InstanceState

TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    _S.WAITING: frozenset({_S.LOADING, _S.UNLOADING}),
    # a wake-up (and a reload from the host tier) is ready without a second warm-up
    _S.LOADING: frozenset({_S.WARMING, _S.READY, _S.UNLOADING}),
    _S.WARMING: frozenset({_S.READY, _S.UNLOADING}),
    _S.READY: frozenset({_S.DRAINING, _S.FAILED}),
    _S.DRAINING: frozenset({_S.SLEEPING, _S.OFFLOADING, _S.UNLOADING}),
    _S.SLEEPING: frozenset({_S.WAITING, _S.DRAINING}),
    _S.OFFLOADING: frozenset({_S.OFFLOADED, _S.UNLOADING}),
    _S.OFFLOADED: frozenset({_S.WAITING, _S.DRAINING}),
    _S.FAILED: frozenset({_S.UNLOADING}),
    _S.UNLOADING: frozenset({_S.GONE}),
    _S.GONE: frozenset(),
}
"""Every legal move, from a state to the states it may go to next."""

INITIAL = InstanceState.WAITING
"""The state an instance is created in: placed, its bytes claimed."""


class IllegalTransition(RuntimeError):
    """A move the table does not allow: a bug in the scheduler, never a client's fault."""


def check_transition(key: str, current: InstanceState, target: InstanceState) -> None:
    """Raise ``IllegalTransition`` unless ``current → target`` is in ``TRANSITIONS``."""
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(f"{key}: {current} → {target} is not a legal move")
