"""The auto activation-checkpointing rule's estimate bounds what LoRA training really keeps, without
overstating it much (an overstated estimate recomputes layers, ~30% of a step, for nothing)."""

from __future__ import annotations

import pytest
import torch

from qwenlab.adapters import active_adapters
from qwenlab.model import load_model
from qwenlab.train.activations import kept_activation_bytes
from qwenlab.train.grpo.loss import selected_token_logprobs
from qwenlab.train.grpo.policy import POLICY, LoraSettings, attach_policy, new_lora


def saved_bytes(model, tokens: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for one LoRA training forward."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    mask = torch.ones(tokens.shape[0], tokens.shape[1] - 1)
    with active_adapters(model, POLICY), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model.final_hidden(tokens)
        selected_token_logprobs(hidden, model.head_weight, tokens, mask).sum()
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_estimate_bounds_the_kept_activations(tiny_model_dir, dtype):
    model = load_model(tiny_model_dir, dtype)
    attach_policy(model, new_lora(model, LoraSettings(rank=2)))  # r/hidden about as small as real models'
    for module in model.modules():
        if hasattr(module, "lora_A"):
            module.compute_dtype = dtype if dtype != torch.float32 else None
    model.train()
    tokens = torch.randint(0, 200, (4, 33))
    kept = saved_bytes(model, tokens)
    estimate = kept_activation_bytes(model.config, tuple(tokens.shape), dtype)
    assert kept <= estimate <= 1.6 * kept, (kept, estimate)
