"""Checks shared by the backends' ``validate_options``.

A bad option is refused when a version is registered, and the refusal reaches an
operator or an API client: every backend words it the same way and names the key
at fault as the error's ``param``, whichever backend the version uses.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, TypeGuard

from contract.errors import InvalidRequest


def reject_unknown(options: Mapping[str, Any], known: Collection[str], backend: str) -> None:
    """Raise InvalidRequest naming the first (alphabetically) key of ``options`` not in
    ``known``; the message lists ``known`` in its own order."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise InvalidRequest(
            f"unknown option {unknown[0]!r} for the {backend} backend; allowed: {', '.join(known)}",
            param=unknown[0],
        )


def invalid(key: str, value: object, allowed: str) -> InvalidRequest:
    """The error for option ``key`` holding ``value``; ``allowed`` says what would do."""
    return InvalidRequest(
        f"option {key!r} has invalid value {value!r}; allowed: {allowed}", param=key
    )


def is_int(value: object) -> TypeGuard[int]:
    """An integer, not a bool (TOML and JSON ``true`` would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_positive_int(value: object) -> bool:
    return is_int(value) and value > 0
