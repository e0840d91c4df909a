"""Device inventory: what memory the host has, read from NVML and the kernel.

This module only reads; it never decides (DESIGN.md). GPUs come from NVML through
nvidia-ml-py. A host without the NVML library or without GPUs simply has no GPUs —
that is logged once, not treated as an error — and the CPU device is always there.

NVML is reached through the small ``GpuProbe`` protocol so tests can pass a
hand-written fake and exercise the GPU paths on a CPU-only machine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger("routerd.devices")


@dataclass(frozen=True)
class DeviceReading:
    """One device's memory as last measured."""

    id: str  # "cpu" or "cuda:N"
    kind: str  # "cpu" or "cuda"
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class GpuMemory:
    total: int
    free: int
    used: int


class GpuProbe(Protocol):
    """The part of NVML routerd uses; ``NvmlProbe`` is the real one."""

    def device_count(self) -> int: ...

    def name(self, index: int) -> str: ...

    def memory(self, index: int) -> GpuMemory: ...


class NvmlProbe:
    """GpuProbe over nvidia-ml-py. Construct with ``NvmlProbe.open()``."""

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml

    @classmethod
    def open(cls) -> NvmlProbe | None:
        """Initialise NVML; ``None`` (logged once) where there is no driver or library."""
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError…
            log.info("no NVIDIA GPUs: NVML unavailable (%s)", exc)
            return None
        return cls()

    def device_count(self) -> int:
        return int(self._nvml.nvmlDeviceGetCount())

    def name(self, index: int) -> str:
        raw = self._nvml.nvmlDeviceGetName(self._nvml.nvmlDeviceGetHandleByIndex(index))
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def memory(self, index: int) -> GpuMemory:
        info = self._nvml.nvmlDeviceGetMemoryInfo(self._nvml.nvmlDeviceGetHandleByIndex(index))
        return GpuMemory(total=int(info.total), free=int(info.free), used=int(info.used))


def read_cpu_memory(meminfo: Path = Path("/proc/meminfo")) -> DeviceReading:
    """Host memory from the kernel: MemTotal and MemAvailable (what can still be used)."""
    fields: dict[str, int] = {}
    try:
        for line in meminfo.read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                fields[key] = int(parts[0]) * 1024
    except OSError:
        pass
    total = fields.get("MemTotal", 0)
    available = fields.get("MemAvailable", fields.get("MemFree", 0))
    return DeviceReading(
        id="cpu",
        kind="cpu",
        name="host memory",
        total_bytes=total,
        used_bytes=max(total - available, 0),
        free_bytes=available,
    )


class DeviceInventory:
    """Reads every device on demand: the CPU device first, then each GPU by index."""

    def __init__(self, gpus: GpuProbe | None, meminfo: Path = Path("/proc/meminfo")) -> None:
        self._gpus = gpus
        self._meminfo = meminfo

    def gpu_ids(self) -> list[str]:
        if self._gpus is None:
            return []
        return [f"cuda:{i}" for i in range(self._gpus.device_count())]

    def device_ids(self) -> list[str]:
        return ["cpu", *self.gpu_ids()]

    def readings(self) -> list[DeviceReading]:
        result = [read_cpu_memory(self._meminfo)]
        if self._gpus is not None:
            for index in range(self._gpus.device_count()):
                mem = self._gpus.memory(index)
                result.append(
                    DeviceReading(
                        id=f"cuda:{index}",
                        kind="cuda",
                        name=self._gpus.name(index),
                        total_bytes=mem.total,
                        used_bytes=mem.used,
                        free_bytes=mem.free,
                    )
                )
        return result
