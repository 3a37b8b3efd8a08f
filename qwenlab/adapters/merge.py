"""Merging a LoRA adapter into a weight and taking it out again: pure functions on tensors.

    merge:   W' = W + scaling · B @ A          scaling = alpha / r, or alpha / √r (rsLoRA)
    unmerge: W  = W' - scaling · B @ A

The product is formed in fp32 and the result cast back to W's dtype, as PEFT's merge_and_unload
does for fp32/bf16 weights. In bf16, unmerge(merge(W)) equals W only up to bf16 rounding.
"""

from __future__ import annotations

import torch


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = scaling · B @ A in fp32; A is [r, in], B is [out, r]."""
    return scaling * (b.float() @ a.float())


def merge_lora(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling · B @ A, in W's dtype."""
    return (weight.float() + lora_delta(a, b, scaling)).to(weight.dtype)


def unmerge_lora(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W - scaling · B @ A, in W's dtype (the inverse of merge_lora)."""
    return (weight.float() - lora_delta(a, b, scaling)).to(weight.dtype)
