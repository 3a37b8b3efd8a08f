"""The GRPO policy: one trainable LoRA adapter on the model core, through qwenlab.adapters.

The adapter is attached unmerged (LoRALinear module swap), so the base weights stay frozen and the
reference model for the KL term is the same module with the adapter switched off: no second copy.
Initialisation is PEFT's: A ~ kaiming-uniform(a=√5), B = 0, so the policy starts equal to the base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qwenlab.adapters import LoraAdapter, attach_adapter, read_adapter
from qwenlab.adapters.apply import lora_modules
from qwenlab.adapters.fused_mlp import fuse_lora_mlps
from qwenlab.errors import QwenlabError

POLICY = "policy"  # the adapter's name inside the model
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = field(default=ALL_LINEAR)


def target_module_names(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    names = [name for name, module in model.named_modules()
             if name.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear)]
    if not names:
        raise QwenlabError(f"LoRA targets {list(targets)} match no linear module of the model")
    return names


def new_lora(model: nn.Module, settings: LoraSettings, seed: int = 0, base_model: str | None = None) -> LoraAdapter:
    """A fresh adapter: A kaiming-uniform, B zero (PEFT's init_lora_weights=True)."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for name in target_module_names(model, settings.targets):
        linear = model.get_submodule(name)
        bound = 1 / math.sqrt(linear.in_features)  # kaiming_uniform_(a=√5) on [r, in]
        a = (torch.rand(settings.rank, linear.in_features, generator=generator) * 2 - 1) * bound
        modules[name] = (a, torch.zeros(linear.out_features, settings.rank))
    return LoraAdapter(modules, alpha=float(settings.alpha), base_model=base_model, source="grpo")


def attach_policy(model: nn.Module, adapter: LoraAdapter | str | Path) -> list[nn.Parameter]:
    """Attach `adapter` as the trainable policy; returns its parameters (the only ones with grad), their gradients
    zeroed. The MLPs train through the fused LoRA MLP (half the intermediate-sized activations kept)."""
    if not isinstance(adapter, LoraAdapter):
        adapter = read_adapter(adapter)
    model.requires_grad_(False)
    attach_adapter(model, adapter, POLICY)
    params = []
    for module in lora_modules(model).values():
        if POLICY in module.lora_A:
            # LoRALinear keeps adapters in the base dtype; training needs fp32 master weights.
            module.lora_A[POLICY] = nn.Parameter(module.lora_A[POLICY].float(), requires_grad=True)
            module.lora_B[POLICY] = nn.Parameter(module.lora_B[POLICY].float(), requires_grad=True)
            params += [module.lora_A[POLICY], module.lora_B[POLICY]]
    # Gradients exist from the start, before any activation, and trainers zero them in place: hundreds of small
    # gradients re-allocated in each backward land in the holes the step's large activations left, and the heap
    # grew by ~0.5 GB on the 0.5B shape (glibc keeps freed memory; train/native/sft.keep_freed_memory).
    for param in params:
        param.grad = torch.zeros_like(param)
    fuse_lora_mlps(model)
    return params


def policy_adapter(model: nn.Module, like: LoraAdapter) -> LoraAdapter:
    """The current policy weights as a LoraAdapter (same scaling rule as `like`), detached copies."""
    modules = {name: (m.lora_A[POLICY].detach().clone(), m.lora_B[POLICY].detach().clone())
               for name, m in lora_modules(model).items() if POLICY in m.lora_A}
    return LoraAdapter(modules, alpha=like.alpha, use_rslora=like.use_rslora, alpha_pattern=dict(like.alpha_pattern),
                       base_model=like.base_model, source="grpo")


def load_policy_weights(model: nn.Module, adapter: LoraAdapter) -> None:
    """Copy saved adapter weights into the attached policy (in place, so the optimizer keeps its params)."""
    modules = {name: m for name, m in lora_modules(model).items() if POLICY in m.lora_A}
    if set(modules) != set(adapter.modules):
        raise QwenlabError(f"checkpoint adapter {adapter.source} targets other modules than the policy")
    with torch.no_grad():
        for name, module in modules.items():
            a, b = adapter.modules[name]
            module.lora_A[POLICY].copy_(a)
            module.lora_B[POLICY].copy_(b)
