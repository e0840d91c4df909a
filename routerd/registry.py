"""Registering model versions: validate once at the door, then store and re-route.

Both ways in — ``[[models]]`` in the config (synced at start) and ``routerctl
register`` (the admin API) — go through ``Registry`` so a version is checked the
same way whichever way it came: the backend exists, the folder exists, the
options are ones the backend and the scheduler understand. Nothing invalid is
ever stored, so a bad registration cannot break later loads or restarts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from backends.base import InvalidRequest
from backends.registry import BackendRegistry
from policies.placement import is_device_preference
from policies.registry import check as check_policy
from routerd.batcher import BATCHING_OPTIONS, batching_policy
from routerd.config import ConfigError, parse_duration, parse_keep_alive
from routerd.model_paths import check_model_folder
from routerd.router import Router
from state import Store, SyncResult, VersionRecord, VersionSpec

# Options the scheduler reads itself; everything else belongs to the backend.
REPLICA_OPTIONS = ("replicas", "max_replicas", "scale_up_queue", "scale_down_idle", "routing")
# Options the API layer reads: ``max_tokens`` caps the completion tokens of one request.
API_OPTIONS = ("max_tokens",)
SCHEDULER_OPTIONS = (
    "device",
    "devices",
    "keep_alive",
    "max_queue",
    *BATCHING_OPTIONS,
    *REPLICA_OPTIONS,
    *API_OPTIONS,
)


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
        _check_scheduler_options(scheduler_options)
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


def _check_scheduler_options(options: dict[str, Any]) -> None:
    """Validate (and normalize in place) ``device``, ``devices`` and ``keep_alive``."""
    if "device" in options:
        device = options["device"]
        if not isinstance(device, str) or not is_device_preference(device):
            raise InvalidRequest(
                f"option device must be auto, cpu, cuda or cuda:N, got {device!r}",
                param="options.device",
            )
    if "devices" in options:
        devices = options["devices"]
        if (
            not isinstance(devices, list)
            or not devices
            or not all(isinstance(d, str) and is_device_preference(d) for d in devices)
        ):
            raise InvalidRequest(
                'option devices must be a list such as ["cuda", "cpu"] of auto, cpu, cuda, '
                f"cuda:N; got {devices!r}",
                param="options.devices",
            )
    if "keep_alive" in options:
        try:
            seconds = parse_keep_alive(options["keep_alive"], key="keep_alive")
        except ConfigError as exc:
            raise InvalidRequest(str(exc), param="options.keep_alive") from None
        # Stored as JSON, which has no infinity: -1 means never, as in the config.
        options["keep_alive"] = -1 if math.isinf(seconds) else seconds
    for key in ("replicas", "max_replicas", "scale_up_queue", "max_tokens"):
        value = options.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidRequest(
                f"option {key} must be a positive integer, got {value!r}", param=f"options.{key}"
            )
    if options.get("max_replicas", 1) < options.get("replicas", 1) and "max_replicas" in options:
        raise InvalidRequest(
            "option max_replicas must be at least replicas", param="options.max_replicas"
        )
    if "max_queue" in options:
        value = options["max_queue"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidRequest(
                f"option max_queue must be an integer >= 0 (0: no limit), got {value!r}",
                param="options.max_queue",
            )
    if "scale_down_idle" in options:
        try:
            options["scale_down_idle"] = parse_duration(
                options["scale_down_idle"], key="scale_down_idle"
            )
        except ConfigError as exc:
            raise InvalidRequest(str(exc), param="options.scale_down_idle") from None
    if "routing" in options:
        try:
            check_policy("routing", str(options["routing"]))
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="options.routing") from None
    batching = {k: v for k, v in options.items() if k in BATCHING_OPTIONS}
    if batching:
        try:
            batching_policy(batching, "cpu")
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"batching options: {exc}", param="options.batching") from None
