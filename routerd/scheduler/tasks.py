"""What each version does (generate or embed), known before a request loads it.

A request for an endpoint its version cannot serve (chat to an embedding model) must
be refused before it costs a load. ``VersionTasks.task_of`` answers from what is at
hand, cheapest first:

1. A loaded instance of the version: its ``ModelInfo.task``, the truth.
2. What was learned before for the same folder, backend and options: a version's
   folder does not change under it, and a record registered again with another folder
   or other options no longer matches what was kept, so no hook needs to drop it.
3. The backend's ``task_of`` (``backends.base.Backend``), from the folder's small
   files, on a worker thread: None where only a load can tell.

A folder that cannot be read gives None and is asked again next time (it may be
fixed); the load, if one follows, reports the error. Nothing here changes residency.
"""

from __future__ import annotations

import asyncio
import logging

from contract.generation import Task
from routerd.scheduler.context import Context
from routerd.scheduler.residency import Residency
from routerd.version_options import SCHEDULER_OPTIONS
from state import VersionRecord

log = logging.getLogger("routerd.scheduler")


def _same_folder(known: VersionRecord, record: VersionRecord) -> bool:
    """Whether ``record`` loads what ``known`` did (the router keeps one record per
    version until it is registered again, so identity is the common answer)."""
    return known is record or (known.backend, known.path, known.options) == (
        record.backend,
        record.path,
        record.options,
    )


class VersionTasks:
    """The task of every version asked about, kept by model id (see the module doc)."""

    def __init__(self, context: Context, residency: Residency) -> None:
        self._context = context
        self._residency = residency
        self._known: dict[str, tuple[VersionRecord, Task | None]] = {}

    async def task_of(self, record: VersionRecord) -> Task | None:
        """What ``record`` does: its loaded instance's task, else what was learned for
        its folder before, else the backend's answer from the folder (None: unknown)."""
        model_id = record.model_id
        known = self._known.get(model_id)
        for instance in self._residency.version_replicas(record):
            model = instance.loaded_model
            if model is not None:
                task = model.info.task
                if known is None or known[1] is not task:
                    self._known[model_id] = (instance.record, task)
                return task
        if known is not None and _same_folder(known[0], record):
            return known[1]
        try:
            # Got here, on the loop, as the swap gets it: a backend built on first use
            # imports its libraries once, not from two threads at the same time.
            backend = self._context.backends.get(record.backend)
            options = {k: v for k, v in record.options.items() if k not in SCHEDULER_OPTIONS}
            predicted = await asyncio.to_thread(backend.task_of, record.path, options)
        except Exception as exc:  # unreadable folder, unknown kind: the load will say
            log.debug("%s: task not known before a load: %s", model_id, exc)
            return None
        self._known[model_id] = (record, predicted)
        return predicted
