"""Quantized layers against the dequantized fp32 matmul, for every backend, shape and group size."""

import pytest
import torch

from qwenlab import native
from qwenlab.quant.formats import dequantize_int4, dequantize_int8, pack_int4, quantize_int4, quantize_int8
from qwenlab.quant.linear import Int4WeightLinear, Int8WeightLinear

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernel: {native.unavailable_reason()}")


def layer(bits, n, k, group_size, backend, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g) if bias else None
    if bits == 8:
        q, s = quantize_int8(w, group_size)
        return Int8WeightLinear.from_tensors(group_size, b, backend, qweight=q, scales=s), dequantize_int8(q, s), b
    q, s, z = quantize_int4(w, group_size)
    lin = Int4WeightLinear.from_tensors(group_size, b, backend, qweight=pack_int4(q), scales=s, zeros=z)
    return lin, dequantize_int4(q, s, z), b


def exactly_quantizable(m, k, seed=1):
    """Activations the kernel's int8 quantization (per 32 values, amax/127) represents exactly."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (m, k), generator=g).float()
    q.view(m, -1, 32)[..., 0] = 127.0  # each block's amax is 127 steps
    step = 2.0 ** torch.randint(-6, 0, (m, k // 32, 1), generator=g).float()  # powers of two: exact scales
    return (q.view(m, -1, 32) * step).view(m, k)


@needs_native
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n", [16, 80, 128, 300])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_native_kernel_equals_the_dequantized_matmul(bits, n, group_size):
    lin, w, b = layer(bits, n, 256, group_size, "native")
    assert lin.backend == "native"
    # The packed weight is the stored one (int4: up to the fp16 rounding of m = -scale * zero, ~1% of a step).
    packed_w = lin.dequantized_weight()
    assert (packed_w - w).abs().max().item() <= 0.01 * (w.abs().max().item() / 7)
    for m in (1, 3, 4, 9):  # decode (1), prefill tiles of 4 and their remainders
        x = exactly_quantizable(m, 256)
        expected = x @ packed_w.T + b
        got = lin(x)
        assert got.shape == (m, n)
        assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item() + 1e-5


@needs_native
@pytest.mark.parametrize("bits", [8, 4])
def test_native_kernel_on_arbitrary_activations_is_within_int8_activation_error(bits):
    lin, w, b = layer(bits, 192, 512, 64, "native", bias=False)
    x = torch.randn(2, 5, 512)
    expected = x @ w.T
    rel = ((lin(x) - expected).norm() / expected.norm()).item()
    assert rel < 0.01  # int8 activations in blocks of 32: ~0.5% on Gaussian inputs


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=needs_native)])
@pytest.mark.parametrize("bits", [8, 4])
def test_silu_mul_input_equals_silu_times_up_then_the_layer(bits, backend):
    """forward_silu_mul(gate|up) = layer(silu(gate) * up): the native kernel applies it while quantizing
    its input (own exp polynomial), over decode and prefill row counts and gates from -90 to 90."""
    lin, w, b = layer(bits, 80, 256, 64, backend)
    g = torch.Generator().manual_seed(3)
    for m in (1, 4, 7):
        gate_up = torch.randn(m, 512, generator=g) * 4
        gate_up[0, :4] = torch.tensor([-90.0, -30.0, 30.0, 90.0])  # exp's clamped range and beyond
        gate, up = gate_up.chunk(2, dim=-1)
        expected = lin(torch.nn.functional.silu(gate) * up)
        got = lin.forward_silu_mul(gate_up)
        assert got.shape == (m, 80)
        # An exp a few ulp from PyTorch's could move a value across an int8 rounding boundary (one
        # step, 1/127 of its block's amax): rare enough that the outputs agree to float rounding here.
        assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


@needs_native
def test_native_kernel_refuses_an_input_of_the_wrong_width():
    lin, _, _ = layer(8, 80, 256, 64, "native")
    with pytest.raises(ValueError, match="expects 512 .gate.up"):
        lin.forward_silu_mul(torch.zeros(1, 256))  # gate|up must be twice the layer's input width
    with pytest.raises(ValueError, match="expects 256"):
        lin(torch.zeros(1, 128))  # before, the kernel read past the row


@pytest.mark.parametrize("bits", [8, 4])
def test_pytorch_kernel_backend(bits):
    lin, w, b = layer(bits, 64, 256, 32, "aten")
    x = torch.randn(3, 256)
    expected = x @ w.T + b
    # bf16 activations (and per-channel requantization for int8)
    assert ((lin(x) - expected).norm() / expected.norm()).item() < 0.02


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=needs_native), "aten"])
@pytest.mark.parametrize("bits", [8, 4])
def test_rows_gather_from_every_layout(bits, backend):
    lin, w, _ = layer(bits, 300 if backend != "aten" else 304, 128, 32, backend, bias=False)
    rows = torch.tensor([0, 17, 299, 64, 17])
    # exact for the stored format; int4 native adds the fp16 rounding of m; aten stores bf16 scales
    atol = {"reference": 1e-6, "native": 1e-6 if bits == 8 else 1e-3 * float(w.abs().max()),
            "aten": 0.02 * float(w.abs().max())}[backend]
    assert torch.allclose(lin.weight_rows(rows), w[rows], atol=atol)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows,tokens,k,n_out,rank,adapters", [(5, 3, 40, 37, 8, 3), (8, 1, 256, 768, 8, 8),
                                                                 (2, 7, 896, 128, 16, 2), (3, 1, 16, 16, 1, 1),
                                                                 (1, 1, 896, 4867, 16, 1), (2, 1, 4864, 129, 8, 2)])
def test_lora_bgmv_adds_each_rows_own_adapter_delta(rows, tokens, k, n_out, rank, adapters, threads, dtype,
                                                    monkeypatch):
    """On 1 to 3 of the kernels' threads: whole rows per thread, and a row's columns split across threads
    (fewer tokens than threads: one row of 4867 columns, a tail that is not a whole 16-lane block). bf16
    stacks are widened exactly, so the reference is the same fp32 product of the bf16 values."""
    import importlib

    monkeypatch.setattr(importlib.import_module("qwenlab.native.library"), "_kernel_threads", threads)
    g = torch.Generator().manual_seed(rows * 100 + k)
    x = torch.randn(rows, tokens, k, generator=g)
    a = torch.randn(adapters, rank, k, generator=g).to(dtype)
    bt = torch.randn(adapters, rank, n_out, generator=g).to(dtype)
    row_adapter = torch.randint(-1, adapters, (rows,), generator=g, dtype=torch.int32)
    row_adapter[0] = -1  # a row with no adapter is left alone
    y = torch.randn(rows, tokens, n_out, generator=g)
    expected = y.clone()
    for r, i in enumerate(row_adapter.tolist()):
        if i >= 0:
            expected[r] += (x[r] @ a[i].float().T) @ bt[i].float()
    native.lora_bgmv_(y, x, row_adapter, a, bt)
    # fp32 sums in another order: within a few ulps of the largest delta (k 4864 makes deltas of ~1e4)
    torch.testing.assert_close(y, expected, atol=1e-6 * float(expected.abs().max()) + 1e-4, rtol=1e-5)


@needs_native
def test_lora_bgmv_refuses_a_rank_over_its_limit():
    x, y = torch.zeros(1, 1, 16), torch.zeros(1, 1, 16)
    rank = native.LORA_MAX_RANK + 1
    with pytest.raises(ValueError, match="rank"):
        native.lora_bgmv_(y, x, torch.zeros(1, dtype=torch.int32), torch.zeros(1, rank, 16), torch.zeros(1, rank, 16))


@needs_native
def test_lora_bgmv_refuses_stacks_of_two_dtypes():
    x, y = torch.zeros(1, 1, 16), torch.zeros(1, 1, 16)
    with pytest.raises(native.KernelArgumentError, match="bt must be a contiguous torch.bfloat16"):
        native.lora_bgmv_(y, x, torch.zeros(1, dtype=torch.int32), torch.zeros(1, 4, 16, dtype=torch.bfloat16),
                          torch.zeros(1, 4, 16))


@needs_native
@pytest.mark.parametrize("width", [64, 896, 37])
def test_native_rms_norm_equals_torch(width):
    g = torch.Generator().manual_seed(width)
    x, w = torch.randn(3, 5, width, generator=g) * 3, torch.randn(width, generator=g)
    expected = torch.nn.functional.rms_norm(x, (width,), w, 1e-6)
    torch.testing.assert_close(native.rms_norm(x, w, 1e-6), expected, atol=1e-5, rtol=1e-5)
    assert native.rms_norm(x.requires_grad_(), w, 1e-6) is None  # a gradient needs PyTorch's path


@needs_native
def test_native_kernel_is_exact_across_many_alternating_calls_on_two_threads():
    """Prefill alternates a few-chunk job (activation quantization) and a many-chunk one (the matmul)
    on the kernel's thread pool. A late worker once claimed a chunk of the next job under the previous
    job's tag, so the caller returned while a chunk still ran (a rare segfault or wrong rows): every
    call here must give the same rows as the first (all on VNNI: 128 rows would otherwise take the bf16 path)."""
    from qwenlab.quant.native import force_prefill_path

    lin, _, _ = layer(4, 4096, 512, 64, "native", bias=False)
    x = torch.randn(128, 512, generator=torch.Generator().manual_seed(5))
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    force_prefill_path("vnni")
    try:
        with native.torch_single_threaded():
            reference = lin(x)
            for _ in range(1000):
                for m in (128, 64, 20, 5):
                    assert torch.equal(lin(x[:m]), reference[:m])
    finally:
        torch.set_num_threads(saved)
        force_prefill_path(None)
