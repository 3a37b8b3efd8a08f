"""bf16 and fp32 weights on the native stack: the kernel against torch on odd shapes, its run-time
dispatch with a forced fallback, and greedy generation equal to the PyTorch model's."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qwenlab import native
from qwenlab.loading import load
from qwenlab.model import GenerationConfig, load_model
from qwenlab.model.generate import generate_token_ids
from qwenlab.native.library import KernelArgumentError, float_path, force_float_path
from qwenlab.quant import native as kernels
from qwenlab.model.qwen2 import MLP
from qwenlab.quant.float_native import ONEDNN_POINTWISE, NativeFloatMLP, NativeFloatQwen2ForCausalLM, NativeLinear
from tests.conftest import CountedCalls

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernel: {native.unavailable_reason()}")

CPU_HAS_BF16 = " avx512_bf16" in Path("/proc/cpuinfo").read_text()
PATHS = ["avx512bf16", "avx512f"] if CPU_HAS_BF16 else ["avx512f"]
# (rows, out, in): one row; out and in not multiples of 16; in with a tail that is not a whole block of
# 32 (33, 100, 77, 31); a long row (4099); rows past a group of 4 tokens (5, 17); one element.
SHAPES = [(1, 1, 1), (1, 17, 33), (3, 65, 100), (5, 130, 1000), (1, 7, 4099), (4, 33, 31), (17, 40, 77),
          (1, 300, 64), (1, 70, 96)]


@pytest.fixture
def bf16_path(request):
    """Run the test on the path named by the parameter, and give the CPU's own back afterwards."""
    used = force_float_path(None if request.param == "avx512bf16" else request.param)
    assert used == request.param
    yield used
    force_float_path(None)


def reference(x: torch.Tensor, w: torch.Tensor, bias, path: str) -> torch.Tensor:
    """torch's matmul in float64 on what the kernel multiplies: vdpbf16ps rounds x to bf16 first."""
    if w.dtype == torch.bfloat16 and path == "avx512bf16":
        x = x.to(torch.bfloat16)
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("bf16_path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_matches_torch_on_odd_shapes(bf16_path, dtype, m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g).to(dtype), torch.randn(n, generator=g)
    for bias in (b, None):
        got = kernels.linear_float(x, w, bias)
        assert got.shape == (m, n) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), reference(x, w, bias, bf16_path), atol=1e-4 * k ** 0.5, rtol=1e-5)
    gate_up = torch.randn(m, 2 * k, generator=g)  # the MLP's down projection: silu(gate) * up inside the kernel
    h = F.silu(gate_up[:, :k]) * gate_up[:, k:]
    torch.testing.assert_close(kernels.linear_float(gate_up, w, None, silu_mul=True).double(),
                               reference(h, w, None, bf16_path), atol=1e-4 * k ** 0.5, rtol=1e-4)


