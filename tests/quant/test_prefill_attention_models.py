"""The quantized and native float models run a prompt's attention through native.prefill_attention, and their
logits equal the PyTorch path's (the same model with the kernel turned off) for a plain prompt, a left-padded
batch, and a second chunk after cached slots; where the cache has padding after a row's tokens, the model takes
PyTorch's path."""

import pytest
import torch

import qwenlab.native as native
from qwenlab.loading import load

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernel: {native.unavailable_reason()}")


def prefill_twice(model, tokens, valid, more):
    """Logits of a prefill of `tokens` (left padding where `valid` is False), then of `more` tokens after it."""
    cache = model.new_cache(tokens.shape[0], tokens.shape[1] + more.shape[1])
    with torch.inference_mode():
        first = model(tokens, cache=cache, valid=valid)
        second = model(more, cache=cache)
    return first, second


@pytest.fixture
def models(tiny32_dir, quantized_dirs):
    return {"int8": load(quantized_dirs[8], "int8").model, "int4": load(quantized_dirs[4], "int4").model,
            "fp32": load(tiny32_dir, "fp32").model, "bf16": load(tiny32_dir, "bf16").model}


@pytest.mark.parametrize("name", ["int8", "int4", "fp32", "bf16"])
@pytest.mark.parametrize("padded", [False, True])
def test_native_prefill_attention_equals_pytorchs_path(models, name, padded, monkeypatch):
    model = models[name]
    g = torch.Generator().manual_seed(0)
    tokens, more = torch.randint(0, 300, (3, 23), generator=g), torch.randint(0, 300, (3, 5), generator=g)
    valid = torch.ones(3, 23, dtype=torch.bool)
    if padded:  # rows of 23, 9 and 1 real tokens
        valid[1, :14] = valid[2, :22] = False
    calls = []
    kernel = native.prefill_attention
    monkeypatch.setattr(native, "prefill_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    got = prefill_twice(model, tokens, valid, more)
    assert len(calls) == 2 * model.config.num_hidden_layers  # every layer, both chunks, took the kernel
    monkeypatch.setattr(native, "prefill_attention", lambda *a, **k: None)
    want = prefill_twice(model, tokens, valid, more)
    for a, b in zip(got, want):
        rows = valid[:, -1]  # (every row's last position is real)
        torch.testing.assert_close(a[rows], b[rows], rtol=1e-4, atol=1e-4)


def test_padding_after_a_rows_tokens_takes_pytorchs_path(models, monkeypatch):
    model = models["int8"]
    calls = []
    kernel = native.prefill_attention
    monkeypatch.setattr(native, "prefill_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    tokens = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(1))
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[0, 5] = False  # a hole after the row's first tokens: not leading padding
    cache = model.new_cache(2, 8)
    with torch.inference_mode():
        logits = model(tokens, cache=cache, valid=valid)
    assert calls == [] and bool(logits.isfinite().all())
