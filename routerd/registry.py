"""Registering model versions: validate once at the door, then store and re-route.

Both ways in — ``[[models]]`` in the config (synced at start) and ``routerctl
register`` (the admin API) — go through ``Registry`` so a version is checked the
same way whichever way it came: the backend exists, the folder exists, the
options are ones the backend and the scheduler understand. Nothing invalid is
ever stored, so a bad registration cannot break later loads or restarts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from backends.registry import BackendRegistry
from contract.errors import InvalidRequest
from routerd.model_paths import check_model_folder
from routerd.router import Router
from routerd.version_options import SCHEDULER_OPTIONS, normalize
from state import Store, SyncResult, VersionRecord, VersionSpec


class Registry:
    """The registry service: validation in front of the store, router kept in step."""

    def __init__(
        self,
        store: Store,
        backends: BackendRegistry,
        router: Router,
        *,
        model_roots: Sequence[Path] | None = None,
    ) -> None:
        self._store = store
        self._backends = backends
        self._router = router
        self._model_roots = model_roots  # None: any folder (tests and tools only)
        self.refresh()

    def validate(self, spec: VersionSpec) -> VersionSpec:
        """Return ``spec`` with normalized options, or raise InvalidRequest (param named)."""
        folder = Path(spec.path)
        if not folder.is_absolute():
            raise InvalidRequest(f"path must be absolute, got {spec.path!r}", param="path")
        if self._model_roots is not None:
            check_model_folder(spec.path, self._model_roots)
        if not folder.is_dir():
            raise InvalidRequest(f"path {spec.path} is not a directory", param="path")
        scheduler_options: dict[str, Any] = {}
        backend_options: dict[str, Any] = {}
        for key, value in spec.options.items():
            (scheduler_options if key in SCHEDULER_OPTIONS else backend_options)[key] = value
        scheduler_options = normalize(scheduler_options)
        try:
            normalized = self._backends.validate_options(spec.backend, backend_options)
        except InvalidRequest as exc:
            # Backends name their own option keys; clients sent them under "options".
            if exc.param in backend_options:
                raise InvalidRequest(str(exc), param=f"options.{exc.param}") from exc
            raise
        normalized.update(scheduler_options)
        return replace(spec, options=normalized)

    def register(self, spec: VersionSpec, *, source: str = "api") -> VersionRecord:
        try:
            record = self._store.upsert_version(self.validate(spec), source=source)
        except ValueError as exc:
            if isinstance(exc, InvalidRequest):
                raise
            raise InvalidRequest(str(exc), param="name") from exc
        self.refresh()
        return record

    def sync(self, specs: Sequence[VersionSpec], *, source: str) -> SyncResult:
        """Make the versions from ``source`` (config, demo) exactly ``specs``."""
        validated = [self.validate(spec) for spec in specs]
        result = self._store.sync_versions(validated, source=source)
        self.refresh()
        return result

    def versions(self) -> list[VersionRecord]:
        return self._store.list_versions()

    def refresh(self) -> None:
        """Rebuild the routing table from the store's versions and routes, and swap it in."""
        self._router.replace(self._store.list_versions(), self._store.routes())
