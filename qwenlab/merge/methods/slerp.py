"""SLERP: spherical interpolation between the base model and one other model."""

from __future__ import annotations

import math

import torch

from qwenlab.merge.methods.spec import MergeMethod, Parameter

DOT_THRESHOLD = 0.9995  # above this |cos θ| the arc is a line: interpolate linearly, as mergekit does
NORM_EPS = 1e-8


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """sin((1−t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1, θ the angle between the flattened tensors.

    cos θ = ⟨v0/‖v0‖, v1/‖v1‖⟩ over the whole tensor (a norm ≤ 1e-8 counts as 1); when
    |cos θ| > 0.9995 the result is (1−t)·v0 + t·v1. Shoemake 1985, "Animating rotation with
    quaternion curves"; the whole-tensor form is mergekit's.
    """
    norm0 = float(torch.linalg.vector_norm(v0))
    norm1 = float(torch.linalg.vector_norm(v1))
    norm0 = norm0 if norm0 > NORM_EPS else 1.0
    norm1 = norm1 if norm1 > NORM_EPS else 1.0
    dot = float(torch.dot(v0.reshape(-1), v1.reshape(-1))) / (norm0 * norm1)
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > DOT_THRESHOLD:
        coefficient0, coefficient1 = 1.0 - t, t
    else:
        theta = math.acos(dot)
        sin_theta = math.sin(theta)
        coefficient0 = math.sin((1.0 - t) * theta) / sin_theta
        coefficient1 = math.sin(t * theta) / sin_theta
    return v0.mul(coefficient0).add_(v1, alpha=coefficient1)


def merge_slerp(tensors: list[torch.Tensor], params: dict) -> torch.Tensor:
    """tensors = [base, other]; t = 0 gives the base, t = 1 the other model."""
    base, other = tensors
    return slerp(params["t"], base, other)


METHOD = MergeMethod(
    name="slerp",
    function=merge_slerp,
    parameters=(Parameter("t", float, low=0.0, high=1.0, description="0 = base model, 1 = the other"),),
    base="required",
    min_models=1,
    max_models=1,
    reference="https://en.wikipedia.org/wiki/Slerp",
)
