"""Device inventory from the kernel and (fake) NVML."""

from __future__ import annotations

from routerd.devices import DeviceInventory, NvmlProbe, read_cpu_memory
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
    inventory = DeviceInventory(FakeGpus([(80, 10), (40, 39)]), meminfo=meminfo)
    assert inventory.device_ids() == ["cpu", "cuda:0", "cuda:1"]
    readings = inventory.readings()
    assert [(r.id, r.kind, r.total_bytes, r.free_bytes) for r in readings[1:]] == [
        ("cuda:0", "cuda", 80, 70),
        ("cuda:1", "cuda", 40, 1),
    ]


def test_no_nvml_means_no_gpus_not_an_error():
    probe = NvmlProbe.open()
    inventory = DeviceInventory(probe)
    assert inventory.device_ids()[0] == "cpu"
    if probe is None:
        assert inventory.gpu_ids() == []
