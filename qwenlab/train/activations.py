"""When a training forward should recompute its layers in the backward (activation checkpointing "auto")."""

from __future__ import annotations

ACTIVATION_BUDGET_BYTES = 2 << 30  # recompute above this much kept per micro-batch


def kept_activation_bytes(config, tokens: int) -> int:
    """What autograd keeps for `tokens` positions of a Qwen2 model, fp32: per token and layer ~10 hidden-sized and
    ~4 intermediate-sized tensors (norms, q/k/v, attention, residuals; gate, up, their product, silu)."""
    return tokens * 4 * config.num_hidden_layers * (10 * config.hidden_size + 4 * config.intermediate_size)


def over_activation_budget(config, tokens: int) -> bool:
    return kept_activation_bytes(config, tokens) > ACTIVATION_BUDGET_BYTES
