"""NuSLERP: SLERP between two models (or their task vectors), weighted by relative weights."""

from __future__ import annotations

import torch

from qwenlab.merge.methods.spec import MergeMethod, Parameter

COLINEAR_EPS = 1e-8


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool) -> torch.Tensor:
    """SLERP of v0→v1 at t along the last axis (per row), the first axis (row_wise), or flattened.

    cos θ per vector, clamped to [−1, 1]; colinear vectors (1 − cos²θ ≤ 1e-16) interpolate
    linearly. mergekit's nuslerp.
    """
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    unit0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    unit1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos_theta = (unit0 * unit1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def merge_nuslerp(tensors: list[torch.Tensor], params: dict) -> torch.Tensor:
    """t = w₁/(w₀+w₁) (0.5 if the weights sum to ~0). With a base (tensors[0]), the task vectors
    are interpolated: base + nuslerp(t, x₀ − base, x₁ − base). mergekit's NuSLERP."""
    has_base = len(tensors) == 3
    base = tensors[0] if has_base else None
    first, second = tensors[-2:]
    weights = params["weight"]
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    options = {"row_wise": params["nuslerp_row_wise"], "flatten": params["nuslerp_flatten"]}
    if base is None:
        return nuslerp(t, first, second, **options)
    return base + nuslerp(t, first - base, second - base, **options)


METHOD = MergeMethod(
    name="nuslerp",
    function=merge_nuslerp,
    parameters=(
        Parameter("weight", float, "non_base", description="relative weight of each of the two models"),
        Parameter("nuslerp_row_wise", bool, default=False, description="interpolate column vectors"),
        Parameter("nuslerp_flatten", bool, default=True, description="interpolate whole tensors"),
    ),
    base="optional",
    min_models=2,
    max_models=2,
    reference="https://github.com/arcee-ai/mergekit",
)
