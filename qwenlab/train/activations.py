"""When a training forward should recompute its layers in the backward (activation checkpointing "auto")."""

from __future__ import annotations

import torch

from qwenlab.model.qwen2 import MATMUL_ATTENTION_MAX_TOKENS

ACTIVATION_BUDGET_BYTES = 2 << 30  # recompute above this much kept per micro-batch


def kept_activation_bytes(config, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> int:
    """An upper estimate of what autograd keeps for a [batch, length] micro-batch of a LoRA-trained Qwen2 model whose
    weights are `dtype`: per token and layer ~10 hidden-sized tensors (norms, q/k/v, attention, residuals) and 2
    intermediate-sized ones (the fused LoRA MLP keeps gate and up; adapters/fused_mlp.py). Measured on the 0.5B
    shape, 616 tokens (tests/train/test_activations.py holds the bound on a tiny model): fp32 0.92 GB kept for 1.10
    estimated, bf16 0.53 for 0.66 (its norms keep fp32 copies). bf16's short sequences also keep their attention
    weights (model/qwen2.causal_attention_by_matmul): fp32 and bf16 copies, per head and pair of positions."""
    batch, length = shape
    tokens = batch * length
    element = torch.empty((), dtype=dtype).element_size()
    per_layer = element * (10 * config.hidden_size + 2 * config.intermediate_size)
    if element < 4:  # the two RMSNorms normalise an fp32 copy of their input, and keep it
        per_layer += 4 * 2 * config.hidden_size
        if length <= MATMUL_ATTENTION_MAX_TOKENS:
            per_layer += (4 + element) * config.num_attention_heads * length
    return tokens * config.num_hidden_layers * per_layer


def over_activation_budget(config, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> bool:
    return kept_activation_bytes(config, shape, dtype) > ACTIVATION_BUDGET_BYTES
