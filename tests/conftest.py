"""Shared fixtures: the demo models (built once per session), the ``gpu`` marker, and
the ``engine`` marker on every test that runs a real model (it uses the demo models)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.base import LoadedModel, LoadSpec
from routerd.demo import ensure_demo_models

# -- the gpu marker -------------------------------------------------------------


def _nvml_finds_a_gpu() -> bool:
    """True when NVML initializes and reports at least one device."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no library, no driver, no permission: all mean "no GPU here"
        return False
    try:
        return int(pynvml.nvmlDeviceGetCount()) > 0
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "demo_root" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.engine)
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_items and not _nvml_finds_a_gpu():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU; NVML finds none")
        for item in gpu_items:
            item.add_marker(skip)


# -- the ledger's invariant ----------------------------------------------------------


@pytest.fixture(autouse=True)
def ledger_invariant_held() -> Iterator[None]:
    """Fail a test whose schedulers (built by tests/support.py, which turns the check
    on) kept a break of the ledger's invariant, wherever it was raised."""
    yield
    support = sys.modules.get("tests.support")
    if support is None:  # no scheduler was built through it
        return
    checked = support.CHECKED_SCHEDULERS
    breaks = [str(b) for s in checked for b in s.residency.invariant_breaks]
    checked.clear()
    assert not breaks, "\n".join(breaks)


# -- demo models ----------------------------------------------------------------


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<tmp>/state/demo`` with all four demo models built, as the daemon lays them out."""
    root = tmp_path_factory.mktemp("routerd") / "state" / "demo"
    ensure_demo_models(root)
    return root


def _load_demo(demo_root: Path, name: str) -> LoadedModel:
    # Imported here so that test runs that never load a model do not import torch.
    from backends.hf_transformers import TransformersBackend

    spec = LoadSpec(name=name, version="1", path=str(demo_root / name), options={}, device="cpu")
    return TransformersBackend().load(spec)


@pytest.fixture(scope="session")
def small_model(demo_root: Path) -> Iterator[LoadedModel]:
    """demo-small loaded on cpu by the transformers backend, shared by the session."""
    model = _load_demo(demo_root, "demo-small")
    yield model
    model.unload()


@pytest.fixture(scope="session")
def embed_model(demo_root: Path) -> Iterator[LoadedModel]:
    """demo-embed loaded on cpu by the transformers backend, shared by the session."""
    model = _load_demo(demo_root, "demo-embed")
    yield model
    model.unload()
