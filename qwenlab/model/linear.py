"""fp32 linear layers through oneDNN, which runs CPU decode and prefill far faster than F.linear.

On this project's CPUs (torch 2.13, 2 threads, Qwen2.5-0.5B shape) F.linear in fp32 goes through a
plain sgemm that re-packs the weight on every call, and is slower for 2-8 rows than for one.
oneDNN's linear (the kernel inductor uses for frozen CPU graphs) reads the same row-major weight in
place, with no copy and no extra memory:

    decode step, batch 1:  162 ms -> 96 ms       batch 8:  333 ms -> 143 ms
    prefill, 128 tokens:   1.48 s -> about 1.0 s
    (decode and TTFT against transformers and llama.cpp: benchmarks/results/speed_fp32.md)

Small weights stay on F.linear: oneDNN's fixed cost per call (~15 us) loses below about 0.5M
entries (measured: 256x256 at one row 6 us vs 18 us; 896x896 88 us vs 72 us), which keeps nano's
and Qwen2.5-0.5B's k/v projections where they are fastest.
bf16 F.linear already calls oneDNN (outputs are bit-identical), so only fp32 takes the other path.
Autograd has no formula for the oneDNN op: when a gradient must flow through the layer (GRPO's
LoRA training runs on this model), F.linear is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _onednn_linear_available()
ONEDNN_MIN_WEIGHT = 512 * 1024  # entries; see the module docstring


def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through oneDNN for large fp32 weights when no gradient is needed."""
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if (ONEDNN and not wants_grad and weight.numel() >= ONEDNN_MIN_WEIGHT and x.device.type == "cpu"
            and x.dtype == torch.float32 and weight.dtype == torch.float32):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, names and state dict) whose forward is fast_linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_linear(x, self.weight, self.bias)
