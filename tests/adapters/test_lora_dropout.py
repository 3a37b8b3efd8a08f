"""LoRA dropout: each element kept with probability 1 - p, independently, scaled as nn.Dropout; the backward
uses the forward's mask; LoRALinear drops only in train() mode."""

from __future__ import annotations

import pytest
import torch

from qwenlab.adapters.dropout import keep_mask, lora_dropout
from qwenlab.adapters.lora_linear import LoRALinear


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_keep_rate_and_independence(p):
    torch.manual_seed(0)
    shape = torch.Size([613, 1001])  # odd count: the last 31-bit draw gives one element only
    keep = keep_mask(shape, p)
    assert keep.shape == shape and keep.dtype == torch.bool
    n = shape.numel()
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5 + 2 ** -15
    # both halves of the draws (low and high bits) keep at the same rate; neighbours are uncorrelated
    flat = keep.flatten().float()
    half = (n + 1) // 2
    assert abs(flat[:half].mean() - flat[half:].mean()) < 6 * (p * (1 - p) / half) ** 0.5
    centred = flat - flat.mean()
    correlation = (centred[:-1] * centred[1:]).mean() / centred.var()
    assert abs(correlation) < 0.01


def test_forward_scales_and_backward_uses_the_same_mask():
    torch.manual_seed(1)
    x = torch.randn(300, 200, requires_grad=True)
    y = lora_dropout(x, 0.2)
    dropped = y == 0
    assert 0.17 < dropped.float().mean() < 0.23
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.8)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, (~dropped).float() / 0.8)


def test_lora_linear_drops_in_train_mode_only():
    torch.manual_seed(2)
    module = LoRALinear(torch.nn.Linear(32, 16))
    module.add_adapter("a", torch.randn(4, 32), torch.randn(16, 4), 2.0)
    module.dropout = 0.5
    from qwenlab.adapters.lora_linear import Selection

    module.selection = Selection.build("a")
    x = torch.randn(8, 32)
    module.eval()
    torch.testing.assert_close(module(x), module(x))
    module.train()
    assert not torch.allclose(module(x), module(x))
