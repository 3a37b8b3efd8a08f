"""A KV cache whose rows join and leave between decode steps (continuous batching).

It keeps the model core's contract (model/kv_cache.KVCacheProtocol): every
row writes its new token at the same slot `length`, and a per-row `valid` mask says which earlier
slots hold that row's tokens. Slots are not positions (RoPE positions are passed per row and
baked into the keys), so a row's prompt may sit at any slots before `length`:

    row 0: [. . a a a a a a]     a, b: a request's tokens; . : padding slots (masked)
    row 1: [. . . . b b b b]     a newcomer is right-aligned so its last token is at length-1

Active rows are packed at the front ([0, rows)), so the forward pass only sees `keys[:rows]`
(a view, no copy). A newcomer longer than the batch moves the older rows right, so that every row's
padding stays leading (no dead slot after a token): the native decode stack (quant/) then runs each step
on these buffers directly, each row from its first valid slot. `compact` reclaims leading padding that
every row has (rows that left), right-aligning every row.
"""

from __future__ import annotations

import torch

from qwenlab.model.kv_cache import KVCache, leading_padding


class BatchKVCache:
    def __init__(self, config, max_rows: int, max_slots: int, dtype: torch.dtype, initial_slots: int = 256):
        self.num_layers = config.num_hidden_layers
        self.kv_shape = (config.num_key_value_heads, config.head_dim)
        self.max_rows, self.max_slots, self.dtype = max_rows, max_slots, dtype
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._valid = torch.zeros(max_rows, 0, dtype=torch.bool)
        self.rows = 0
        self.length = 0
        self._layout: tuple | None = None
        self._grow(min(initial_slots, max_slots))

    # ---- the model core's interface ----------------------------------------------------
    @property
    def valid(self) -> torch.Tensor:
        return self._valid[: self.rows]

    @property
    def has_padding(self) -> bool:
        return not bool(self.valid[:, : self.length].all())

    def reserve(self, valid: torch.Tensor) -> int:
        start, steps = self.length, valid.shape[1]
        if start + steps > self.capacity:  # the engine calls make_room first; this is a bug guard
            raise RuntimeError(f"batch KV cache full: {start} + {steps} > {self.capacity}")
        self._valid[: self.rows, start:start + steps] = valid
        self.length = start + steps
        return start

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor):
        end, rows = start + keys.shape[2], self.rows
        self.keys[layer][:rows, :, start:end] = keys
        self.values[layer][:rows, :, start:end] = values
        return self.keys[layer][:rows, :, :end], self.values[layer][:rows, :, :end]

    def slot_buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per layer the packed rows' (keys, values) [rows, Hkv, capacity, D], for code that addresses slots
        directly (the native decode stack: every row writes slot `length` and attends to slots start..length,
        its start the count of its leading padding slots, model.kv_cache.leading_padding). Only when every
        row's padding is leading, so that the slots from its start are exactly the row's own tokens, which
        add_row keeps true (a longer newcomer moves the older rows right); None for an empty batch."""
        if self.rows == 0 or (self.has_padding and leading_padding(self) is None):
            return None
        layout = (self.rows, self.capacity, self.keys[0].data_ptr())
        if layout != self._layout:  # quant's DecodeStack keeps a table of these addresses on its cache
            self.__dict__.pop("native_decode_table", None)
            self._layout = layout
        return [(k[: self.rows], v[: self.rows]) for k, v in zip(self.keys, self.values)]

    # ---- rows joining and leaving ---------------------------------------------------------
    def add_row(self, source: KVCache, source_row: int) -> int:
        """Copy a prefilled row of `source` in, right-aligned to end at `length`; returns its row."""
        if self.rows >= self.max_rows:
            raise RuntimeError("no free row in the batch KV cache")
        span = source.length
        if span > self.length:  # the newcomer is longer than the batch: the older rows move right
            self._ensure_capacity(span)
            self._shift_rows_right(span - self.length)
            self.length = span
        row, begin = self.rows, self.length - span
        for layer in range(self.num_layers):
            self.keys[layer][row, :, begin:self.length] = source.keys[layer][source_row, :, :span]
            self.values[layer][row, :, begin:self.length] = source.values[layer][source_row, :, :span]
        self._valid[row] = False
        self._valid[row, begin:self.length] = source.valid[source_row, :span]
        self.rows += 1
        return row

    def _shift_rows_right(self, by: int) -> None:
        """Move every row's slots `by` to the right, the gap becoming leading padding. Without it the older
        rows would get dead slots after their tokens, and every step until compact() would leave the
        one-call native decode stack for the per-layer path; this costs one copy of the live KV."""
        rows, length = self.rows, self.length
        if rows and length:
            for table in (self.keys, self.values):
                for layer in range(self.num_layers):
                    buffer = table[layer]
                    buffer[:rows, :, by:by + length] = buffer[:rows, :, :length].clone()
            self._valid[:rows, by:by + length] = self._valid[:rows, :length].clone()
        self._valid[:rows, :by] = False

    def remove_row(self, row: int) -> int | None:
        """Free `row` by moving the last row into it; returns the moved row's old index (or None)."""
        last = self.rows - 1
        moved = None
        if row != last:
            for layer in range(self.num_layers):
                self.keys[layer][row, :, : self.length] = self.keys[layer][last, :, : self.length]
                self.values[layer][row, :, : self.length] = self.values[layer][last, :, : self.length]
            self._valid[row] = self._valid[last]
            moved = last
        self._valid[last] = False
        self.rows = last
        if self.rows == 0:
            self.length = 0
        return moved

    def row_slots(self, row: int) -> torch.Tensor:
        """The slots that hold `row`'s tokens, in order (a row's slots may have gaps of dead slots)."""
        return self._valid[row, : self.length].nonzero().flatten()

    def row_kv(self, row: int, slots: torch.Tensor) -> torch.Tensor:
        """`row`'s keys and values at `slots`: [layers, 2, kv heads, len(slots), head dim] (a copy)."""
        return torch.stack([torch.stack((k[row].index_select(1, slots), v[row].index_select(1, slots)))
                            for k, v in zip(self.keys, self.values)])

    # ---- room for the next step ------------------------------------------------------------
    def make_room(self, steps: int) -> None:
        """Ensure `steps` more slots fit: first reclaim dead slots, then grow (up to max_slots)."""
        if self.length + steps <= self.capacity:
            return
        self.compact()
        self._ensure_capacity(self.length + steps)

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        if needed > self.max_slots:
            raise RuntimeError(f"batch KV cache needs {needed} slots; the limit is {self.max_slots}")
        self._grow(min(self.max_slots, max(needed, 2 * self.capacity)))

    def compact(self) -> None:
        """Right-align every row's valid slots at the left of the cache, dropping dead slots."""
        if self.rows == 0:
            self.length = 0
            return
        valid = self.valid[:, : self.length]
        counts = valid.sum(dim=1)
        new_length = int(counts.max())
        if new_length == self.length:
            return
        # A stable sort puts each row's dead slots first and its valid slots last, in order.
        order = torch.sort(valid.to(torch.uint8), dim=1, stable=True).indices[:, self.length - new_length:]
        index = order[:, None, :, None].expand(self.rows, *self.kv_shape[:1], new_length, self.kv_shape[1])
        for layer in range(self.num_layers):
            for table in (self.keys, self.values):
                moved = table[layer][: self.rows, :, : self.length].gather(2, index)
                table[layer][: self.rows, :, :new_length] = moved
        slots = torch.arange(new_length)
        self._valid[:, new_length:] = False
        self._valid[: self.rows, :new_length] = slots[None, :] >= (new_length - counts)[:, None]
        self.length = new_length

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        shape = (self.max_rows, self.kv_shape[0], extra, self.kv_shape[1])
        if not self.keys:
            self.keys = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.num_layers)]
            self.values = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.num_layers)]
        else:
            self.keys = [torch.cat((k, torch.zeros(shape, dtype=self.dtype)), dim=2) for k in self.keys]
            self.values = [torch.cat((v, torch.zeros(shape, dtype=self.dtype)), dim=2) for v in self.values]
        self._valid = torch.cat((self._valid, torch.zeros(self.max_rows, extra, dtype=torch.bool)), dim=1)
        self.capacity = capacity
