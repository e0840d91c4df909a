"""The memory audit's real reader: /proc for this process tree, NVML (faked) for GPUs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from backends.host_memory import (
    glibc_trim,
)
from routerd.devices import DeviceInventory
from routerd.process_memory import (
    ProcessMemoryReader,
    children,
    cpu_measurement,
    tree,
)
from tests.fakes import MEMINFO, FakeGpus, cpu_only_inventory

MiB = 1024**2


def test_cpu_reading_follows_memory_this_process_holds(tmp_path: Path):
    reader = ProcessMemoryReader(cpu_only_inventory(tmp_path))
    before = reader.read(["cpu"])["cpu"]
    held = bytearray(128 * MiB)  # written: resident at once
    after = reader.read(["cpu"])["cpu"]
    assert after.bytes - before.bytes >= 120 * MiB
    assert after.sources["rss_anon"] + after.sources["rss_shmem"] == after.bytes
    assert after.sources["processes"] >= 1
    del held


def test_the_tree_holds_child_processes(tmp_path: Path):
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    try:
        assert child.pid in (children(os.getpid()) or set())
        assert {os.getpid(), child.pid} <= tree(os.getpid())
        reader = ProcessMemoryReader(cpu_only_inventory(tmp_path), tree_ttl=0)
        assert reader.read(["cpu"])["cpu"].sources["processes"] >= 2
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)


def _fake_proc(root: Path, parents: dict[int, int], with_children_files: bool) -> Path:
    for pid, parent in parents.items():
        (root / str(pid) / "task" / str(pid)).mkdir(parents=True)
        (root / str(pid) / "stat").write_text(f"{pid} (p {pid}) S {parent} 0 0\n")
        (root / str(pid) / "task" / str(pid) / "stat").write_text(f"{pid} (p) S {parent}\n")
        (root / str(pid) / "status").write_text(
            f"Name:\tp\nVmRSS:\t{3 * pid} kB\nRssAnon:\t{pid} kB\nRssShmem:\t1 kB\n"
        )
        if with_children_files:
            below = " ".join(str(c) for c, p in parents.items() if p == pid)
            (root / str(pid) / "task" / str(pid) / "children").write_text(below)
    return root


@pytest.mark.parametrize("with_children_files", [True, False])
def test_the_tree_is_found_with_or_without_children_files(tmp_path, with_children_files):
    """Without CONFIG_PROC_CHILDREN the tree comes from a scan of every process."""
    proc = _fake_proc(tmp_path, {10: 1, 11: 10, 12: 11, 20: 1}, with_children_files)
    assert tree(10, proc) == {10, 11, 12}
    assert (children(10, proc) is None) is not with_children_files
    measured = cpu_measurement(tree(10, proc), proc)
    assert measured.bytes == (10 + 11 + 12 + 3) * 1024  # RssAnon + RssShmem, not VmRSS
    assert measured.sources == {"rss_anon": 33 * 1024, "rss_shmem": 3 * 1024, "processes": 3}


def test_the_tree_is_looked_up_again_after_its_ttl(tmp_path: Path):
    proc = _fake_proc(tmp_path, {10: 1, 11: 10}, True)
    reader = ProcessMemoryReader(cpu_only_inventory(tmp_path), pid=10, proc=proc, tree_ttl=3600)
    assert reader.pids() == {10, 11}
    (proc / "10" / "task" / "10" / "children").write_text("")  # 11 left
    assert reader.pids() == {10, 11}  # within the ttl: as looked up before
    fresh = ProcessMemoryReader(cpu_only_inventory(tmp_path), pid=10, proc=proc, tree_ttl=0)
    assert fresh.pids() == {10}


def test_a_process_gone_while_read_counts_nothing(tmp_path: Path):
    proc = _fake_proc(tmp_path, {10: 1}, True)
    assert tree(99, proc) == {99}
    assert cpu_measurement({99}, proc).bytes == 0


def test_gpu_reading_counts_this_process_tree_only(tmp_path: Path):
    gpus = FakeGpus([8 * 1024 * MiB])
    gpus.use(0, os.getpid(), 300 * MiB)
    gpus.use(0, 2**22 + 7, 500 * MiB)  # another process (no such pid here)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    reader = ProcessMemoryReader(DeviceInventory(gpus, meminfo, cpu_budget=0))
    reading = reader.read(["cuda:0", "cuda:1"])
    assert list(reading) == ["cuda:0"]
    assert reading["cuda:0"].bytes == 300 * MiB
    assert reading["cuda:0"].sources["nvml"] == 300 * MiB


def test_trim_calls_the_trimmer_and_glibc_has_one(tmp_path: Path):
    calls: list[int] = []
    reader = ProcessMemoryReader(cpu_only_inventory(tmp_path), trimmer=lambda: calls.append(1))
    reader.trim()
    assert calls == [1]
    trim = glibc_trim()
    if trim is None:
        pytest.skip("not glibc")
    trim()  # returns free pages; nothing to assert but that it runs


def test_peak_growth_sees_memory_already_freed():
    """In a child process: this one's RSS moves with whatever earlier tests' threads
    are still doing, and the test must see only its own mapping come and go."""
    script = """
import mmap
from backends.host_memory import peak_growth, reset_peak, rss_now
if not reset_peak():
    print("no-reset"); raise SystemExit
start = rss_now()
held = mmap.mmap(-1, 96 << 20)  # a mapping of its own, whatever malloc would do
held.write(b"x" * (96 << 20))  # touched: resident
held.close()  # unmapped: gone from RSS at once
print(rss_now() - start, peak_growth(start))
"""
    out = _run_child(script)
    if out == "no-reset":
        pytest.skip("the kernel does not let this process reset its peak RSS")
    after, peak = (int(x) for x in out.split())
    assert after < 32 * MiB
    assert peak >= 90 * MiB


def _run_child(script: str, *args: str) -> str:
    """``script`` run by a fresh interpreter in the repository; its output."""
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout.strip()


def test_exact_allocation_returns_a_freed_block_of_two_mebibytes_at_once() -> None:
    """With the 1 MiB threshold set, freed 2 MiB blocks leave RSS at once, with no trim:
    each was its own mapping. Without it they stay in glibc's heap. (A child process:
    the setting is process-wide, the daemon's, and must not change this one.)"""
    script = """
import sys
from backends.host_memory import map_large_allocations, rss_now
if sys.argv[1] == "exact" and not map_large_allocations():
    print("no-glibc"); raise SystemExit
first = bytearray(2 << 20)
del first  # freed once: glibc's own threshold rises past 2 MiB
blocks, keep = [], []
for _ in range(40):  # each block under a small one that stays: no heap top to trim
    blocks.append(bytearray(2 << 20))
    keep.append(bytearray(64 << 10))
held = rss_now()
del blocks
print(held - rss_now())
"""
    freed = {}
    for mode in ("exact", "pooled"):
        out = _run_child(script, mode)
        if out == "no-glibc":
            pytest.skip("not glibc")
        freed[mode] = int(out)
    assert freed["exact"] >= 60 * MiB
    assert freed["pooled"] < 20 * MiB  # the default keeps them (threshold raised to 2 MiB)
