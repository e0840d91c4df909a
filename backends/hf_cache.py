"""A KV cache for the running batch that grows in place instead of copying every step.

transformers' ``DynamicLayer`` appends a step's keys and values with ``torch.cat``:
every decode step allocates the whole layer's cache anew and frees the old one. For
a batch of long rows that is most of a step's time (the cache is copied once per
token) and, on the CPU, a heap left full of freed blocks each a little too small for
the next step's, so the process holds far more than the cache.

``GrowingLayer`` keeps each layer's keys and values in a buffer with room for
``room`` more columns, exposes the live columns as views (what attention reads) and
writes each step into the room. When the room runs out the live columns move to a
new buffer with room again: one copy per ``room`` steps. The room never reaches past
``limit``, the most columns the batch's rows can ever need (their prompts plus their
token budgets), so the buffer stays within what the batcher admitted against the
instance's KV reservation (rows × the longest row).

Only plain full-attention layers are replaced; caches of other kinds (sliding
windows, linear attention) are left as the model built them.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

DEFAULT_ROOM = 128  # columns of room: one copy of the cache per this many steps


class GrowingLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    """One layer's keys and values ``[rows, heads, columns, head_dim]``, with room.

    ``keys`` / ``values`` are views of the live columns ``start:end`` of the buffers.
    Code that assigns ``keys`` directly (transformers' own helpers) is still right:
    the next ``update`` notices the assignment and moves what was assigned into a
    buffer of its own.
    """

    _key_buffer: torch.Tensor
    _value_buffer: torch.Tensor
    _key_view: torch.Tensor
    _value_view: torch.Tensor
    _start: int  # live columns are start:end of the buffers
    _end: int

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, limit: int, room: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.limit = limit
        self.room = room
        self._place(keys, values, more=0)  # sets the buffers, their bounds and views

    @property
    def capacity(self) -> int:
        """Columns the buffers hold, live and room."""
        return int(self._key_buffer.shape[-2])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a pass's columns; returns every live column (called by attention)."""
        new = key_states.shape[-2]
        keys, values = self.keys, self.values
        if keys is None or values is None:  # reset from outside: start from nothing
            self._place(key_states[:, :, :0], value_states[:, :, :0], more=new)
        elif keys is not self._key_view or values is not self._value_view:
            self._place(keys, values, more=0)  # assigned from outside
        if self._end + new > self.capacity:
            self._place(self._key_view, self._value_view, more=new)
        self._key_buffer[:, :, self._end : self._end + new].copy_(key_states)
        self._value_buffer[:, :, self._end : self._end + new].copy_(value_states)
        self._end += new
        self._publish()
        return self._key_view, self._value_view

    def append_rows(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add rows below the running ones; both sides right-aligned, padded with zeros
        on the left to the wider one's columns (padding is masked, never read as 0/0)."""
        old, new = self._end - self._start, keys.shape[-2]
        width = max(old, new)
        rows = self._key_buffer.shape[0] + keys.shape[0]
        combined: list[torch.Tensor] = []
        for mine, theirs in ((self._key_view, keys), (self._value_view, values)):
            shape = (rows, mine.shape[1], self._capacity_for(width), mine.shape[3])
            buffer = torch.empty(shape, dtype=mine.dtype, device=mine.device)
            split = mine.shape[0]
            buffer[:split, :, : width - old].zero_()
            buffer[:split, :, width - old : width].copy_(mine)
            buffer[split:, :, : width - new].zero_()
            buffer[split:, :, width - new : width].copy_(theirs)
            combined.append(buffer)
        self._key_buffer, self._value_buffer = combined
        self._start, self._end = 0, width
        self._publish()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices`` only, in new buffers sized for them."""
        live_keys, live_values = self._key_view, self._value_view
        self._place(live_keys.index_select(0, indices), live_values.index_select(0, indices), 0)

    def drop_front(self, columns: int) -> None:
        """Forget the first ``columns`` live columns (padding every row has); no copy."""
        self._start = min(self._start + columns, self._end)
        self._publish()

    def _capacity_for(self, columns: int) -> int:
        return max(columns, min(columns + self.room, self.limit))

    def _place(self, keys: torch.Tensor, values: torch.Tensor, more: int) -> None:
        """Move live columns ``keys``/``values`` into new buffers with room for ``more``."""
        columns = keys.shape[-2]
        capacity = self._capacity_for(columns + more)
        buffers: list[torch.Tensor] = []
        for live in (keys, values):
            shape = (live.shape[0], live.shape[1], capacity, live.shape[3])
            buffer = torch.empty(shape, dtype=live.dtype, device=live.device)
            buffer[:, :, :columns].copy_(live)
            buffers.append(buffer)
        self._key_buffer, self._value_buffer = buffers
        self._start, self._end = 0, columns
        self.is_initialized = True
        self._publish()

    def _publish(self) -> None:
        self._key_view = self._key_buffer[:, :, self._start : self._end]
        self._value_view = self._value_buffer[:, :, self._start : self._end]
        self.keys, self.values = self._key_view, self._value_view


def is_growing(cache: Any) -> bool:
    """Whether every layer of ``cache`` is a growing one (rows can be merged into it)."""
    layers: list[Any] = list(getattr(cache, "layers", None) or [])
    return bool(layers) and all(isinstance(layer, GrowingLayer) for layer in layers)


def make_growing(cache: Any, limit: int, room: int | None = None) -> bool:
    """Turn ``cache``'s layers into growing ones, in place, where every layer is plain
    full attention holding ``[rows, heads, columns, head_dim]`` tensors; else False,
    and nothing changed."""
    layers: list[Any] = list(getattr(cache, "layers", None) or [])
    if not layers or any(
        type(layer) is not DynamicLayer or layer.keys is None or layer.keys.dim() != 4
        for layer in layers
    ):
        return False
    room = DEFAULT_ROOM if room is None else room
    cache.layers = [GrowingLayer(layer.keys, layer.values, limit, room) for layer in layers]
    return True


def set_limit(cache: Any, limit: int) -> None:
    """Tell growing layers the most columns the batch's rows can now need."""
    for layer in getattr(cache, "layers", None) or []:
        if isinstance(layer, GrowingLayer):
            layer.limit = limit
