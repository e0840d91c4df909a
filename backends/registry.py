"""Backend kinds by name, created on first use.

Backends pull in heavy libraries (torch, vLLM); creating them lazily keeps
``routerd --help``, ``routerctl`` and tests that use fake backends from paying
for imports they never need.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from backends.base import Backend
from contract.errors import InvalidRequest

BackendFactory = Callable[[], Backend]


def _transformers() -> Backend:
    from backends.hf_transformers import TransformersBackend

    return TransformersBackend()


def _echo() -> Backend:
    from backends.echo import EchoBackend

    return EchoBackend()


def _vllm() -> Backend:
    from backends.vllm import VllmBackend

    return VllmBackend()


BUILTIN_BACKENDS: Mapping[str, BackendFactory] = {
    "transformers": _transformers,
    "echo": _echo,
    "vllm": _vllm,
}


class BackendRegistry:
    """Maps a backend kind (``"transformers"``) to its Backend, built on first use."""

    def __init__(self, factories: Mapping[str, BackendFactory] | None = None) -> None:
        self._factories = dict(BUILTIN_BACKENDS if factories is None else factories)
        self._built: dict[str, Backend] = {}

    def kinds(self) -> list[str]:
        return sorted(self._factories)

    def get(self, kind: str) -> Backend:
        if kind not in self._factories:
            raise InvalidRequest(
                f"unknown backend {kind!r} (known: {', '.join(self.kinds())})", param="backend"
            )
        if kind not in self._built:
            self._built[kind] = self._factories[kind]()
        return self._built[kind]

    def validate_options(self, kind: str, options: Mapping[str, Any]) -> dict[str, Any]:
        return self.get(kind).validate_options(options)
