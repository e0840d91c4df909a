"""Model ids: ``name@version`` names one registered version, a bare ``name`` goes through
the routes (``routerd.router``).

The one place that splits an id, so that every caller agrees on what a malformed one
is. It imports nothing, so the request path, the metrics and the command line can all
use it.
"""

from __future__ import annotations


def split_model_id(model_id: str) -> tuple[str, str | None]:
    """``name@version`` → (name, version); ``name`` → (name, None).

    Raises ValueError for an id no version can have: an empty name, an empty version
    after ``@``, or a second ``@`` (names and versions never contain one; see
    ``state.records.check_identifier``). Whether the parts are otherwise valid
    identifiers is for the store to say.
    """
    name, sep, version = model_id.partition("@")
    if not name:
        raise ValueError(f"model id {model_id!r} has an empty name")
    if not sep:
        return name, None
    if not version:
        raise ValueError(f"model id {model_id!r} has an empty version after '@'")
    if "@" in version:
        raise ValueError(f"model id {model_id!r} has more than one '@'")
    return name, version
