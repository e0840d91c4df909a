"""Exceptions a backend raises and routerd turns into answers.

Each says how routerd reacts: an ``InvalidRequest`` is the client's mistake (400),
``OutOfMemory`` makes the scheduler evict more and retry, ``ModelCrashed`` replaces
the instance, and any other ``BackendError`` fails the request that met it.
"""

from __future__ import annotations


class BackendError(Exception):
    """A backend could not do what was asked (bad folder, missing device, …).

    The message is shown to API clients and operators, so it must say what went
    wrong in plain words.
    """


class OutOfMemory(BackendError):
    """The device ran out of memory while loading or running; what was taken is freed.

    The scheduler answers it by evicting more and retrying the load once.
    """


class ModelCrashed(BackendError):
    """The loaded model can no longer serve at all (device lost, runtime broken).

    Unlike other errors, one is enough: the scheduler marks the instance failed,
    unloads it, and loads it afresh for the next request.
    """


class LoadCancelled(BackendError):
    """Raised into a backend's load by its progress sink (``LoadSpec.report``) once
    nobody waits for the load any more. A backend lets it propagate, freeing what it
    built, as for any other failure; the scheduler gives the reservation back only
    after the load's thread has returned.
    """


class InvalidRequest(ValueError):
    """The request cannot be served by this model (e.g. no chat template).

    ``param`` names the request field at fault, for the OpenAI error shape.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
