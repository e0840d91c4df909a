"""``explain``: the paragraph ``routerctl why`` prints, from hand-built event logs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from routerd.explain import explain
from state import Event

NOW = 1_000_000.0
MIB = 1 << 20
GIB = 1 << 30


def event(
    kind: str,
    ago: float,
    *,
    model: str = "llama",
    version: str = "1",
    device: str | None = "cuda:0",
    reason: str | None = None,
    bytes: int | None = None,
    duration_ms: float | None = None,
    trigger: str | None = None,
    detail: dict[str, Any] | None = None,
) -> Event:
    return Event(
        id=0,
        ts=NOW - ago,
        kind=kind,
        model=model,
        version=version,
        device=device,
        reason=reason,
        detail=detail or {},
        bytes=bytes,
        duration_ms=duration_ms,
        trigger=trigger,
    )


def newest_first(*events: Event) -> Sequence[Event]:
    return sorted(events, key=lambda e: e.ts, reverse=True)


def test_lru_eviction_with_trigger_residency_and_bytes() -> None:
    log = newest_first(
        event("load", 2 * 3600 + 8 * 60, reason="request", bytes=14 * GIB, duration_ms=4200),
        event(
            "evict",
            180,
            reason="lru",
            bytes=int(14.25 * GIB),
            trigger="mistral@2",
        ),
    )
    assert explain("llama@1", log, NOW) == (
        "llama@1 was evicted from cuda:0 3m ago because it was the least recently used "
        "model there, to make room for loading mistral@2. It had been resident for 2h 5m, "
        "since it was loaded on cuda:0 2h 8m ago. Evicting it freed 14.2 GiB."
    )


@pytest.mark.parametrize(
    ("reason", "says"),
    [
        ("ttl", "because it had been idle for longer than its keep_alive"),
        ("manual", "because an operator asked for it (routerctl evict)"),
        ("admin", "because an operator asked for it (routerctl evict)"),
        ("pressure", "because the device was running short of memory"),
        ("shutdown", "because routerd was shutting down"),
        ("oom-retry", "because a load ran out of device memory and routerd freed room"),
        ("lru", "because it was the least recently used model there and its memory was needed"),
        ("lfu", "because it was the model there with the fewest recent requests and its"),
        ("gdsf", "because it was the model there least worth keeping by GDSF"),
        ("cost", "because it was the model there whose eviction cost the least reloading"),
        ("cosmic-ray", "(reason: cosmic-ray)"),
        (None, "(no reason was recorded)"),
    ],
)
def test_every_eviction_reason_is_put_in_words(reason: str | None, says: str) -> None:
    text = explain("llama@1", [event("evict", 42, reason=reason, device="cpu")], NOW)
    assert text.startswith(f"llama@1 was evicted from cpu 42s ago {says}")
    assert "resident for" not in text  # the load is not in the log


def test_a_cost_aware_eviction_names_the_load_it_made_room_for() -> None:
    text = explain("llama@1", [event("evict", 5, reason="cost", trigger="big@3")], NOW)
    assert text.startswith(
        "llama@1 was evicted from cuda:0 5s ago because it was the model there whose "
        "eviction cost the least reloading for the memory it frees (recent requests × "
        "measured reload time ÷ size), to make room for loading big@3."
    )


def test_oom_retry_names_the_load_it_made_room_for() -> None:
    text = explain("llama@1", [event("evict", 5, reason="oom-retry", trigger="big@3")], NOW)
    assert text.startswith(
        "llama@1 was evicted from cuda:0 5s ago because loading big@3 ran out of device "
        "memory and routerd freed room to try it again."
    )


def test_pressure_eviction_with_trigger_and_drain_time() -> None:
    log = [
        event(
            "evict",
            3 * 86400 + 4 * 3600,
            reason="pressure",
            bytes=512 * MIB,
            duration_ms=1500,
            trigger="x@1",
        )
    ]
    assert explain("llama@1", log, NOW) == (
        "llama@1 was evicted from cuda:0 3d 4h ago because the device was running short "
        "of memory, while x@1 was being loaded. Draining and unloading it took 1.5 s and "
        "freed 512.0 MiB."
    )


def test_eviction_without_bytes_falls_back_to_what_the_load_held() -> None:
    log = newest_first(event("load", 600, bytes=3 * MIB), event("evict", 60, reason="manual"))
    assert explain("llama@1", log, NOW).endswith(
        "It had been resident for 9m, since it was loaded on cuda:0 10m ago. "
        "It held 3.0 MiB when it was loaded."
    )


def test_matching_load_is_the_one_just_before_the_eviction() -> None:
    log = newest_first(
        event("load", 5000, device="cuda:1"),
        event("evict", 4000, reason="ttl", device="cuda:1"),
        event("load", 3000, device="cuda:0"),
        event("evict", 100, reason="ttl"),
    )
    assert "resident for 48m, since it was loaded on cuda:0 50m ago" in explain("llama@1", log, NOW)
    # The load that preceded this eviction fell out of the log: no residency claimed.
    cut = newest_first(
        event("load", 5000), event("evict", 4000, reason="ttl"), event("evict", 100, reason="ttl")
    )
    assert "resident for" not in explain("llama@1", cut, NOW)


def test_leak_after_eviction_is_mentioned() -> None:
    log = newest_first(
        event("evict", 70, reason="manual", bytes=GIB),
        event("leak", 59, bytes=GIB, reason="memory not back after 10s"),
    )
    assert explain("llama@1", log, NOW).endswith(
        "Evicting it freed 1.0 GiB. Afterwards the device did not show the 1.0 GiB as free "
        "again (recorded as a leak: memory not back after 10s)."
    )
    bare = newest_first(event("evict", 70, reason="manual"), event("leak", 59))
    assert explain("llama@1", bare, NOW).endswith(
        "Afterwards the device did not show that memory as free again (recorded as a leak)."
    )
    # A leak before the eviction belongs to an earlier one.
    older = newest_first(event("leak", 100, bytes=1), event("evict", 70, reason="manual"))
    assert "leak" not in explain("llama@1", older, NOW)


def test_residency_recorded_by_the_scheduler_when_the_load_is_gone() -> None:
    log = [event("evict", 30, reason="ttl", detail={"resident_s": 7260.4})]
    assert "It had been resident for 2h 1m." in explain("llama@1", log, NOW)


def test_load_with_device_duration_and_size() -> None:
    log = newest_first(
        event("evict", 4000, reason="ttl"),
        event("load", 65, reason="request", bytes=1536 * MIB, duration_ms=4200, device="cuda:1"),
    )
    assert explain("llama@1", log, NOW) == (
        "llama@1 was loaded on cuda:1 1m 5s ago because a request needed it. Loading and "
        "warming it up took 4.2 s; it occupies 1.5 GiB. It has not been evicted since."
    )


def test_load_recorded_before_schema_2_reads_detail() -> None:
    old = event("load", 30, reason="request", detail={"bytes": 1000, "load_ms": 12.4}, device="cpu")
    text = explain("llama@1", [old], NOW)
    assert text == (
        "llama@1 was loaded on cpu 30s ago because a request needed it. Loading and "
        "warming it up took 12 ms; it occupies 1000 bytes. It has not been evicted since."
    )


@pytest.mark.parametrize(
    ("reason", "says"),
    [
        ("manual", " because an operator asked for it (routerctl load)."),
        ("restore", " to restore what was resident before routerd restarted."),
        ("warmup-test", " (reason: warmup-test)."),
        (None, "."),
    ],
)
def test_load_reasons(reason: str | None, says: str) -> None:
    text = explain("llama@1", [event("load", 0.2, reason=reason)], NOW)
    assert text.startswith(f"llama@1 was loaded on cuda:0 just now{says}")
    assert text.endswith("It has not been evicted since.")


def test_failed_load_gives_the_reason() -> None:
    log = newest_first(
        event("load", 900, bytes=GIB),
        event("evict", 800, reason="ttl"),
        event("load_failed", 7200, reason="older failure"),
        event("load_failed", 45, reason="CUDA out of memory. ", duration_ms=2500),
    )
    assert explain("llama@1", log, NOW) == (
        "Loading llama@1 on cuda:0 failed 45s ago after 2.5 s: CUDA out of memory. "
        "It is not resident; the next request for it will try to load it again."
    )
    bare = event("load_failed", 3, device=None)
    assert explain("llama@1", [bare], NOW).startswith(
        "Loading llama@1 failed 3s ago (no reason was recorded)."
    )


def test_no_events_means_never_loaded() -> None:
    never = "llama@1 has never been loaded since the event log began."
    assert explain("llama@1", [], NOW) == never
    # Other versions' and other models' events, and leaks alone, do not count.
    others = [
        event("load", 10, version="2"),
        event("evict", 5, model="mistral"),
        event("leak", 3, bytes=1),
    ]
    assert explain("llama@1", others, NOW) == never


def test_bare_name_considers_every_version() -> None:
    log = newest_first(event("load", 20, version="2"), event("load", 90, version="1"))
    assert explain("llama", log, NOW).startswith("llama was loaded on cuda:0 20s ago")


@pytest.mark.parametrize(
    ("ago", "says"),
    [
        (-5, "just now"),  # a clock that stepped back: never "in the future"
        (0.5, "just now"),
        (59.9, "59s ago"),
        (61, "1m 1s ago"),
        (10 * 60 + 30, "10m ago"),
        (3600, "1h ago"),
        (25 * 3600, "1d 1h ago"),
    ],
)
def test_relative_times(ago: float, says: str) -> None:
    assert f"cuda:0 {says}" in explain("llama@1", [event("evict", ago, reason="manual")], NOW)


@pytest.mark.parametrize(
    ("size", "says"),
    [
        (1, "1 byte"),
        (1023, "1023 bytes"),
        (2048, "2.0 KiB"),
        (5 * MIB + MIB // 2, "5.5 MiB"),
        (80 * GIB, "80.0 GiB"),
        (3 << 40, "3.0 TiB"),
    ],
)
def test_sizes_are_human_readable(size: int, says: str) -> None:
    text = explain("llama@1", [event("evict", 1, reason="manual", bytes=size)], NOW)
    assert text.endswith(f"freed {says}.")
