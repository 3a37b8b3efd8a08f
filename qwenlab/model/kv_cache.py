"""The KV cache: the small protocol the model core needs, and KVCache, its preallocated form.

Rows of a batch share slot indices (left padding aligns them); `valid` marks which slots hold
real tokens, so padded slots are never attended.
"""

from __future__ import annotations

from typing import Protocol

import torch


class KVCacheProtocol(Protocol):
    """What Qwen2ForCausalLM.forward reads and calls (serve's BatchKVCache is another implementation).

    length: slots [0, length) are filled; capacity: slots allocated per row.
    valid: bool [B, capacity], which slots hold a row's real tokens; has_padding: any invalid slot so far.
    reserve(valid [B, T]) claims the next T slots; write(layer, start, k, v) stores and returns all so far.
    slot_buffers(): per layer (keys, values) [B, Hkv, capacity, D] holding row r at row r and slot s at
    slot s, for code that addresses the cache directly (qwenlab.quant's native decode); None where the
    cache's storage is not that simple.
    """

    length: int
    capacity: int

    @property
    def valid(self) -> torch.Tensor: ...

    @property
    def has_padding(self) -> bool: ...

    def reserve(self, valid: torch.Tensor) -> int: ...

    def write(self, layer: int, start: int, keys: torch.Tensor,
              values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def slot_buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None: ...


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype = torch.float32):
        shape = (batch, num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool)
        self.capacity = capacity
        self.length = 0  # slots [0, length) are filled
        self.has_padding = False

    @classmethod
    def for_model(cls, config, batch: int, capacity: int, dtype: torch.dtype) -> "KVCache":
        return cls(config.num_hidden_layers, batch, config.num_key_value_heads, capacity, config.head_dim, dtype)

    def reserve(self, valid: torch.Tensor) -> int:
        """Claim the next `valid.shape[1]` slots for a forward pass; returns the start slot."""
        start, steps = self.length, valid.shape[1]
        if start + steps > self.capacity:
            raise ValueError(f"KV cache full: {start} + {steps} > capacity {self.capacity}")
        self.valid[:, start:start + steps] = valid
        if not bool(valid.all()):
            self.has_padding = True
        self.length = start + steps
        return start

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k/v at [start, start+T) and return views of everything so far."""
        end = start + keys.shape[2]
        self.keys[layer][:, :, start:end] = keys
        self.values[layer][:, :, start:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def slot_buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self.keys, self.values))

    def select_rows(self, rows: torch.Tensor) -> "KVCache":
        """A new cache whose row i is a copy of this cache's row rows[i] (same capacity and length): prompts
        shared by several rows are prefilled once and copied (generate's duplicate prompts, GRPO's groups)."""
        copy = KVCache.__new__(KVCache)
        copy.keys = [k.index_select(0, rows) for k in self.keys]
        copy.values = [v.index_select(0, rows) for v in self.values]
        copy.valid = self.valid.index_select(0, rows)
        copy.capacity, copy.length, copy.has_padding = self.capacity, self.length, self.has_padding
        return copy

    def reset(self) -> None:
        self.length = 0
        self.valid.zero_()
        self.has_padding = False


def leading_padding(cache: KVCacheProtocol) -> torch.Tensor | None:
    """Per row, its count of leading padding slots (int64 [B]) where every row's valid slots are exactly
    [start, length) with start < length (left-padded prompts); None where a row has a padding or dead slot
    after one of its tokens, or no token at all. The native decode kernels take these as per-row starts."""
    length = cache.length
    if length == 0:
        return None
    valid = cache.valid[:, :length]
    starts = length - valid.sum(dim=1)
    if bool((starts >= length).any()) or not torch.equal(valid, torch.arange(length)[None, :] >= starts[:, None]):
        return None
    return starts.to(torch.int64).contiguous()
