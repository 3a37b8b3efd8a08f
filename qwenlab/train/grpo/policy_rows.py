"""The policy's LoRA added per row by the native decode stack during a rollout (no merge into the weights).

Merging the policy into the base for a rollout (GRPOLearner.rollouts with merge_for_generation) is exact only in
fp32: merged into bf16 weights and taken out again, every step would leave the base a little changed. Over a bf16
base, each decode step's LoRA deltas are instead added per row by the decode stack (lora_bgmv, the same path
serve's per-row adapters take), from fp32 copies of the policy's A and B made when the rollout starts.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from qwenlab.adapters.apply import lora_modules
from qwenlab.native import lora_bits
from qwenlab.quant.native import lora_table


class _PolicyStack:
    """One LoRALinear's policy in lora_bgmv's layout: A [1, R, in] and scaled Bᵀ [1, R, out], fp32."""

    def __init__(self, module: nn.Module, name: str):
        a = module.lora_A[name].detach().float()
        self.a = a[None].contiguous()
        self.bt = (module.lora_B[name].detach().float() * module.scaling[name]).t()[None].contiguous()
        self.rank, self.count, self.bits, self.active = a.shape[0], 1, lora_bits(torch.float32), True
        self.a_ptr, self.bt_ptr = self.a.data_ptr(), self.bt.data_ptr()
        self.a_len, self.bt_len = self.a.numel(), self.bt.numel()


class PolicyRows:
    """`model.row_adapters` for one rollout of `rows` rows, every row on adapter `name` (see run_decode_stack)."""

    def __init__(self, model: nn.Module, name: str, rows: int):
        self.stacks = {m: _PolicyStack(m, name) for m in lora_modules(model).values()
                       if name in m.lora_A and name not in m.merged}
        self.row_adapter = torch.zeros(rows, dtype=torch.int32)
        self._table = None

    def native_deltas(self, stack):
        if self._table is None or self._table[0] is not stack:
            self._table = (stack, lora_table(stack.wrapped, self.stacks))
        return self._table[1], self.row_adapter


@contextmanager
def policy_rows(model: nn.Module, name: str, rows: int) -> Iterator[None]:
    """Inside the block, a decode step on the native stack adds adapter `name`'s deltas to each of `rows` rows."""
    model.row_adapters = PolicyRows(model, name, rows)
    try:
        yield
    finally:
        del model.row_adapters
