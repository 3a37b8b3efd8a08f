"""Passthrough: copy one model's tensor unchanged (optionally scaled); used to stack layer slices."""

from __future__ import annotations

import torch

from qwenlab.merge.methods.spec import MergeMethod, Parameter


def merge_passthrough(tensors: list[torch.Tensor], params: dict) -> torch.Tensor:
    """out = x (or scale·x). Layer stacking ("frankenmerges") comes from `slices`, not from
    this function: each output layer copies one source layer. Goddard et al. 2024, "Arcee's
    MergeKit" (arXiv:2403.13257)."""
    (tensor,) = tensors
    scale = params["scale"][0]
    return tensor if scale is None else tensor * scale


METHOD = MergeMethod(
    name="passthrough",
    function=merge_passthrough,
    parameters=(Parameter("scale", float, "input", default=None, description="multiply the tensor"),),
    min_models=1,
    max_models=1,
    reference="https://arxiv.org/abs/2403.13257",
    takes_float32_inputs=False,
)
