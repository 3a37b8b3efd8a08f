"""The fused LoRA MLP (adapters/fused_mlp.py) against the three LoRALinear modules it replaces in training:
the same outputs and the same gradients for the input and every LoRA weight, bit for bit, in fp32 and bf16, with
and without dropout; and it keeps half of the intermediate-sized activations."""

from __future__ import annotations

import pytest
import torch

from qwenlab.adapters import active_adapters
from qwenlab.adapters.fused_mlp import fuse_lora_mlps
from qwenlab.adapters.peft_format import LoraAdapter
from qwenlab.model import load_model
from qwenlab.train.grpo.policy import ALL_LINEAR, POLICY, attach_policy, target_module_names


def trainable_model(folder, dtype, dropout, rank=4, seed=0):
    model = load_model(folder, dtype)
    torch.manual_seed(seed)
    modules = {}
    for name in target_module_names(model, ALL_LINEAR):
        linear = model.get_submodule(name)
        modules[name] = (torch.randn(rank, linear.in_features) * 0.2, torch.randn(linear.out_features, rank) * 0.2)
    params = attach_policy(model, LoraAdapter(modules, alpha=2.0 * rank))
    for module in model.modules():
        if hasattr(module, "lora_A"):
            module.dropout = dropout
            module.compute_dtype = dtype if dtype != torch.float32 else None
    return model.train(), params


def loss_and_grads(model, params, tokens, fused: bool, seed: int):
    fuse_lora_mlps(model, fused)
    torch.manual_seed(seed)
    x = model.model.embed_tokens(tokens).detach().requires_grad_(True)
    mlp = model.model.layers[0].mlp
    with active_adapters(model, POLICY):
        out = mlp(x)
        (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    lora = [table[POLICY] for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            for table in (linear.lora_A, linear.lora_B)]
    grads = [x.grad] + [p.grad.clone() for p in lora]
    assert all(not p.grad.any() for p in params if all(p is not q for q in lora))  # attach_policy zeroed them
    for p in params:
        p.grad.zero_()
    return out.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_mlp_matches_the_lora_modules(tiny_model_dir, dtype, dropout):
    model, params = trainable_model(tiny_model_dir, dtype, dropout)
    tokens = torch.randint(0, 200, (3, 7))  # 21 rows: not a multiple of any block
    out_modules, grads_modules = loss_and_grads(model, params, tokens, fused=False, seed=5)
    out_fused, grads_fused = loss_and_grads(model, params, tokens, fused=True, seed=5)
    assert torch.equal(out_fused, out_modules)  # same masks (drawn in the same order), same ops
    assert len(grads_fused) == len(grads_modules) == 1 + 6  # x, and A and B of gate, up and down
    for fused, reference in zip(grads_fused, grads_modules):
        assert fused.abs().sum() > 0
        assert torch.equal(fused, reference)  # bit for bit: training takes the same steps with the fusion


def test_fused_mlp_steps_aside_where_it_does_not_apply(tiny_model_dir):
    """No gradient, a merged adapter or no adapter at all: the modules run (and give the same output)."""
    model, params = trainable_model(tiny_model_dir, torch.float32, 0.0)
    fuse_lora_mlps(model, True)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, model.config.hidden_size)
    from qwenlab.adapters.fused_mlp import fused_lora_mlp
    with active_adapters(model, POLICY):
        with torch.no_grad():
            assert fused_lora_mlp(mlp, x) is None
        assert fused_lora_mlp(mlp, x) is not None
    assert fused_lora_mlp(mlp, x) is None  # no adapter active


def test_fused_mlp_keeps_two_intermediate_tensors_instead_of_four(tiny_model_dir):
    model, params = trainable_model(tiny_model_dir, torch.float32, 0.0)
    intermediate = model.config.intermediate_size
    x = torch.randn(4, 9, model.config.hidden_size, requires_grad=True)
    mlp = model.model.layers[0].mlp
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def kept_intermediate(fused: bool) -> int:
        fuse_lora_mlps(model, fused)
        seen = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in weights and t.shape[-1] == intermediate and t.dtype == torch.float32:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with active_adapters(model, POLICY), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mlp(x)
        return sum(seen.values())

    one = 4 * 9 * intermediate * 4
    assert kept_intermediate(False) == 4 * one
    assert kept_intermediate(True) == 2 * one
