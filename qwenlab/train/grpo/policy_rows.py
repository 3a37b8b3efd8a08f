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
from qwenlab.quant.native import LoraKernelStack, lora_table


class PolicyRows:
    """`model.row_adapters` for one rollout of `rows` rows, every row on adapter `name` (see run_decode_stack)."""

    def __init__(self, model: nn.Module, name: str, rows: int):
        self.stacks = {m: LoraKernelStack(m, [name]) for m in lora_modules(model).values()
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