def test_dispatch_picks_what_the_cpu_runs_and_a_forced_fallback_runs():
    assert float_path("bf16") == ("bf16:avx512bf16" if CPU_HAS_BF16 else "bf16:avx512f")
    assert float_path("fp32") == "fp32:avx512f"
    x, w = torch.randn(3, 77), torch.randn(50, 77).to(torch.bfloat16)
    best = kernels.linear_float(x, w)
    try:
        assert force_float_path("avx512f") == "avx512f" and float_path("bf16") == "bf16:avx512f"
        widened = kernels.linear_float(x, w)
    finally:
        force_float_path(None)
    torch.testing.assert_close(widened.double(), reference(x, w, None, "avx512f"), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(best, widened, atol=0.05, rtol=0.02)  # x in bf16 or not: close, not equal
    # the environment forces it for a whole process, from the first load of the library
    code = "from qwenlab.native.library import float_path; print(float_path('bf16'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "QWENLAB_FLOAT_KERNEL": "avx512f"})
    assert done.stdout.strip() == "bf16:avx512f", done.stderr


def test_a_buffer_that_does_not_fit_its_sizes_is_refused():
    x, w, y = torch.randn(2, 40), torch.randn(8, 40), torch.empty(2, 8)
    lib = native.library()
    status = lib.gemm_float(x.data_ptr(), x.numel(), 2, 40, w.data_ptr(), w.numel() - 1, 32, 8, None, 0,
                            y.data_ptr(), y.numel(), 1, 0)
    assert status == native.BAD_SIZES
    with pytest.raises(KernelArgumentError):
        kernels.linear_float(x, w.to(torch.float16))


def test_load_puts_float_models_on_the_native_stack_unless_told_not_to(tiny32_dir):
    model = load(tiny32_dir, "bf16").model
    assert isinstance(model, NativeFloatQwen2ForCausalLM) and model.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert isinstance(model.model.layers[0].mlp.down_proj, NativeLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: one table, no copy
    assert model.decode_stack() is not None
    assert type(load(tiny32_dir, "bf16", float_backend="torch").model).__name__ == "Qwen2ForCausalLM"
    assert isinstance(load(tiny32_dir, "fp32", fuse=False).model, NativeFloatQwen2ForCausalLM)  # serve's LoRA loads


def greedy(model, prompts, steps=24):
    return list(generate_token_ids(model, prompts, GenerationConfig(max_new_tokens=steps), set()))


def bf16_weights_in_fp32(folder, round_inputs: bool):
    """The PyTorch model core with the checkpoint's weights rounded to bf16, computing in fp32; with
    round_inputs, every linear's input rounded to bf16 too (what vdpbf16ps multiplies)."""
    model = load_model(folder, "bf16").float()
    if model.lm_head is None:  # the tied head as a Linear module too, so that its input is rounded as well
        model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
        model.lm_head.weight = model.model.embed_tokens.weight
    if round_inputs:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_pre_hook(lambda _, args: (args[0].to(torch.bfloat16).float(),))
    return model


def assert_same_choices_where_decided(ours, plain, prompts, steps=24, margin=1e-3):
    """Teacher-forced on the PyTorch model's greedy tokens: at every step, each row picks the same token
    as PyTorch wherever PyTorch's best logit leads the second by more than `margin`."""
    expected = greedy(plain, prompts, steps)
    decided = 0
    for t in range(steps):
        rows = [p + [step[i] for step in expected[:t]] for i, p in enumerate(prompts)]
        longest = max(map(len, rows))
        x = torch.tensor([[0] * (longest - len(r)) + r for r in rows])
        valid = torch.tensor([[False] * (longest - len(r)) + [True] * len(r) for r in rows])
        with torch.inference_mode():
            a, b = ours(x, valid=valid)[:, -1], plain(x, valid=valid)[:, -1]
        top = b.topk(2).values
        for i in range(len(rows)):
            if top[i, 0] - top[i, 1] > margin:
                decided += 1
                assert a[i].argmax() == b[i].argmax() == expected[t][i], (t, i)
    assert decided >= steps  # most choices were clear ones: the comparison says something


@pytest.mark.parametrize("bf16_path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_greedy_generation_equals_the_pytorch_model(tiny32_dir, bf16_path, dtype):
    ours = load(tiny32_dir, dtype).model
    plain = load_model(tiny32_dir, "fp32") if dtype == "fp32" else \
        bf16_weights_in_fp32(tiny32_dir, round_inputs=bf16_path == "avx512bf16")
    taken = []
    ours._stack = CountedCalls(ours.decode_stack(), lambda args, out: taken.append(out is not None))  # uses counted
    for prompts in ([[5, 6, 7, 8], [9, 10, 11, 12]], [[1, 2, 3], [4, 5, 6, 7, 8]]):  # equal lengths; padded
        got = greedy(ours, prompts)
        if bf16_path == "avx512f" or dtype == "fp32":
            assert got == greedy(plain, prompts)
        else:  # x rounded to bf16 after sums in another order: a near-tie may go either way, nothing else
            assert_same_choices_where_decided(ours, plain, prompts)
    assert len(taken) >= 23 and all(taken)  # every decode step of the unpadded batch ran the one-call stack
    with torch.inference_mode():
        x = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(ours(x), plain(x), atol=2e-3, rtol=2e-3)
        if dtype == "bf16":  # and near PyTorch's own all-bf16 model, which rounds every activation
            own = load_model(tiny32_dir, "bf16")(x).float()
            assert ((ours(x) - own).norm() / own.norm()).item() < 0.02


@pytest.mark.parametrize("padded", [False, True])
def test_the_decode_stack_equals_the_layer_by_layer_path_and_follows_weight_changes(tiny32_dir, padded):
    """Padded: 3 left-padded rows of 9, 5 and 2 tokens, which the stack runs with per-row starts."""
    stacked, layered = load(tiny32_dir, "bf16").model, load(tiny32_dir, "bf16").model
    layered.decode_stack = lambda: None
    stack, taken = stacked.decode_stack(), []
    stacked._stack = CountedCalls(stack, lambda args, out: taken.append(out is not None))
    prompt = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(2))
    valid = torch.ones(3, 9, dtype=torch.bool)
    if padded:
        valid[1, :4] = valid[2, :7] = False
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    caches = [m.new_cache(3, 24) for m in (stacked, layered)]
    with torch.inference_mode():
        outs = [m(prompt, positions=positions, cache=c, valid=valid) for m, c in zip((stacked, layered), caches)]
        for _ in range(6):
            torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
            nxt = outs[1][:, -1:].argmax(-1)
            positions = positions[:, -1:] + 1
            outs = [m(nxt, positions=positions, cache=c) for m, c in zip((stacked, layered), caches)]
    assert taken == [True] * 6
    stacked._stack = stack
    first = stacked.decode_stack()
    assert stacked.decode_stack() is first  # unchanged layers: the same stack
    q = stacked.model.layers[1].self_attn.q_proj
    q.weight.data = q.weight.data * 2  # what a LoRA merge does: new memory under the same parameter
    assert stacked.decode_stack() is not first
    stacked.model.layers[0].mlp.up_proj = torch.nn.Identity()  # a module that is not a NativeLinear
    assert stacked.decode_stack() is None


@pytest.mark.skipif(not ONEDNN_POINTWISE, reason="this torch build has no oneDNN pointwise linear")
def test_bf16_prefill_mlp_runs_in_bf16_like_pytorchs_bf16_model(tiny32_dir):
    """Prefill rows of a bf16 model: SiLU and gate x up inside oneDNN, activations in bf16 (as PyTorch's bf16
    model computes them); decode rows, fp32 weights and gradients keep the plain fp32-activation MLP."""
    mlp = load(tiny32_dir, "bf16").model.model.layers[0].mlp
    assert isinstance(mlp, NativeFloatMLP)
    x = torch.randn(2, 20, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, plain = mlp(x), MLP.forward(mlp, x)
        xb = x.bfloat16()
        want = F.linear(F.silu(F.linear(xb, mlp.gate_proj.weight)) * F.linear(xb, mlp.up_proj.weight),
                        mlp.down_proj.weight).float()
        assert got.shape == plain.shape == x.shape and got.dtype == torch.float32
        assert not torch.equal(got, plain)  # the bf16 path ran
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * float(want.abs().max()))
        assert float((got - plain).norm() / plain.norm()) < 0.02
        few = x[:, :3]  # 6 rows: decode's path
        assert torch.equal(mlp(few), MLP.forward(mlp, few))
    assert torch.equal(mlp(x).detach(), MLP.forward(mlp, x).detach())  # gradient mode: the plain MLP
    fp32 = load(tiny32_dir, "fp32").model.model.layers[0].mlp
    with torch.no_grad():
        assert torch.equal(fp32(x), MLP.forward(fp32, x))
