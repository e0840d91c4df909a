"""One byte formatter for routerctl's tables and explain's sentences."""

from __future__ import annotations

import pytest

from routerd.units import human_bytes

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(
    ("n", "table", "sentence"),
    [
        (0, "0 B", "0 bytes"),
        (1, "1 B", "1 byte"),
        (1023, "1023 B", "1023 bytes"),
        (KIB, "1.0 KiB", "1.0 KiB"),
        (5 * MIB + MIB // 2, "5.5 MiB", "5.5 MiB"),
        (MIB - 1, "1024.0 KiB", "1024.0 KiB"),  # rounds, but stays in the smaller unit
        (80 * GIB, "80.0 GiB", "80.0 GiB"),
        (3 * TIB, "3.0 TiB", "3.0 TiB"),
        (2048 * TIB, "2048.0 TiB", "2048.0 TiB"),  # TiB is the largest unit
        (-3 * MIB, "-3.0 MiB", "-3.0 MiB"),
    ],
)
def test_tables_abbreviate_and_sentences_spell_out_bytes(n: int, table: str, sentence: str) -> None:
    assert human_bytes(n) == table
    assert human_bytes(n, spelled_out=True) == sentence


def test_fractional_byte_counts_round_to_whole_bytes() -> None:
    assert human_bytes(511.6) == "512 B"
