"""The scheduler: the one owner of residency, built from parts with one job each.

See ``routerd.scheduler.coordinator`` for how the parts fit and how a lease is
served, and ``routerd.scheduler.swap`` for the path of a swap.
"""

from routerd.instance import InstanceSnapshot
from routerd.scheduler.coordinator import LeaseHold, Scheduler
from routerd.scheduler.planning import preferences_of
from routerd.scheduler.settings import (
    DeviceSnapshot,
    Failure,
    Leak,
    Lease,
    SchedulerObserver,
    SchedulerSettings,
)

__all__ = [
    "DeviceSnapshot",
    "Failure",
    "InstanceSnapshot",
    "Leak",
    "Lease",
    "LeaseHold",
    "Scheduler",
    "SchedulerObserver",
    "SchedulerSettings",
    "preferences_of",
]
