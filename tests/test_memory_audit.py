"""The memory audit's core: books per device, the tolerance, strict violations, the
trim before a verdict, and the sampler on virtual time. Fakes stand in for the ledger
and for the machine; ``test_process_memory.py`` reads the real one."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from routerd.clock import VirtualClock
from routerd.config import ConfigError, MemoryAuditConfig, load_config
from routerd.memory import LedgerRow
from routerd.memory_audit import (
    ENV_MODE,
    AuditSettings,
    Books,
    Measurement,
    MemoryAudit,
    allowance,
    gauge_value,
    judge,
)

MiB = 1024**2


def row(device: str = "cpu", *, kept: int = 0, reserved: int = 0, headroom: int = 0) -> LedgerRow:
    return LedgerRow(
        device=device,
        kind=device.split(":")[0],
        budget=8 * 1024 * MiB,
        measured_used=0,
        measured_free=8 * 1024 * MiB,
        foreign=0,
        headroom=headroom,
        kept=kept,
        victims=0,
        reserved=reserved,
        claimed=0,
    )


class FakeLedger:
    """The scheduler's ``ledger``: rows a test sets; ``on_read`` runs after each read."""

    def __init__(self, *rows: LedgerRow) -> None:
        self.rows = list(rows)
        self.reads = 0
        self.on_read: Callable[[], None] | None = None

    def ledger(self, *, fresh: bool = True) -> list[LedgerRow]:
        self.reads += 1
        rows = list(self.rows)
        if self.on_read is not None:
            self.on_read()
        return rows


class FakeReader:
    """Measured use a test sets per device; ``trim`` applies ``after_trim``."""

    blocking = False

    def __init__(self, usage: Mapping[str, int]) -> None:
        self.usage = dict(usage)
        self.after_trim: dict[str, int] = {}
        self.trims = 0
        self.errors: list[Exception] = []

    def read(self, devices: Sequence[str]) -> dict[str, Measurement]:
        if self.errors:
            raise self.errors.pop(0)
        return {d: Measurement(self.usage[d], {"fake": self.usage[d]}) for d in devices}

    def trim(self) -> None:
        self.trims += 1
        self.usage.update(self.after_trim)


STRICT = AuditSettings(mode="strict", interval=0.25, tolerance_bytes=10 * MiB, tolerance_ratio=0.1)


def audit_of(
    ledger: FakeLedger,
    reader: FakeReader,
    settings: AuditSettings = STRICT,
    clock: VirtualClock | None = None,
) -> MemoryAudit:
    return MemoryAudit(ledger, reader, settings, clock=clock or VirtualClock())


# -- the books --------------------------------------------------------------------


def test_unaccounted_is_measured_less_baseline_less_the_ledger():
    rows = [row(kept=100 * MiB, reserved=50 * MiB, headroom=5 * MiB)]
    [books] = judge({"cpu": Measurement(1000 * MiB)}, {"cpu": 800 * MiB}, rows, STRICT)
    assert books.accounted == 150 * MiB
    assert books.unaccounted == 50 * MiB
    assert books.allowance == 5 * MiB + 10 * MiB + 15 * MiB  # headroom + bytes + 10%
    assert books.over


def test_within_the_allowance_is_not_over_and_below_the_ledger_is_negative():
    rows = [row(kept=100 * MiB)]
    [within] = judge({"cpu": Measurement(120 * MiB)}, {}, rows, STRICT)
    assert within.unaccounted == 20 * MiB and not within.over
    [below] = judge({"cpu": Measurement(40 * MiB)}, {}, rows, STRICT)
    assert below.unaccounted == -60 * MiB and not below.over
    assert gauge_value(below) == 0 and gauge_value(within) == 20 * MiB


def test_a_device_read_twice_counts_the_larger_ledger():
    """An instance that leaves while the reading runs still counts (module docstring)."""
    before = [row(kept=300 * MiB)]
    after = [row(kept=0)]
    [books] = judge({"cpu": Measurement(300 * MiB)}, {}, after, STRICT, also=before)
    assert books.accounted == 300 * MiB and not books.over


