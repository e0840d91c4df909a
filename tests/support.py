"""Building a daemon's parts around fakes, for tests that need the real wiring."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from backends.registry import BackendRegistry
from routerd.app import build_services
from routerd.config import Config, SchedulerConfig
from routerd.services import Services
from state import VersionSpec
from tests.fakes import FakeBackend, cpu_only_inventory


def fake_spec(tmp: Path, name: str, version: str = "1", **options: Any) -> VersionSpec:
    folder = tmp / "models" / f"{name}-{version}"
    folder.mkdir(parents=True, exist_ok=True)
    return VersionSpec(
        name=name, version=version, backend="fake", path=str(folder), options=options
    )


def fake_services(
    tmp: Path,
    backend: FakeBackend,
    models: Sequence[VersionSpec] = (),
    *,
    load_timeout: float = 30.0,
    backends: BackendRegistry | None = None,
    **config: Any,
) -> Services:
    cfg = Config(
        state_dir=tmp / "state",
        models=tuple(models),
        scheduler=SchedulerConfig(load_timeout=load_timeout),
        **config,
    )
    registry = backends or BackendRegistry({"fake": lambda: backend})
    return build_services(cfg, backends=registry, devices=cpu_only_inventory(tmp))
