"""How long a client turned away by a full queue should wait (``Retry-After``).

Pure arithmetic over what the scheduler measured, so it is tested without a clock:
the rest of a load in progress (from how long this version's last load took), plus
the time the requests ahead need to be served (their number, times the version's
measured service time, spread over the requests it serves at once).
"""

from __future__ import annotations

from dataclasses import dataclass

ALPHA = 0.2
"""Weight of the newest sample in the moving averages: recent enough to follow a
change of load, smooth enough that one slow request does not swing Retry-After."""

MIN_RETRY_S = 1.0
MAX_RETRY_S = 600.0


def moving_average(previous: float | None, sample: float) -> float:
    return sample if previous is None else previous + ALPHA * (sample - previous)


@dataclass(frozen=True)
class QueueState:
    """What the scheduler knows about a version when its queue is full."""

    waiting: int  # requests ahead of this one
    service_s: float | None  # moving average of how long a request holds its lease
    concurrent: int  # requests it serves at once now (leases held on ready replicas)
    load_s: float | None = None  # how long its last load took; None: never measured
    loading_for_s: float | None = None  # a load is in progress since this long; None: none


def retry_after(state: QueueState) -> float:
    """Seconds until the queue has likely drained enough to take one more request."""
    seconds = 0.0
    if state.loading_for_s is not None:
        expected = state.load_s if state.load_s is not None else MIN_RETRY_S
        seconds += max(expected - state.loading_for_s, 0.0)
    if state.service_s is not None:
        seconds += state.waiting * state.service_s / max(state.concurrent, 1)
    return min(max(seconds, MIN_RETRY_S), MAX_RETRY_S)