def test_devices_the_reader_did_not_measure_are_left_out():
    rows = [row("cpu"), row("cuda:0")]
    books = judge({"cuda:0": Measurement(5)}, {}, rows, STRICT)
    assert [b.device for b in books] == ["cuda:0"]


def test_allowance_adds_headroom_bytes_and_share():
    settings = AuditSettings(tolerance_bytes=1000, tolerance_ratio=0.5)
    assert allowance(4000, 7, settings) == 7 + 1000 + 2000
    assert allowance(-10, 0, settings) == 1000


def test_books_print_every_figure():
    text = str(Books("cpu", 10, 2, 3, 4, {"rss_anon": 10}))
    assert "measured 10 - baseline 2 - accounted 3 = unaccounted 5 (allowance 4)" in text
    assert "rss_anon=10" in text


# -- settings ---------------------------------------------------------------------


def test_the_environment_overrides_the_configured_mode_and_picks_its_interval():
    config = MemoryAuditConfig()
    assert AuditSettings.from_config(config, {}).mode == "on"
    assert AuditSettings.from_config(config, {}).interval == 1.0
    strict = AuditSettings.from_config(config, {ENV_MODE: "Strict"})
    assert (strict.mode, strict.interval, strict.strict) == ("strict", 0.01, True)
    assert not AuditSettings.from_config(config, {ENV_MODE: "off"}).enabled
    chosen = MemoryAuditConfig(mode="strict", interval=0.5, tolerance=1, tolerance_ratio=0)
    assert AuditSettings.from_config(chosen, {}) == AuditSettings("strict", 0.5, 1, 0.0)
    with pytest.raises(ValueError, match=ENV_MODE):
        AuditSettings.from_config(config, {ENV_MODE: "loud"})
    with pytest.raises(ValueError, match="mode"):
        AuditSettings(mode="loud")


