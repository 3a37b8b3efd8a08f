"""Long prompts through oneDNN's bf16 matmul: the packed int8/int4 weight dequantized to bf16 (qmatmul.cpp's
qwenlab_dequant_bf16), its dispatch, and its accuracy against the exact matmul and the VNNI path."""

import pytest
import torch

from qwenlab import native
from qwenlab.native import KernelArgumentError
from qwenlab.quant import native as qnative

from tests.quant.test_kernels import layer

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernel: {native.unavailable_reason()}")
amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


@pytest.fixture
def path():
    """Set the prefill path for one test, and put the default back after it."""
    yield qnative.force_prefill_path
    qnative.force_prefill_path(None)


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in units of b's bf16 spacing (2^-7 of its binade; 1 ulp = one rounding step)."""
    spacing = torch.ldexp(torch.ones_like(b), torch.frexp(b.abs().clamp(min=1e-30)).exponent - 8)
    return ((a - b).abs() / spacing).max().item()


@needs_native
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n,k,group_size", [(64, 32, 32), (80, 96, 32), (300, 256, 64), (130, 384, 128)])
def test_dequantized_bf16_is_the_packed_weight_transposed_and_rounded(bits, n, k, group_size):
    lin, _, _ = layer(bits, n, k, group_size, "native")
    wt = lin.packed.dequantized_bf16_t()
    rows = qnative.padded_rows(n)
    assert wt.dtype == torch.bfloat16 and tuple(wt.shape) == (k, rows)
    exact = lin.dequantized_weight().t()  # fp32 [k, n] from the same packed bytes
    assert bf16_ulps(wt[:, :n].float(), exact) <= 0.5 + 1e-6  # rounded to nearest: half a step at most
    assert wt[:, n:].float().abs().max().item() == 0 if rows > n else True  # padding rows hold zero weights


@needs_native
def test_dequant_refuses_an_output_of_the_wrong_shape():
    lin, _, _ = layer(4, 80, 96, 32, "native")
    with pytest.raises(KernelArgumentError, match="contiguous bf16"):
        lin.packed.dequantized_bf16_t(torch.empty(96, 80, dtype=torch.bfloat16))  # unpadded rows
    with pytest.raises(KernelArgumentError, match="contiguous bf16"):
        lin.packed.dequantized_bf16_t(torch.empty(96, 128))  # fp32


@needs_native
@pytest.mark.skipif(not amx, reason="PyTorch reports no AMX tiles on this CPU: long prompts stay on VNNI")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", [qnative.BF16_PREFILL_MIN_ROWS, qnative.BF16_PREFILL_MIN_ROWS + 3, 517])
def test_long_prompts_take_the_bf16_path_within_bf16_error(bits, m, path):
    assert path(None) == "amx-bf16"
    lin, _, b = layer(bits, 200, 320, 64, "native")
    w = lin.dequantized_weight()
    x = torch.randn(m, 320, generator=torch.Generator().manual_seed(m))
    exact = x @ w.T + b
    got = lin(x)
    assert got.shape == (m, 200) and got.dtype == torch.float32
    # bf16 activations and outputs: ~0.3% of the output's norm (int8 activations on VNNI: ~0.5%)
    assert ((got - exact).norm() / exact.norm()).item() < 0.006
    assert path("vnni") == "vnni"
    vnni = lin(x)
    assert not torch.equal(vnni, got)  # the forced path really ran another kernel
    assert ((vnni - exact).norm() / exact.norm()).item() < 0.01


@needs_native
@pytest.mark.skipif(not amx, reason="PyTorch reports no AMX tiles on this CPU: long prompts stay on VNNI")
@pytest.mark.parametrize("bits", [8, 4])
def test_silu_mul_on_the_bf16_path(bits, path):
    path(None)
    lin, w, _ = layer(bits, 80, 256, 64, "native", bias=False)
    gate_up = torch.randn(300, 512, generator=torch.Generator().manual_seed(1)) * 3
    gate, up = gate_up.chunk(2, dim=-1)
    exact = (torch.nn.functional.silu(gate) * up) @ lin.dequantized_weight().T
    got = lin.forward_silu_mul(gate_up)
    assert ((got - exact).norm() / exact.norm()).item() < 0.006


@needs_native
@pytest.mark.parametrize("bits", [8, 4])
def test_short_prompts_and_decode_stay_on_vnni(bits, path):
    """Below BF16_PREFILL_MIN_ROWS the answer is the VNNI kernel's, bit for bit, on any CPU."""
    lin, _, _ = layer(bits, 80, 256, 64, "native")
    x = torch.randn(qnative.BF16_PREFILL_MIN_ROWS - 1, 256, generator=torch.Generator().manual_seed(2))
    path(None)
    default = lin(x)
    path("vnni")
    assert torch.equal(default, lin(x))


def test_the_prefill_path_follows_what_the_cpu_runs(path):
    assert path(None) == ("amx-bf16" if amx else "vnni")
    assert path("amx-bf16") == ("amx-bf16" if amx else "vnni")  # asking cannot turn on what the CPU lacks
    assert path("vnni") == "vnni"


def test_an_unknown_prefill_path_is_refused_by_name(path, monkeypatch):
    monkeypatch.setenv("QWENLAB_PREFILL", "amx-int8")
    with pytest.raises(KernelArgumentError, match="QWENLAB_PREFILL must be one of auto, vnni, amx-bf16"):
        path(None)
    monkeypatch.delenv("QWENLAB_PREFILL")
