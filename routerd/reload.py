"""Reloading the configuration (SIGHUP) while serving, without dropping requests.

The new file is read and checked in full before anything changes; a file that does
not load, or names a model that does not validate, is rejected with one log line
and the running configuration stays. Otherwise:

- models declared in the file are synced into the registry (added, updated,
  removed); a resident version that was removed or changed is drained (its requests
  in flight finish) and unloaded, so the next request loads it as now declared;
- ``pinned`` follows the file;
- scheduler settings and policies, logging and the request log's settings (on or
  off, retention, flush interval) take effect at once;
- what cannot change in a running process (address, port, state dir, devices, the
  memory audit) is logged as needing a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from contract.errors import InvalidRequest
from policies import registry as policy_registry
from policies.placement import PlacementPolicy
from routerd import logs
from routerd.config import Config, ConfigError
from routerd.scheduler import SchedulerSettings
from routerd.services import Services

log = logging.getLogger("routerd")

ConfigLoader = Callable[[], Config]


@dataclass(frozen=True)
class Reloaded:
    """What a reload changed (model ids), or why it was refused (``error``)."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    restart_needed: list[str] = field(default_factory=list)
    error: str | None = None


def placement_of(config: Config) -> PlacementPolicy:
    placement: PlacementPolicy = policy_registry.create(
        "placement",
        config.scheduler.placement,
        eviction=policy_registry.create("eviction", config.scheduler.eviction),
    )
    return placement


def reload_config(services: Services, load: ConfigLoader) -> Reloaded:
    """Apply the configuration ``load`` returns; on any error keep the running one."""
    old = services.live.config
    try:
        new = load()
        validated = [services.registry.validate(spec) for spec in new.models]
        placement = placement_of(new)
    except (ConfigError, InvalidRequest, ValueError, OSError) as exc:
        log.error(
            "config reload rejected; keeping the running config: %s",
            exc,
            extra={"event": "reload_failed"},
        )
        return Reloaded(error=str(exc))
    synced = services.registry.sync(validated, source="config")
    scheduler = services.scheduler
    for model_id in sorted(new.pinned ^ old.pinned):
        record = services.router.table.versions.get(model_id)
        if record is not None:
            (scheduler.pin if model_id in new.pinned else scheduler.unpin)(record)
    scheduler.reconfigure(SchedulerSettings.from_config(new.scheduler, new.devices), placement)
    for model_id in [*synced.updated, *synced.removed]:
        if scheduler.instance(model_id) is not None:
            scheduler.evict_later(model_id, reason="reload")
    logs.configure(new.log_level, new.log_format)
    services.request_log.configure(new.request_log)
    restart = _needs_restart(old, new)
    services.live.config = new
    log.info(
        "config reloaded: added=%s updated=%s removed=%s",
        synced.added,
        synced.updated,
        synced.removed,
        extra={"event": "reload", "restart_needed": ", ".join(restart) or None},
    )
    if restart:
        log.warning("config reload: %s change only after a restart", ", ".join(restart))
    return Reloaded(synced.added, synced.updated, synced.removed, restart)


def _needs_restart(old: Config, new: Config) -> list[str]:
    keys = []
    if (old.server.host, old.server.port) != (new.server.host, new.server.port):
        keys.append("server.host/port")
    if old.server.max_body_bytes != new.server.max_body_bytes:
        keys.append("server.max_body_bytes")
    if old.state_dir != new.state_dir:
        keys.append("state.dir")
    devices = ("cpu_memory", "gpus", "host_cache")
    if any(getattr(old.devices, k) != getattr(new.devices, k) for k in devices):
        keys.append("devices")
    if old.memory_audit != new.memory_audit:
        keys.append("memory_audit")
    return keys