def test_config_section(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[memory_audit]\nmode = "strict"\ninterval = "50ms"\n'
        'tolerance = "16MiB"\ntolerance_ratio = 0.02\n'
    )
    assert load_config(path).memory_audit == MemoryAuditConfig("strict", 0.05, 16 * MiB, 0.02)
    for bad, message in (
        ('mode = "loud"', "memory_audit.mode"),
        ('interval = "0s"', "memory_audit.interval"),
        ("tolerance_ratio = 2", "memory_audit.tolerance_ratio"),
        ("tolerance = -1", "memory_audit.tolerance"),
        ("sample = 1", "unknown key memory_audit.sample"),
    ):
        path.write_text(f"[memory_audit]\n{bad}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(path)


# -- sampling ---------------------------------------------------------------------


async def test_strict_keeps_each_reading_over_and_logs_the_books_once(caplog):
    ledger = FakeLedger(row(kept=100 * MiB))
    reader = FakeReader({"cpu": 100 * MiB})
    audit = audit_of(ledger, reader)
    audit.take_baseline()
    reader.usage["cpu"] = 300 * MiB  # 200 MiB more than the ledger holds
    with caplog.at_level(logging.ERROR, logger="routerd.memory_audit"):
        await audit.sample()
        await audit.sample()
    assert audit.violation_count == 2 and len(audit.violations) == 2
    books = audit.violations[0].books
    assert (books.measured, books.baseline, books.accounted) == (300 * MiB, 100 * MiB, 100 * MiB)
    assert audit.violations[0].at == audit._clock.wall()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # one line per episode, every reading kept
    assert "unaccounted 104857600" in errors[0].getMessage()
    reader.usage["cpu"] = 100 * MiB
    await audit.sample()
    assert audit.violation_count == 2 and audit.latest["cpu"].unaccounted == -100 * MiB
    assert audit.worst["cpu"].unaccounted == 100 * MiB


async def test_a_reading_over_is_read_again_after_a_trim():
    """What glibc kept after free() goes back with the trim: no violation."""
    reader = FakeReader({"cpu": 0})
    audit = audit_of(FakeLedger(row(kept=0)), reader)
    audit.take_baseline()
    reader.usage["cpu"] = 500 * MiB
    reader.after_trim = {"cpu": 5 * MiB}
    [books] = await audit.sample()
    assert reader.trims == 1 and audit.trims == 1
    assert books.measured == 5 * MiB and not books.over
    assert audit.violations == []
    await audit.sample()
    assert reader.trims == 1  # within: no trim


async def test_on_mode_warns_once_per_episode_and_keeps_no_violation(caplog):
    reader = FakeReader({"cpu": 0})
    audit = audit_of(FakeLedger(row()), reader, AuditSettings(mode="on", tolerance_bytes=0))
    audit.take_baseline()
    with caplog.at_level(logging.WARNING, logger="routerd.memory_audit"):
        for usage in (1, 2, 0, 3):
            reader.usage["cpu"] = usage
            await audit.sample()
    assert audit.violations == [] and audit.violation_count == 0
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
    assert gauge_value(audit.latest["cpu"]) == 3


async def test_the_sampler_runs_on_its_clock_from_a_baseline():
    clock = VirtualClock()
    ledger = FakeLedger(row("cpu"), row("cuda:0", headroom=256 * MiB))
    reader = FakeReader({"cpu": 70 * MiB, "cuda:0": 0})
    audit = audit_of(ledger, reader, STRICT, clock)
    audit.start()
    assert audit.baseline == {"cpu": 70 * MiB, "cuda:0": 0}
    await clock.advance(0)
    assert audit.samples == 1 and audit.running
    await clock.advance(2.5)
    assert audit.samples == 11
    reader.usage["cuda:0"] = 250 * MiB  # a CUDA context: within the GPU's headroom
    await clock.advance(0.25)
    assert audit.latest["cuda:0"].unaccounted == 250 * MiB and audit.violations == []
    await audit.close()
    await clock.advance(1)
    assert audit.samples == 12 and not audit.running


async def test_a_failed_reading_does_not_stop_the_sampler(caplog):
    clock = VirtualClock()
    reader = FakeReader({"cpu": 0})
    audit = audit_of(FakeLedger(row()), reader, STRICT, clock)
    audit.start()
    reader.errors.append(OSError("gone"))
    with caplog.at_level(logging.ERROR, logger="routerd.memory_audit"):
        await clock.advance(0.5)
    assert "sample failed" in caplog.text
    assert audit.samples == 2  # the first reading failed, the next two did not
    await audit.close()


async def test_an_instance_leaving_during_the_reading_still_counts():
    ledger = FakeLedger(row(kept=200 * MiB))
    reader = FakeReader({"cpu": 0})
    audit = audit_of(ledger, reader)
    audit.take_baseline()
    reader.usage["cpu"] = 200 * MiB

    def evicted() -> None:  # the second read (after the reading) finds it gone
        ledger.rows = [row(kept=0)]

    ledger.on_read = evicted
    [books] = await audit.sample()
    assert books.accounted == 200 * MiB and audit.violations == []


async def test_off_samples_nothing():
    audit = audit_of(FakeLedger(row()), FakeReader({"cpu": 0}), AuditSettings(mode="off"))
    audit.start()
    assert not audit.running and audit.baseline == {}


async def test_status_names_settings_books_and_violations():
    reader = FakeReader({"cpu": 0})
    audit = audit_of(FakeLedger(row()), reader)
    audit.take_baseline()
    reader.usage["cpu"] = 100 * MiB
    await audit.sample()
    status = audit.status()
    assert status["mode"] == "strict" and status["violations"] == 1 and status["samples"] == 1
    assert status["devices"][0]["unaccounted_bytes"] == 100 * MiB
    assert status["first_violations"][0]["device"] == "cpu"
    assert {"at", "measured_bytes", "accounted_bytes", "sources"} <= set(
        status["first_violations"][0]
    )
