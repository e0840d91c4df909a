"""The running batch's KV cache: columns written into room, copied only when it runs out."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from backends import hf_cache
from backends.hf_cache import GrowingLayer


def columns(rows: int, count: int, start: float = 0.0) -> torch.Tensor:
    """``[rows, 2 heads, count, 3]`` with column c of row r holding start + 100 r + c + 1."""
    row = torch.arange(rows, dtype=torch.float32).view(rows, 1, 1, 1) * 100
    column = torch.arange(count, dtype=torch.float32).view(1, 1, count, 1) + 1
    return (start + row + column).expand(rows, 2, count, 3).contiguous()


def layer_with(keys: torch.Tensor, limit: int = 1000, room: int = 4) -> GrowingLayer:
    return GrowingLayer(keys, -keys, limit, room)


def test_steps_write_into_the_room_and_copy_only_when_it_runs_out() -> None:
    layer = layer_with(columns(2, 5), room=4)
    assert layer.capacity == 9
    buffers = {layer._key_buffer.data_ptr()}
    expected = columns(2, 5)
    for step in range(10):
        new = columns(2, 1, start=1000 + step)
        keys, values = layer.update(new, -new)
        expected = torch.cat([expected, new], dim=-2)
        assert torch.equal(keys, expected) and torch.equal(values, -expected)
        assert layer.get_seq_length() == 6 + step
        buffers.add(layer._key_buffer.data_ptr())
    # 15 columns: the first buffer held 9, each new one 4 more than the live columns.
    assert len(buffers) == 3
    assert layer.capacity == 19


def test_room_never_reaches_past_the_limit() -> None:
    layer = layer_with(columns(1, 6), limit=8, room=100)
    assert layer.capacity == 8
    for step in range(2):
        layer.update(columns(1, 1, 50 + step), columns(1, 1))
    assert layer.capacity == 8
    layer.update(columns(1, 1, 60), columns(1, 1))  # past the limit: exactly what is needed
    assert layer.capacity == 9 and layer.get_seq_length() == 9


def test_rows_appended_are_right_aligned_over_zero_padding() -> None:
    layer = layer_with(columns(2, 3))
    layer.append_rows(columns(1, 5, start=7), -columns(1, 5, start=7))
    keys = layer.keys
    assert keys is not None and tuple(keys.shape) == (3, 2, 5, 3)
    assert torch.equal(keys[:2, :, :2], torch.zeros(2, 2, 2, 3))
    assert torch.equal(keys[:2, :, 2:], columns(2, 3))
    assert torch.equal(keys[2:], columns(1, 5, start=7))
    # The merged rows go on growing in place.
    new = columns(3, 1, start=500)
    grown, _ = layer.update(new, -new)
    assert torch.equal(grown[:, :, -1:], new)


def test_selected_rows_and_dropped_front_columns() -> None:
    layer = layer_with(columns(3, 4))
    layer.batch_select_indices(torch.tensor([0, 2]))
    keys = layer.keys
    assert keys is not None and torch.equal(keys, columns(3, 4)[[0, 2]])
    layer.drop_front(3)
    keys = layer.keys
    assert keys is not None and torch.equal(keys, columns(3, 4)[[0, 2]][:, :, 3:])
    assert layer.get_seq_length() == 1
    new = columns(2, 1, start=900)
    grown, _ = layer.update(new, -new)
    assert torch.equal(grown[:, :, 0:1], columns(3, 4)[[0, 2]][:, :, 3:])
    assert torch.equal(grown[:, :, 1:], new)


def test_keys_assigned_from_outside_are_taken_over_at_the_next_update() -> None:
    layer = layer_with(columns(2, 4))
    layer.keys, layer.values = columns(2, 4)[:, :, :2], -columns(2, 4)[:, :, :2]  # a crop
    new = columns(2, 1, start=300)
    keys, values = layer.update(new, -new)
    assert torch.equal(keys, torch.cat([columns(2, 4)[:, :, :2], new], dim=-2))
    assert torch.equal(values, -keys)
    layer.reset()  # transformers' reset drops the tensors
    keys, _ = layer.update(new, -new)
    assert torch.equal(keys, new)


def test_only_plain_full_attention_caches_become_growing() -> None:
    plain = DynamicCache()
    plain.layers = [DynamicLayer(), DynamicLayer()]
    for layer in plain.layers:
        layer.update(columns(1, 2), columns(1, 2))
    assert not hf_cache.is_growing(plain)
    assert hf_cache.make_growing(plain, limit=10)
    assert hf_cache.is_growing(plain)
    assert all(layer.capacity == 10 for layer in plain.layers)
    hf_cache.set_limit(plain, 4)
    assert all(layer.limit == 4 for layer in plain.layers)

    sliding = DynamicCache()
    sliding.layers = [DynamicLayer(), DynamicSlidingWindowLayer(sliding_window=4)]
    for layer in sliding.layers:
        layer.update(columns(1, 2), columns(1, 2))
    assert not hf_cache.make_growing(sliding, limit=10)
    assert type(sliding.layers[0]) is DynamicLayer  # nothing changed

    empty = DynamicCache()
    empty.layers = [DynamicLayer()]
    assert not hf_cache.make_growing(empty, limit=10)
