"""Routing: which instance (replica) of a version serves a request.

Pure apart from each policy's own turn counters or random generator (DESIGN.md
rule 2): the scheduler passes the request and the candidates — plain, frozen values
it builds from its instances — and gets them back ranked, best first. No I/O, no
logging, no clock.

Protocol (``RoutingPolicy``), who calls what and when:

- ``name`` — read by the scheduler when it names the policy in logs and metrics.
- ``rank(request, candidates)`` — called by the scheduler (``Scheduler._route``),
  on the event loop, on every lease of a version that has at least one instance,
  after the router has resolved the request's model id to that version. The
  scheduler may skip the call when a single replica is ready (nothing to choose).
  It takes the first resident candidate of the answer; cold ones are ranked last
  so that a policy's answer stays meaningful while replicas are still loading.
  ``rank`` must be fast (it is on every request's path), must not mutate
  ``candidates``, and returns a new list holding each candidate exactly once.

One policy object serves every version that names it, so counters are kept per
``request.model_id``. Policies are built by ``policies.registry.create("routing",
name)``; a version picks one with ``options.routing``, the host default is
``[scheduler] routing`` (``least-outstanding``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Candidate:
    """One instance (replica) of the version a request resolved to."""

    key: str  # instance key: "name@version" or "name@version#n"
    device: str  # "cpu", "cuda:0", ...
    resident: bool  # True when READY; False for a replica still loading (cold)
    in_flight: int  # live leases
    queued: int  # requests waiting in its batcher queue

    @property
    def load(self) -> int:
        """Outstanding requests: in flight plus queued."""
        return self.in_flight + self.queued


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What routing knows of a request."""

    model_id: str  # "name@version" the request resolved to
    sticky_key: str | None = None  # e.g. a session id; the built-in policies ignore it


class RoutingPolicy(Protocol):
    """Ranks the instances of one version for one request (see the module docstring)."""

    name: str

    def rank(self, request: RouteRequest, candidates: Sequence[Candidate]) -> list[Candidate]:
        """The candidates, best first: resident ones before cold ones.

        Called by the scheduler on every lease of a version with at least one
        instance, on the event loop; pure apart from the policy's own counters/RNG.
        """
        ...


def _by_load(c: Candidate) -> tuple[bool, int, str]:
    return (not c.resident, c.in_flight + c.queued, c.key)


def _by_key(c: Candidate) -> tuple[bool, str]:
    return (not c.resident, c.key)


class LeastOutstanding:
    """Send the request where the fewest others are waiting. The default.

    Decision tree for ``rank``:

    1. No candidates → ``[]``; one → that one.
    2. Resident candidates before cold ones.
    3. Within each group, fewest outstanding requests (in flight + queued) first.
    4. Ties → by instance key, so equal replicas are ranked the same way every time.
    """

    name = "least-outstanding"

    def rank(self, request: RouteRequest, candidates: Sequence[Candidate]) -> list[Candidate]:
        if len(candidates) < 2:
            return list(candidates)
        return sorted(candidates, key=_by_load)


class RoundRobin:
    """Take turns among the resident replicas, one turn counter per model id.

    Decision tree for ``rank``:

    1. No candidates → ``[]``; one → that one (no turn is used).
    2. Resident candidates are ordered by key; with none resident → the cold ones
       by key (no turn is used).
    3. Otherwise the model id's counter picks where the rotation starts: resident
       candidates from position ``turn mod count`` on, wrapping around; the counter
       then advances by one.
    4. Cold candidates follow, by key.
    """

    name = "round-robin"

    def __init__(self) -> None:
        self._turns: dict[str, int] = {}

    def rank(self, request: RouteRequest, candidates: Sequence[Candidate]) -> list[Candidate]:
        if len(candidates) < 2:
            return list(candidates)
        ordered = sorted(candidates, key=_by_key)
        resident = sum(1 for c in ordered if c.resident)
        if resident == 0:
            return ordered
        turns = self._turns
        turn = turns.get(request.model_id, 0)
        start = turn % resident
        turns[request.model_id] = start + 1  # stays small: the next start, unwrapped
        if start == 0:
            return ordered
        return ordered[start:resident] + ordered[:start] + ordered[resident:]


class PowerOfTwo:
    """Two random choices: draw two resident replicas, take the less loaded one.

    Near least-outstanding balance with less herding when the load figures are
    stale (many requests arriving between updates all pick the same "least" one).

    Decision tree for ``rank``:

    1. No candidates → ``[]``; one → that one.
    2. Fewer than two resident candidates → resident first, then cold ones by load
       and key (no random draw).
    3. Otherwise draw two distinct resident candidates uniformly at random; the one
       with fewer outstanding requests (in flight + queued) first, the other second
       (a tie keeps the order of the draw).
    4. The remaining resident candidates follow by load and key, then cold ones by
       load and key.

    ``rng``: a ``random.Random`` to draw with; pass a seeded one for repeatable tests.
    """

    name = "power-of-two"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._random = (rng if rng is not None else random.Random()).random

    def rank(self, request: RouteRequest, candidates: Sequence[Candidate]) -> list[Candidate]:
        if len(candidates) < 2:
            return list(candidates)
        ordered = sorted(candidates, key=_by_load)
        resident = sum(1 for c in ordered if c.resident)
        if resident < 2:
            return ordered
        draw = self._random
        i = int(draw() * resident)
        j = int(draw() * (resident - 1))
        if j >= i:
            j += 1
        first, second = ordered[i], ordered[j]
        if second.in_flight + second.queued < first.in_flight + first.queued:
            first, second = second, first
        low, high = (i, j) if i < j else (j, i)
        return [first, second, *ordered[:low], *ordered[low + 1 : high], *ordered[high + 1 :]]


ROUTING_POLICIES: dict[str, type[LeastOutstanding] | type[RoundRobin] | type[PowerOfTwo]] = {
    LeastOutstanding.name: LeastOutstanding,
    RoundRobin.name: RoundRobin,
    PowerOfTwo.name: PowerOfTwo,
}
"""Built-in routing policies by name, for ``policies.registry``."""
