"""Messages from an instance's parts (batcher, backend) to the scheduler.

Health and load progress flow up as messages the scheduler consumes on the event
loop, in its own turn, never as calls into its internals: a batcher that sees a
backend fail, or a backend thread that reports progress, only posts. What becomes of
the instance is decided by the scheduler alone (DESIGN.md rule 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from backends.base import LoadProgress

if TYPE_CHECKING:
    from routerd.instance import Instance


@dataclass(frozen=True)
class InstanceFailed:
    """The instance's backend failed ``max_failures`` times in a row, hung or crashed."""

    instance: Instance
    reason: str


@dataclass(frozen=True)
class LoadProgressed:
    """A backend reported how far its load has come (from the instance thread)."""

    instance: Instance
    progress: LoadProgress


Message = InstanceFailed | LoadProgressed


class Post(Protocol):
    """Where messages go; callable from any thread."""

    def __call__(self, message: Message) -> None: ...
