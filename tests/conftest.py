"""Shared fixtures: the demo models (built once per session), the ``gpu`` marker, the
``engine`` marker on every test that runs a real model (it uses the demo models),
``strict_memory_audit``: the memory audit strict around a test (``--memory-audit``),
and ``restore_logging`` for tests that reload the config."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from backends.base import LoadedModel, LoadSpec
from backends.host_memory import peak_growth, reset_peak, rss_now
from routerd.demo import ensure_demo_models
from routerd.memory_audit import AuditSettings, Books, allowance
from tests.support import STRICT_AUDITS, STRICT_TEST_AUDIT, audit_failures

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


# -- the memory audit -------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--memory-audit",
        choices=("strict", "off"),
        default="strict",
        help="strict (default): tests using the strict_memory_audit fixture (the batching "
        "tests) fail when measured memory use passes the ledger; off: no audit",
    )


IN_PROCESS_MODELS = {"small_model": "demo-small", "embed_model": "demo-embed"}
"""Session fixtures that load a demo model straight through its backend, without a
scheduler, so without a ledger: what the backend's estimate says a request may add on
top of the loaded weights (KV cache and working memory) stands in for it."""


@pytest.fixture
async def strict_memory_audit(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """The memory audit strict around the test: it fails when measured use passes the
    ledger by more than the tolerance (``routerd.memory_audit``).

    Daemon parts built by ``fake_services`` during the test audit themselves every
    10 ms and once more at the end. A demo model the test uses directly (``small_model``)
    has no ledger; there the peak RSS the test reaches over its RSS at the start must stay
    within the model's estimated KV cache and working memory, plus the tolerance.
    """
    if request.config.getoption("--memory-audit") == "off":
        yield
        return
    models = [n for n in IN_PROCESS_MODELS if n in request.fixturenames]
    accounted = 0
    if models:
        demo_root: Path = request.getfixturevalue("demo_root")
        for name in models:
            request.getfixturevalue(name)  # loaded before the peak is reset
            accounted += _request_bytes(demo_root, IN_PROCESS_MODELS[name])
        if not reset_peak():
            warnings.warn("cannot reset the peak RSS: in-process models unaudited", stacklevel=1)
            models = []
    start = rss_now()
    STRICT_AUDITS.active = True
    try:
        yield
    finally:
        STRICT_AUDITS.active = False
    failures = await audit_failures(STRICT_AUDITS.take())
    if models:
        settings = AuditSettings.from_config(STRICT_TEST_AUDIT)
        books = Books("cpu", peak_growth(start), 0, accounted, allowance(accounted, 0, settings))
        if books.over:
            failures.append(f"peak RSS during the test: {books}")
    if failures:
        pytest.fail("memory use beyond the ledger:\n" + "\n".join(failures))


_REQUEST_BYTES: dict[str, int] = {}


def _request_bytes(demo_root: Path, name: str) -> int:
    """The estimated KV cache and working memory of a demo model on the CPU."""
    if name not in _REQUEST_BYTES:
        from backends.hf_transformers import TransformersBackend

        spec = LoadSpec(
            name=name, version="1", path=str(demo_root / name), options={}, device="cpu"
        )
        estimate = TransformersBackend().estimate_footprint(spec)
        _REQUEST_BYTES[name] = estimate.runtime + estimate.working
    return _REQUEST_BYTES[name]


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


# -- logging ----------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """A config reload reconfigures logging; give the test process its own back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


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
