"""qwenlab_decode_attention (both its paths: per query head, and a kv head's query heads together) with per-row
starts: row b attends to slots starts[b]..pos only (its leading padding slots are never read: they hold NaN here), equal to PyTorch's masked attention on odd shapes;
starts outside [0, pos] are refused before the kernel touches the cache."""

import pytest
import torch

from qwenlab import native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernel: {native.unavailable_reason()}")


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def case(b, hq, hkv, d, cap, pos, starts, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, 1, (hq + 2 * hkv) * d, generator=g)
    angles = torch.randn(b, 1, 1, d // 2, generator=g).repeat(1, 1, 1, 2)
    cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
    keys, values = torch.randn(b, hkv, cap, d, generator=g), torch.randn(b, hkv, cap, d, generator=g)
    for row, start in enumerate(starts):  # padding slots: never read
        keys[row, :, :start] = float("nan")
        values[row, :, :start] = float("nan")
    return qkv, cos, sin, keys, values


def reference(qkv, cos, sin, keys, values, pos, hq, starts):
    """RoPE, the cache write at `pos`, and SDPA with a mask that allows slots starts[b]..pos per row."""
    b, hkv, cap, d = keys.shape
    keys, values = keys.clone(), values.clone()
    heads = qkv.view(b, hq + 2 * hkv, d)
    q = heads[:, :hq] * cos[:, 0] + rotate_half(heads[:, :hq]) * sin[:, 0]
    k = heads[:, hq:hq + hkv] * cos[:, 0] + rotate_half(heads[:, hq:hq + hkv]) * sin[:, 0]
    keys[:, :, pos], values[:, :, pos] = k, heads[:, hq + hkv:]
    slot = torch.arange(pos + 1)
    allowed = slot[None, :] >= torch.tensor(starts)[:, None]  # [B, S]
    k_all = keys[:, :, :pos + 1].repeat_interleave(hq // hkv, dim=1)
    v_all = values[:, :, :pos + 1].repeat_interleave(hq // hkv, dim=1)
    k_all = torch.where(allowed[:, None, :, None], k_all, 0.0)  # (SDPA would carry the NaN through 0 weights)
    v_all = torch.where(allowed[:, None, :, None], v_all, 0.0)
    out = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k_all, v_all,
                                                           attn_mask=allowed[:, None, None, :])
    return out.reshape(b, 1, hq * d), keys, values


@pytest.mark.parametrize("b,hq,hkv,d,cap,pos,starts", [
    (1, 3, 1, 18, 7, 4, [2]),  # one row, D past one vector with a tail
    (3, 6, 2, 18, 9, 5, [0, 3, 5]),  # rows with different starts, the last one's start == pos
    (2, 4, 2, 6, 4, 0, [0, 0]),  # the first slot: start == pos == 0
    (4, 2, 2, 34, 11, 10, [1, 10, 0, 7]),
    (3, 14, 2, 64, 700, 650, [0, 100, 650]),  # long enough that the (row, head) pairs run on the pool's threads
    # the grouped path (a kv head's query heads in the lanes of a vector: D a multiple of 16, up to 16 heads):
    (1, 16, 1, 16, 70, 69, [0]),  # 16 heads in one group, keys past one 64-key block
    (2, 7, 1, 48, 200, 130, [0, 129]),  # the 0.5B group; D of 3 vectors; a row with one real slot
    (3, 12, 2, 128, 90, 65, [0, 10, 65]),  # the 1.5B heads; 66 keys: one block and a tail of 2
    (1, 4, 2, 256, 20, 9, [3]),  # the largest D it takes; fewer keys than one chain of 8
    (1, 17, 1, 16, 10, 5, [0]),  # 17 heads per kv head: the per-head path
])
def test_starts_equal_pytorch_masked_attention(b, hq, hkv, d, cap, pos, starts):
    qkv, cos, sin, keys, values = case(b, hq, hkv, d, cap, pos, starts)
    want, want_keys, want_values = reference(qkv, cos, sin, keys, values, pos, hq, starts)
    got = native.decode_attention(qkv, cos, sin, keys, values, pos, hq, torch.tensor(starts, dtype=torch.int64))
    assert got is not None and bool(got.isfinite().all())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(keys[:, :, pos], want_keys[:, :, pos], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(values[:, :, pos], want_values[:, :, pos])


def test_no_starts_is_all_zero():
    qkv, cos, sin, keys, values = case(2, 4, 2, 18, 6, 3, [0, 0], seed=3)
    none = native.decode_attention(qkv, cos, sin, keys.clone(), values.clone(), 3, 4)
    zeros = native.decode_attention(qkv, cos, sin, keys, values, 3, 4, torch.zeros(2, dtype=torch.int64))
    assert torch.equal(none, zeros)


@pytest.mark.parametrize("starts", [[0, -1], [0, 4], [5, 0]])
def test_starts_outside_zero_to_pos_are_refused_before_any_access(starts):
    qkv, cos, sin, keys, values = case(2, 4, 2, 18, 6, 3, [0, 0], seed=4)
    before_keys, before_values = keys.clone(), values.clone()
    with pytest.raises(native.KernelArgumentError, match="native decode_attention"):
        native.decode_attention(qkv, cos, sin, keys, values, 3, 4, torch.tensor(starts, dtype=torch.int64))
    assert torch.equal(keys, before_keys) and torch.equal(values, before_values)  # nothing written


def test_starts_of_another_length_or_dtype_are_refused_by_the_wrapper():
    qkv, cos, sin, keys, values = case(2, 4, 2, 18, 6, 3, [0, 0], seed=5)
    with pytest.raises(native.KernelArgumentError, match="one entry per row"):
        native.decode_attention(qkv, cos, sin, keys, values, 3, 4, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(native.KernelArgumentError, match="starts must be a contiguous"):
        native.decode_attention(qkv, cos, sin, keys, values, 3, 4, torch.zeros(2, dtype=torch.int32))


def test_threads_change_nothing():
    """The (row, head) pairs split across the pool's threads give the bits one thread gives."""
    b, hq, hkv, d, cap, pos = 2, 14, 2, 64, 600, 590
    qkv, cos, sin, keys, values = case(b, hq, hkv, d, cap, pos, [0, 7], seed=5)
    starts = torch.tensor([0, 7], dtype=torch.int64)
    saved = torch.get_num_threads()
    with torch.no_grad():
        torch.set_num_threads(1)
        try:
            one = native.decode_attention(qkv, cos, sin, keys.clone(), values.clone(), pos, hq, starts)
        finally:
            torch.set_num_threads(max(saved, 2))
        two = native.decode_attention(qkv, cos, sin, keys.clone(), values.clone(), pos, hq, starts)
    torch.set_num_threads(saved)
    assert torch.equal(one, two)
