"""Run in a child process by test_kernel_argument_checks.py: CASE calls a native kernel, first with
consistent sizes (its result is checked against PyTorch), then with one buffer that does not fit.

Prints "refused <ExceptionType>: <message>" and exits 0 when the kernel refused the second call with an
exception; exits 3 if it returned normally. Without the checks, a kernel reading past a buffer would
end this process with a signal (or silently read other memory), which the parent test tells apart.
"""

import sys

import torch
import torch.nn.functional as F

from qwenlab import native
from qwenlab.quant.native import linear_int4, linear_int8
from qwenlab.quant.formats import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from qwenlab.quant.linear import Int4WeightLinear, Int8WeightLinear

N, K, GROUP = 128, 256, 32


def layer(bits: int):
    g = torch.Generator().manual_seed(bits)
    w, bias = torch.randn(N, K, generator=g) * 0.05, torch.randn(N, generator=g)
    if bits == 8:
        q, s = quantize_int8(w, GROUP)
        return Int8WeightLinear.from_tensors(GROUP, bias, "native", qweight=q, scales=s), dequantize_int8(q, s), bias
    q, s, z = quantize_int4(w, GROUP)
    from qwenlab.quant.formats import pack_int4

    lin = Int4WeightLinear.from_tensors(GROUP, bias, "native", qweight=pack_int4(q), scales=s, zeros=z)
    return lin, dequantize_int4(q, s, z), bias


def close(got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    error = ((got - expected).norm() / expected.norm()).item()
    assert error < tolerance, f"the consistent call is wrong: relative error {error}"


def gemm_int8_short_scales():
    lin, w, bias = layer(8)
    x = torch.randn(3, K)
    close(linear_int8(x, N, lin.qweight, lin.scales, GROUP, lin.native_bias), x @ w.T + bias, 0.02)
    linear_int8(x, N, lin.qweight, lin.scales[:, :-1].contiguous(), GROUP, lin.native_bias)


def gemm_int8_short_bias():
    lin, w, bias = layer(8)
    x = torch.randn(1, K)
    close(linear_int8(x, N, lin.qweight, lin.scales, GROUP, lin.native_bias), x @ w.T + bias, 0.02)
    linear_int8(x, N, lin.qweight, lin.scales, GROUP, torch.zeros(1))


def gemm_int4_short_mins():
    lin, w, bias = layer(4)
    x = torch.randn(2, K)
    close(linear_int4(x, N, lin.qweight, lin.scales, lin.mins, GROUP, lin.native_bias), x @ w.T + bias, 0.02)
    linear_int4(x, N, lin.qweight, lin.scales, lin.mins[:1].contiguous(), GROUP, lin.native_bias)


def gemm_group_size_that_does_not_fit():
    """The scales were made for group 32; group 64 says half as many per row: refused, not misread."""
    lin, w, bias = layer(8)
    x = torch.randn(2, K)
    close(linear_int8(x, N, lin.qweight, lin.scales, GROUP, lin.native_bias), x @ w.T + bias, 0.02)
    linear_int8(x, N, lin.qweight, lin.scales, 2 * GROUP, lin.native_bias)


def gemm_raw_entry_short_weight():
    """The C entry point itself, through ctypes: a weight buffer shorter than N x K returns BAD_SIZES."""
    lin, w, bias = layer(8)
    x, y = torch.randn(1, K), torch.empty(1, N)
    lib = native.library()
    args = lambda w_len: (x.data_ptr(), x.numel(), 1, K, lin.qweight.data_ptr(), w_len, lin.scales.data_ptr(),
                          lin.scales.numel(), N, GROUP, None, 0, y.data_ptr(), y.numel(), 1, 0)
    assert lib.gemm_int8(*args(lin.qweight.numel())) == 0
    close(y, x @ w.T, 0.02)
    status = lib.gemm_int8(*args(lin.qweight.numel() // 2))
    assert status == native.BAD_SIZES, status
    native.checked(status, "gemm_int8")


def rms_norm_weight_of_one():
    x, w = torch.randn(2, 3, 64), torch.randn(64)
    close(native.rms_norm(x, w, 1e-6), F.rms_norm(x, (64,), w, 1e-6), 1e-5)
    native.rms_norm(x, torch.ones(1), 1e-6)


def decode_attention_short_qkv():
    """qkv narrower than num_heads implies (4 query + 2 kv heads of 16 = 128 wide; given 96)."""
    b, hkv, cap, d = 2, 2, 8, 16
    keys, values = torch.zeros(b, hkv, cap, d), torch.zeros(b, hkv, cap, d)
    cos, sin = torch.ones(b, 1, 1, d), torch.zeros(b, 1, 1, d)
    qkv = torch.randn(b, 1, (4 + 2 * hkv) * d)
    out = native.decode_attention(qkv, cos, sin, keys, values, 0, 4)
    # one cached slot: softmax is 1, the output is each query head's value head
    v = qkv[:, 0, 6 * d:].view(b, hkv, d)
    torch.testing.assert_close(out.view(b, 4, d), v.repeat_interleave(2, dim=1))
    native.decode_attention(qkv[..., :96].contiguous(), cos, sin, keys, values, 1, 4)


def lora_bgmv_adapter_index_past_the_stack():
    x, y = torch.randn(2, 1, 16), torch.zeros(2, 1, 8)
    a, bt = torch.randn(2, 4, 16), torch.randn(2, 4, 8)
    native.lora_bgmv_(y, x, torch.tensor([1, -1], dtype=torch.int32), a, bt)
    torch.testing.assert_close(y[0, 0], (a[1] @ x[0, 0]) @ bt[1])
    assert torch.equal(y[1], torch.zeros(1, 8))
    native.lora_bgmv_(y, x, torch.tensor([2, 0], dtype=torch.int32), a, bt)  # adapter 2 of 2


def decode_stack_norm_of_one():
    """A loaded model's decode-stack table with one layer's norm length changed: the stack refuses it
    before any layer runs (x stays as it was)."""
    from qwenlab.loading import load

    model = load(sys.argv[2]).model
    assert model.decode_stack is not None
    cache = model.new_cache(1, 8)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        model(torch.tensor([[4]]), cache=cache)  # a decode step through the stack builds its table
        table = cache.native_decode_table[1]
        table[1].norm2_len = 1
        model.decode_stack(torch.zeros(1, 1, model.config.hidden_size), *model.rotary(torch.tensor([[4]]), torch.float32),
                           cache, cache.slot_buffers(), 4)


def expanded_weight_tensor():
    """An expanded tensor has more elements than memory: the wrapper refuses it before the kernel."""
    lin, _, _ = layer(8)
    linear_int8(torch.randn(1, K), N, lin.qweight[:1].expand_as(lin.qweight), lin.scales, GROUP)


CASES = {f.__name__: f for f in (gemm_int8_short_scales, gemm_int8_short_bias, gemm_int4_short_mins,
                                 gemm_group_size_that_does_not_fit, gemm_raw_entry_short_weight, rms_norm_weight_of_one,
                                 decode_attention_short_qkv, lora_bgmv_adapter_index_past_the_stack,
                                 decode_stack_norm_of_one, expanded_weight_tensor)}

if __name__ == "__main__":
    assert native.available(), native.unavailable_reason()
    try:
        CASES[sys.argv[1]]()
    except (ValueError, MemoryError) as e:
        print(f"refused {type(e).__name__}: {e}")
        sys.exit(0)
    sys.exit(3)
