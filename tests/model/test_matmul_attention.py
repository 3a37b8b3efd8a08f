"""bf16 training's short-sequence attention (two matmuls, model/qwen2.causal_attention_by_matmul) against SDPA:
the same outputs and gradients on odd shapes with grouped KV heads, and the model takes it only where it pays."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenlab.model import load_model
from qwenlab.model import qwen2
from qwenlab.model.qwen2 import MATMUL_ATTENTION_MAX_TOKENS, causal_attention_by_matmul


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch, heads, kv_heads, tokens, dim", [(1, 6, 2, 13, 16), (3, 14, 2, 77, 64),
                                                                 (2, 4, 4, 2, 8), (1, 2, 1, 161, 64)])
def test_matches_sdpa_forward_and_backward(dtype, batch, heads, kv_heads, tokens, dim):
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, h, tokens, dim, dtype=dtype, requires_grad=True)
               for h in (heads, kv_heads, kv_heads))
    weights = torch.randn(batch, heads, tokens, dim)
    results = []
    for attend in (causal_attention_by_matmul,
                   lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                  enable_gqa=heads != kv_heads)):
        out = attend(q, k, v)
        q.grad = k.grad = v.grad = None
        (out.float() * weights).sum().backward()
        results.append([out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()])
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    for ours, sdpa in zip(*results):
        torch.testing.assert_close(ours, sdpa, **tolerance)


def test_the_model_takes_it_for_short_bf16_training_sequences_only(tiny_model_dir, monkeypatch):
    calls = []
    original = qwen2.causal_attention_by_matmul
    monkeypatch.setattr(qwen2, "causal_attention_by_matmul", lambda *a: calls.append(a[0].shape) or original(*a))
    model = load_model(tiny_model_dir, torch.bfloat16)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)  # a gradient flows through attention
    short = torch.randint(0, 200, (2, 9))
    model.final_hidden(short).float().sum().backward()
    assert len(calls) == model.config.num_hidden_layers
    calls.clear()
    with torch.no_grad():
        model.final_hidden(short)  # inference: SDPA
    model.final_hidden(torch.randint(0, 200, (1, MATMUL_ATTENTION_MAX_TOKENS + 1))).float().sum().backward()
    fp32 = load_model(tiny_model_dir, torch.float32)
    fp32.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    fp32.final_hidden(short).sum().backward()
    assert calls == []
