"""The scheduler: the one owner of residency, built from parts with one job each.

See ``routerd.scheduler.coordinator`` for how the parts fit and how a lease is
served, and ``routerd.scheduler.swap`` for the path of a swap.
"""

from routerd.instance import InstanceSnapshot
from routerd.scheduler.coordinator import Scheduler
from routerd.scheduler.settings import Lease, SchedulerSettings

__all__ = ["InstanceSnapshot", "Lease", "Scheduler", "SchedulerSettings"]
