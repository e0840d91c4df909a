"""Device inventory from the kernel and (fake) NVML."""

from __future__ import annotations

from routerd.devices import (
    CPU_BUDGET_SHARE,
    DeviceInventory,
    NvmlProbe,
    default_cpu_budget,
    read_cpu_memory,
)
from tests.fakes import FakeGpus


def test_cpu_memory_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 1000 kB\nMemFree: 100 kB\nMemAvailable: 400 kB\n")
    reading = read_cpu_memory(meminfo)
    assert (reading.total_bytes, reading.free_bytes, reading.used_bytes) == (
        1024000,
        409600,
        614400,
    )


def test_gpus_come_after_the_cpu(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 1000 kB\nMemAvailable: 400 kB\n")
    gpus = FakeGpus([80, 40])
    gpus.use(0, 111, 10)
    gpus.use(1, 222, 39)
    inventory = DeviceInventory(gpus, meminfo=meminfo, cpu_budget=500)
    assert inventory.device_ids() == ["cpu", "cuda:0", "cuda:1"]
    readings = inventory.readings()
    assert readings[0].budget_bytes == 500
    assert [(r.id, r.kind, r.total_bytes, r.free_bytes, r.uuid) for r in readings[1:]] == [
        ("cuda:0", "cuda", 80, 70, "GPU-fake-0"),
        ("cuda:1", "cuda", 40, 1, "GPU-fake-1"),
    ]
    assert readings[1].process_bytes == {111: 10}


def test_gpu_selection_and_disabled_cpu(tmp_path):
    inventory = DeviceInventory(FakeGpus([80, 40, 20]), cpu_budget=0, gpu_indices=[2, 0, 7])
    assert inventory.device_ids() == ["cuda:2", "cuda:0"]
    assert [r.id for r in inventory.readings()] == ["cuda:2", "cuda:0"]


def test_default_cpu_budget_honours_the_cgroup_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 16000 kB\nMemAvailable: 8000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("0\n")
    assert default_cpu_budget(meminfo, cgroup) == int(8000 * 1024 * CPU_BUDGET_SHARE)
    (cgroup / "memory.max").write_text(f"{4000 * 1024}\n")
    (cgroup / "memory.current").write_text(f"{1000 * 1024}\n")
    assert default_cpu_budget(meminfo, cgroup) == int(3000 * 1024 * CPU_BUDGET_SHARE)


def test_no_nvml_means_no_gpus_not_an_error():
    probe = NvmlProbe.open()
    inventory = DeviceInventory(probe)
    assert inventory.device_ids()[0] == "cpu"
    if probe is None:
        assert inventory.gpu_ids() == []
