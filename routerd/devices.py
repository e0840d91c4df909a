"""Device inventory: what memory the host has, read from NVML and the kernel.

This module only reads; it never decides (DESIGN.md). GPUs come from NVML through
nvidia-ml-py. A host without the NVML library or without GPUs simply has no GPUs —
that is logged once, not treated as an error — and the CPU device is always there.

NVML is reached through the small ``GpuProbe`` protocol so tests can pass a
hand-written fake and exercise the GPU paths on a CPU-only machine.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

log = logging.getLogger("routerd.devices")


@dataclass(frozen=True)
class DeviceReading:
    """One device's memory as last measured.

    ``process_bytes`` maps each process NVML reports on the device to its usage;
    the ledger splits it into ours (this pid) and foreign. Empty for the CPU device.
    ``budget_bytes`` is what routerd may use there: the whole GPU, or the CPU budget.
    """

    id: str  # "cpu" or "cuda:N"
    kind: str  # "cpu" or "cuda"
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    budget_bytes: int = 0
    uuid: str = ""
    process_bytes: Mapping[int, int] = field(default_factory=dict)


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

    def uuid(self, index: int) -> str: ...

    def processes(self, index: int) -> Mapping[int, int]:
        """Bytes used on the device by each process (pid → bytes) NVML can see."""
        ...


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

    def uuid(self, index: int) -> str:
        raw = self._nvml.nvmlDeviceGetUUID(self._nvml.nvmlDeviceGetHandleByIndex(index))
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def processes(self, index: int) -> Mapping[int, int]:
        handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
        usage: dict[int, int] = {}
        for call in (
            "nvmlDeviceGetComputeRunningProcesses",
            "nvmlDeviceGetGraphicsRunningProcesses",
        ):
            try:
                found = getattr(self._nvml, call)(handle)
            except Exception:  # not supported on this device/driver: report what we can
                continue
            for proc in found:
                used = getattr(proc, "usedGpuMemory", None)  # None without permission
                if used is not None:
                    usage[int(proc.pid)] = usage.get(int(proc.pid), 0) + int(used)
        return usage


def read_meminfo(meminfo: Path = Path("/proc/meminfo")) -> dict[str, int]:
    """/proc/meminfo as bytes per field (empty where it cannot be read)."""
    fields: dict[str, int] = {}
    try:
        for line in meminfo.read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                fields[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return fields


def cgroup_available_bytes(cgroup_dir: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Room left under this process's cgroup v2 memory limit, or None without a limit."""
    try:
        limit = (cgroup_dir / "memory.max").read_text().strip()
        if limit == "max":
            return None
        current = int((cgroup_dir / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return max(int(limit) - current, 0)


CPU_BUDGET_SHARE = 0.75


def default_cpu_budget(
    meminfo: Path = Path("/proc/meminfo"), cgroup_dir: Path = Path("/sys/fs/cgroup")
) -> int:
    """A share of the memory available at start, within the cgroup limit if one is set.

    Not all of it: the daemon itself, tokenizers and the page cache of memory-mapped
    weights need room too.
    """
    return int(_available(read_meminfo(meminfo), cgroup_dir) * CPU_BUDGET_SHARE)


def _available(fields: Mapping[str, int], cgroup_dir: Path) -> int:
    """Memory available now (``fields``: /proc/meminfo's), within the cgroup limit."""
    available = fields.get("MemAvailable", fields.get("MemFree", 0))
    cgroup = cgroup_available_bytes(cgroup_dir)
    return available if cgroup is None else min(available, cgroup)


class HostMemoryTooSmall(ValueError):
    """``cpu_memory`` and ``host_cache`` together ask for more RAM than the host has."""


def cpu_budget_beside_tier(
    cpu_memory: int | None,
    host_cache: int,
    meminfo: Path = Path("/proc/meminfo"),
    cgroup_dir: Path = Path("/sys/fs/cgroup"),
) -> int | None:
    """The CPU device's budget with the host-RAM tier beside it in the same RAM.

    Both are host memory, so ``cpu_memory + host_cache`` must fit ``MemTotal``
    (``HostMemoryTooSmall`` otherwise). Left to ``auto`` (None), the CPU budget is the
    usual share of what is available once the tier's bytes are set aside. Without a
    tier, None stays None (the inventory's own default)."""
    if host_cache <= 0:
        return cpu_memory
    fields = read_meminfo(meminfo)
    total = fields.get("MemTotal", 0)
    if cpu_memory is not None:
        if total and cpu_memory + host_cache > total:
            raise HostMemoryTooSmall(
                f"devices.cpu_memory ({cpu_memory} bytes) + devices.host_cache ({host_cache} "
                f"bytes) = {cpu_memory + host_cache} bytes, more than this host's {total} "
                "bytes of RAM: lower one of them"
            )
        return cpu_memory
    available = _available(fields, cgroup_dir)
    if total and host_cache >= available:
        raise HostMemoryTooSmall(
            f"devices.host_cache ({host_cache} bytes) is not less than the {available} bytes "
            "of RAM available: lower it, or set devices.cpu_memory = 0 on a GPU host"
        )
    return int((available - host_cache) * CPU_BUDGET_SHARE)


def read_cpu_memory(meminfo: Path = Path("/proc/meminfo"), budget: int = 0) -> DeviceReading:
    """Host memory from the kernel: MemTotal and MemAvailable (what can still be used)."""
    fields = read_meminfo(meminfo)
    total = fields.get("MemTotal", 0)
    available = fields.get("MemAvailable", fields.get("MemFree", 0))
    return DeviceReading(
        id="cpu",
        kind="cpu",
        name="host memory",
        total_bytes=total,
        used_bytes=max(total - available, 0),
        free_bytes=available,
        budget_bytes=budget,
    )


class DeviceInventory:
    """Reads every device: the CPU device first (if it has a budget), then each GPU.

    ``cpu_budget`` is the CPU device's memory budget in bytes (0 removes the CPU
    device); ``gpu_indices`` limits which GPUs are used (None: all of them).
    """

    def __init__(
        self,
        gpus: GpuProbe | None,
        meminfo: Path = Path("/proc/meminfo"),
        *,
        cpu_budget: int | None = None,
        gpu_indices: Sequence[int] | None = None,
    ) -> None:
        self._gpus = gpus
        self._meminfo = meminfo
        self.cpu_budget = default_cpu_budget(meminfo) if cpu_budget is None else cpu_budget
        count = 0 if gpus is None else gpus.device_count()
        if gpu_indices is None:
            self._gpu_indices = list(range(count))
        else:
            missing = [i for i in gpu_indices if i >= count]
            if missing:
                log.warning("configured GPUs %s do not exist (NVML sees %d)", missing, count)
            self._gpu_indices = [i for i in gpu_indices if i < count]
        self._last: list[DeviceReading] = []

    def gpu_ids(self) -> list[str]:
        return [f"cuda:{i}" for i in self._gpu_indices]

    def device_ids(self) -> list[str]:
        return (["cpu"] if self.cpu_budget > 0 else []) + self.gpu_ids()

    def readings(self) -> list[DeviceReading]:
        """Read every device now (NVML and /proc are cheap) and remember the result."""
        result = []
        if self.cpu_budget > 0:
            result.append(read_cpu_memory(self._meminfo, self.cpu_budget))
        if self._gpus is not None:
            for index in self._gpu_indices:
                mem = self._gpus.memory(index)
                result.append(
                    DeviceReading(
                        id=f"cuda:{index}",
                        kind="cuda",
                        name=self._gpus.name(index),
                        total_bytes=mem.total,
                        used_bytes=mem.used,
                        free_bytes=mem.free,
                        budget_bytes=mem.total,
                        uuid=self._gpus.uuid(index),
                        process_bytes=dict(self._gpus.processes(index)),
                    )
                )
        self._last = result
        return result

    def last_readings(self) -> list[DeviceReading]:
        """The most recent poll, for status pages that must not touch NVML."""
        return self._last or self.readings()
