"""fast_linear: oneDNN for fp32 inference, F.linear wherever a gradient or another dtype is involved."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import pytest

from qwenlab.model import linear as linear_module
from qwenlab.model.linear import Linear, fast_linear


@pytest.fixture(autouse=True)
def onednn_for_every_size(monkeypatch):
    """The tests' weights are small; lower the size threshold so they take the oneDNN path."""
    assert linear_module.ONEDNN, "this torch build has no oneDNN linear: fast_linear is F.linear everywhere"
    monkeypatch.setattr(linear_module, "ONEDNN_MIN_WEIGHT", 0)


def test_fast_linear_matches_f_linear_for_decode_and_prefill_shapes():
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 64), torch.randn(96)
    for shape in [(1, 1, 64), (8, 1, 64), (2, 17, 64), (5, 64)]:
        x = torch.randn(*shape)
        with torch.inference_mode():
            out = fast_linear(x, weight, bias)
        assert out.shape == (*shape[:-1], 96)
        torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_a_real_size_weight_takes_the_same_numbers(monkeypatch):
    monkeypatch.setattr(linear_module, "ONEDNN_MIN_WEIGHT", 512 * 1024)
    torch.manual_seed(0)
    weight, x = torch.randn(1024, 896), torch.randn(8, 1, 896)
    with torch.inference_mode():
        torch.testing.assert_close(fast_linear(x, weight), F.linear(x, weight), rtol=1e-4, atol=1e-4)


def test_non_contiguous_input_is_handled():
    weight = torch.randn(32, 48)
    x = torch.randn(4, 48, 3).transpose(1, 2)  # [4, 3, 48], not contiguous
    with torch.no_grad():
        torch.testing.assert_close(fast_linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_gradients_flow_when_the_input_needs_them():
    torch.manual_seed(0)
    layer = Linear(16, 8)
    layer.requires_grad_(False)
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).square().sum().backward()
    expected = (2 * F.linear(x, layer.weight, layer.bias)) @ layer.weight
    torch.testing.assert_close(x.grad, expected.detach())


def test_bf16_and_state_dict_are_plain_linear():
    layer = Linear(16, 8, bias=True)
    assert set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 16).bfloat16()
    layer = layer.bfloat16()
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
