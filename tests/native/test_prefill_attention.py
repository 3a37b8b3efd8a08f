"""qwenlab_prefill_attention: a prompt's RoPE, cache writes and causal attention in one call, equal to PyTorch's
(the model core's RoPE formula and SDPA with the core's mask) on odd shapes: T of 1, T that is not a whole query
block (16) or key block (64), a start after cached slots, leading padding that ends inside the prompt (padding
queries see themselves only), GQA groups of 1, 6 and 7, head sizes 16 to 128, q/k/v as slices of one fused row.
Bad sizes are refused before the cache is touched; shapes the kernel does not take come back as None."""

import pytest
import torch
import torch.nn.functional as F

from qwenlab import native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernel: {native.unavailable_reason()}")


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def case(b, t, hq, hkv, d, start, cap, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, t, (hq + 2 * hkv) * d, generator=g)
    angles = torch.rand(b, 1, t, d // 2, generator=g).mul(6.0).repeat(1, 1, 1, 2)
    keys, values = torch.randn(b, hkv, cap, d, generator=g), torch.randn(b, hkv, cap, d, generator=g)
    return qkv, angles.cos().contiguous(), angles.sin().contiguous(), keys, values


def reference(qkv, cos, sin, keys, values, start, hq, starts):
    """The model core's path: RoPE on [B, H, T, D] heads, the cache write, SDPA under the core's mask (a key is
    allowed from the row's first real slot up to the query's own slot; a padding query sees itself)."""
    b, t, _ = qkv.shape
    hkv, cap, d = keys.shape[1:]
    q = rope(qkv[..., :hq * d].reshape(b, t, hq, d).transpose(1, 2), cos, sin)
    k = rope(qkv[..., hq * d:(hq + hkv) * d].reshape(b, t, hkv, d).transpose(1, 2), cos, sin)
    v = qkv[..., (hq + hkv) * d:].reshape(b, t, hkv, d).transpose(1, 2)
    keys, values = keys.clone(), values.clone()
    keys[:, :, start:start + t], values[:, :, start:start + t] = k, v
    query = torch.arange(start, start + t)[:, None]
    key = torch.arange(start + t)[None, :]
    first = torch.tensor(starts if starts is not None else [0] * b)
    allowed = (key <= query)[None] & (key[None] >= first[:, None, None])
    allowed |= (key == query)[None]
    out = F.scaled_dot_product_attention(q, keys[:, :, :start + t], values[:, :, :start + t],
                                         attn_mask=allowed[:, None], enable_gqa=True)
    return out.transpose(1, 2).reshape(b, t, hq * d), keys, values


def split(qkv, hq, hkv, d):
    return qkv[..., :hq * d], qkv[..., hq * d:(hq + hkv) * d], qkv[..., (hq + hkv) * d:]


@pytest.mark.parametrize("b,t,hq,hkv,d,start,cap,starts", [
    (1, 1, 2, 2, 16, 0, 1, None),  # one token, one slot
    (1, 37, 14, 2, 64, 0, 40, None),  # the 0.5B heads; T not a whole query block
    (2, 130, 12, 2, 128, 0, 131, None),  # the 1.5B heads; keys over two whole blocks and a tail
    (1, 50, 7, 1, 48, 77, 200, None),  # after 77 cached slots (a second chunk of a prompt); D 48: a 3-vector tail
    (3, 21, 4, 2, 32, 0, 21, [0, 5, 20]),  # leading padding; the last row's only real token is the last one
    (2, 70, 6, 6, 80, 3, 100, [1, 40]),  # no grouping; padding past the cached slots into the prompt
])
def test_equals_pytorch(b, t, hq, hkv, d, start, cap, starts):
    qkv, cos, sin, keys, values = case(b, t, hq, hkv, d, start, cap)
    want, want_keys, want_values = reference(qkv, cos, sin, keys, values, start, hq, starts)
    got_keys, got_values = keys.clone(), values.clone()
    q, k, v = split(qkv, hq, hkv, d)
    got = native.prefill_attention(q, k, v, cos, sin, got_keys, got_values, start, hq,
                                   torch.tensor(starts, dtype=torch.int64) if starts is not None else None)
    assert got is not None and got.shape == (b, t, hq * d)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(got_keys, want_keys, rtol=1e-6, atol=1e-6)  # the prompt's slots, RoPE'd
    assert torch.equal(got_values, want_values)  # and nothing else touched


def test_separate_contiguous_projections_equal_fused_slices():
    """The float models pass q, k and v as three tensors (LoRA may wrap each projection): same result."""
    qkv, cos, sin, keys, values = case(2, 19, 4, 2, 64, 2, 30, seed=3)
    q, k, v = split(qkv, 4, 2, 64)
    fused = native.prefill_attention(q, k, v, cos, sin, keys.clone(), values.clone(), 2, 4)
    separate = native.prefill_attention(q.contiguous(), k.contiguous(), v.contiguous(), cos, sin, keys.clone(),
                                        values.clone(), 2, 4)
    assert torch.equal(fused, separate)


def test_bad_sizes_are_refused_before_the_cache_is_touched():
    qkv, cos, sin, keys, values = case(1, 8, 4, 2, 16, 0, 8)
    q, k, v = split(qkv, 4, 2, 16)
    before = keys.clone()
    with pytest.raises(native.KernelArgumentError):  # start + T past the cache's capacity
        native.prefill_attention(q, k, v, cos, sin, keys, values, 1, 4)
    with pytest.raises(native.KernelArgumentError):  # a row's first real slot after its last token
        native.prefill_attention(q, k, v, cos, sin, keys, values, 0, 4, torch.tensor([8]))
    with pytest.raises(native.KernelArgumentError):  # cos for fewer tokens than q has
        native.prefill_attention(q, k, v, cos[:, :, :4].contiguous(), sin[:, :, :4].contiguous(), keys, values, 0, 4)
    assert torch.equal(keys, before)


def test_what_the_kernel_does_not_take_comes_back_as_none():
    qkv, cos, sin, keys, values = case(1, 8, 4, 2, 24, 0, 8)  # D 24: not a multiple of 16
    assert native.prefill_attention(*split(qkv, 4, 2, 24), cos, sin, keys, values, 0, 4) is None
    qkv, cos, sin, keys, values = case(1, 8, 4, 2, 16, 0, 8)
    q, k, v = split(qkv, 4, 2, 16)
    assert native.prefill_attention(q.bfloat16(), k, v, cos, sin, keys, values, 0, 4) is None  # not fp32
    assert native.prefill_attention(q.requires_grad_(), k, v, cos, sin, keys, values, 0, 4) is None  # autograd
