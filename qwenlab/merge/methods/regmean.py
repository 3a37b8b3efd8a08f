"""RegMean: each linear's weight chosen so its outputs match every model's own on that model's data.

Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models" (arXiv:2212.09849).
For a linear with input Gram matrices Gᵢ = XᵢᵀXᵢ (model i's inputs on its own examples, see
merge/activations.py), min Σᵢ λᵢ‖Xᵢ W - Xᵢ Wᵢ‖² has the closed form

    Wᵀ = (Σᵢ λᵢ G̃ᵢ)⁻¹ Σᵢ λᵢ G̃ᵢ Wᵢᵀ,   G̃ = α·G + (1 - α)·diag(G)

α < 1 shrinks the off-diagonal terms towards a per-feature weighted average (α = 0 is exactly that).
Directions the data never reaches are left free by the regression: a plain solve fills them with
weights 10-40x the inputs' (measured on nano), harmless in float32 and ruinous once quantized. So the
solve also pulls W towards the weighted average W̄ = Σᵢ λᵢWᵢ / Σᵢ λᵢ with ρ·I (ρ = `ridge` x the mean
diagonal of Σᵢ λᵢG̃ᵢ): Wᵀ = (Σᵢ λᵢG̃ᵢ + ρI)⁻¹ (Σᵢ λᵢG̃ᵢWᵢᵀ + ρW̄ᵀ).
Where two tasks' inputs occupy different directions, each keeps its own model's map; task arithmetic
instead adds both deltas everywhere. Tensors that are not a linear's weight (embeddings, norms, biases)
get the λ-weighted average. Every listed model is an input: list the base too, with data of the skills
it should keep.
"""

from __future__ import annotations

import torch

from qwenlab.errors import QwenlabError
from qwenlab.merge.methods.spec import MergeMethod, Parameter

DEFAULT_RIDGE = 0.001  # x the mean diagonal: the pull towards the weighted average (see above)


def merge_regmean(tensors: list[torch.Tensor], params: dict) -> torch.Tensor:
    """Wᵀ = (Σᵢ λᵢ G̃ᵢ)⁻¹ Σᵢ λᵢ G̃ᵢ Wᵢᵀ for a linear's weight; out = Σᵢ λᵢ xᵢ / Σᵢ λᵢ for any other tensor.

    Jin et al. 2023 (arXiv:2212.09849). params["grams"] holds each model's Gram matrix of the linear's inputs.
    """
    weights, grams, alpha = params["weight"], params.get("grams"), params["alpha"]
    if sum(weights) <= 0:
        raise QwenlabError("regmean: the weights must sum to more than 0")
    if grams is None or any(g is None for g in grams):
        return sum(w * t for w, t in zip(weights, tensors)) / sum(weights)
    lhs = torch.zeros_like(grams[0], dtype=torch.float64)
    rhs = torch.zeros((tensors[0].shape[1], tensors[0].shape[0]), dtype=torch.float64)
    average = torch.zeros_like(rhs)
    for weight, gram, tensor in zip(weights, grams, tensors):
        if weight == 0:
            continue
        gram = gram.to(torch.float64)
        shrunk = alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))
        lhs += weight * shrunk
        rhs += weight * (shrunk @ tensor.to(torch.float64).T)
        average += weight * tensor.to(torch.float64).T
    return ridge_solve(lhs, rhs, average / sum(weights), params.get("ridge", DEFAULT_RIDGE)).T.to(torch.float32) \
        .contiguous()


def ridge_solve(lhs: torch.Tensor, rhs: torch.Tensor, average: torch.Tensor, ridge: float) -> torch.Tensor:
    """Wᵀ from (lhs + ρI) Wᵀ = rhs + ρ W̄ᵀ, ρ = ridge x the mean diagonal of lhs: least squares pulled towards W̄
    (`average`, [in, out]) in the directions the data leaves free. float64 in, float64 out."""
    rho = ridge * max(lhs.diagonal().mean().item(), 1e-12)
    lhs = lhs.clone()
    lhs.diagonal().add_(rho)
    return torch.linalg.solve(lhs, rhs + rho * average)


METHOD = MergeMethod(
    name="regmean",
    function=merge_regmean,
    parameters=(
        Parameter("weight", float, "input", default=1.0, low=0.0,
                  description="the model's share of the regression (scales its Gram matrices)"),
        # 1 (plain least squares, with a small ridge) by default: on nano's specialists 0.95 already cost the
        # arithmetic specialist a third of its skill (0.48 -> 0.30), where the paper's T5 runs preferred < 1
        Parameter("ridge", float, default=DEFAULT_RIDGE, low=0.0,
                  description="pull towards the weighted average in directions the data leaves free"),
        Parameter("alpha", float, default=1.0, low=0.0, high=1.0,
                  description="scale of the Gram matrices' off-diagonal terms (1: plain least squares)"),
    ),
    min_models=2,
    reference="https://arxiv.org/abs/2212.09849",
    needs_activations=True,
)
