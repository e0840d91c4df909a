"""Which version of a model serves a request: a weighted split that sticks to keys.

Pure (DESIGN.md rule 2): the router passes the route's weights and the request's
sticky key and gets a version back; no I/O, no clock.

With a key, the choice is weighted rendezvous hashing: every version scores the key
with its own hash, ``-ln(u) / weight`` where ``u`` in (0, 1) comes from hashing
(key, model, version), and the lowest score wins. Why this rule:

- It needs no state: the same key reaches the same version for as long as the
  weights stay, across restarts and on every host, since the hash is fixed
  (BLAKE2b, not Python's salted ``hash``).
- Each version wins a share of keys equal to its share of the weights.
- When weights change, only keys whose winner changes move: raising a version's
  weight only takes keys to it, lowering one only takes keys from it. Going from
  90/10 to 75/25 moves about 15% of the keys (the least any rule can), all of them
  from the first version to the second.

Without a key, the version is drawn at random by weight.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence

_SCALE = float(1 << 64)


def unit_hash(key: str, salt: str) -> float:
    """A fixed pseudo-random number in (0, 1) for ``key`` and ``salt``."""
    message = f"{salt}\x00{key}".encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(message, digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / _SCALE


def choose_version(
    name: str,
    weights: Sequence[tuple[str, int]],
    key: str | None,
    rng: random.Random,
) -> str:
    """The version of ``name`` for a request with sticky ``key`` (None: random by weight).

    ``weights`` are ``(version, weight)`` pairs, at least one weight above 0.
    """
    live = [(version, weight) for version, weight in weights if weight > 0]
    if not live:
        raise ValueError(f"route of {name} has no version with weight above 0")
    if len(live) == 1:
        return live[0][0]
    if key is None:
        return rng.choices([v for v, _ in live], weights=[w for _, w in live])[0]
    best_version, best_score = live[0][0], math.inf
    for version, weight in live:
        score = -math.log(unit_hash(key, f"{name}@{version}")) / weight
        if score < best_score:
            best_version, best_score = version, score
    return best_version


def mirrors(percent: float, rng: random.Random) -> bool:
    """Whether this request is copied to the shadow version (``percent`` of them)."""
    return percent >= 100 or rng.random() * 100 < percent
