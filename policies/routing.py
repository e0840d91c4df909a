"""Routing: which instance (replica) of a version serves a request.

Pure apart from each policy's own counter or random generator: the scheduler passes
the request and the candidates; the answer is the candidates ranked best first.

Protocol method, who calls it and when:

- ``rank(request, candidates)`` — the scheduler, on every lease of a version that
  has more than one ready instance, on the event loop. It must be fast: it is on
  every request's path. Resident (READY) candidates always rank before cold ones.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Candidate:
    """One instance of the version a request resolved to."""

    key: str  # "name@version" or "name@version#n"
    device: str
    resident: bool  # READY; False while it is still loading (cold)
    in_flight: int  # live leases
    queued: int  # requests waiting in its batcher

    @property
    def load(self) -> int:
        return self.in_flight + self.queued


@dataclass(frozen=True)
class RouteRequest:
    model_id: str
    sticky_key: str | None = None


class RoutingPolicy(Protocol):
    name: str

    def rank(self, request: RouteRequest, candidates: Sequence[Candidate]) -> list[Candidate]:
        """The candidates, best first (see the module docstring)."""
        ...


class LeastOutstanding:
    """1. Resident before cold. 2. Fewest requests in flight or queued. 3. By key."""

    name = "least-outstanding"

    def rank(self, request: RouteRequest, candidates: Sequence[Candidate]) -> list[Candidate]:
        return sorted(candidates, key=lambda c: (not c.resident, c.load, c.key))


class RoundRobin:
    """1. Resident before cold. 2. Among resident ones, take turns per model id."""

    name = "round-robin"

    def __init__(self) -> None:
        self._turn: dict[str, int] = {}

    def rank(self, request: RouteRequest, candidates: Sequence[Candidate]) -> list[Candidate]:
        resident = sorted((c for c in candidates if c.resident), key=lambda c: c.key)
        cold = sorted((c for c in candidates if not c.resident), key=lambda c: c.key)
        if not resident:
            return cold
        turn = self._turn.get(request.model_id, 0)
        self._turn[request.model_id] = turn + 1
        start = turn % len(resident)
        return resident[start:] + resident[:start] + cold


class PowerOfTwo:
    """1. Resident before cold. 2. Two resident candidates drawn at random; the less
    loaded of the two first, then the other, then the rest by load."""

    name = "power-of-two"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def rank(self, request: RouteRequest, candidates: Sequence[Candidate]) -> list[Candidate]:
        resident = [c for c in candidates if c.resident]
        cold = sorted((c for c in candidates if not c.resident), key=lambda c: (c.load, c.key))
        if len(resident) < 2:
            return resident + cold
        pair = self._rng.sample(resident, 2)
        pair.sort(key=lambda c: c.load)
        rest = sorted((c for c in resident if c not in pair), key=lambda c: (c.load, c.key))
        return pair + rest + cold


ROUTING_POLICIES = {
    "least-outstanding": LeastOutstanding,
    "round-robin": RoundRobin,
    "power-of-two": PowerOfTwo,
}
