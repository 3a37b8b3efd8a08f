"""Model breadcrumbs: drop the largest (outliers) and smallest entries of each task vector."""

from __future__ import annotations

import torch

from qwenlab.merge.methods.sparsify import keep_middle_
from qwenlab.merge.methods.spec import MergeMethod, Parameter
from qwenlab.merge.methods.task_arithmetic import combine_task_vectors, task_vector_parameters


def _crumbs(delta: torch.Tensor, index: int, params: dict) -> torch.Tensor:
    return keep_middle_(delta, params["density"][index], params["gamma"][index], rescale=params["rescale"])


def merge_breadcrumbs(tensors: list[torch.Tensor], params: dict) -> torch.Tensor:
    """δ̂ᵢ keeps the ⌊densityᵢ·n⌋ entries of δᵢ = xᵢ − base just below the ⌊gammaᵢ·n⌋ largest |δᵢ|;
    out = base + λ · Σᵢ wᵢ·δ̂ᵢ (÷ Σᵢ wᵢ if normalize).

    Davari & Belilovsky 2024, "Model breadcrumbs" (arXiv:2312.06795).
    """
    return combine_task_vectors(tensors, params, sparsify=_crumbs)


def merge_breadcrumbs_ties(tensors: list[torch.Tensor], params: dict) -> torch.Tensor:
    """δ̂ᵢ as in breadcrumbs; s = sign(Σᵢ wᵢ·δ̂ᵢ); out = base + λ · Σᵢ [sign(wᵢδ̂ᵢ) = s]·wᵢ·δ̂ᵢ
    (÷ Σᵢ [sign(wᵢδ̂ᵢ) = s]·wᵢ if normalize). Davari & Belilovsky 2024 (arXiv:2312.06795) with
    TIES's election (arXiv:2306.01708)."""
    return combine_task_vectors(tensors, params, sparsify=_crumbs, elect_sign=True)


_GAMMA = Parameter("gamma", float, "non_base", default=0.01, low=0.0, high=1.0,
                   description="fraction of largest entries removed")

BREADCRUMBS = MergeMethod(
    name="breadcrumbs",
    function=merge_breadcrumbs,
    parameters=task_vector_parameters(normalize=False, rescale=False) + (_GAMMA,),
    base="required",
    min_models=0,
    takes_float32_inputs=False,
    reference="https://arxiv.org/abs/2312.06795",
)

BREADCRUMBS_TIES = MergeMethod(
    name="breadcrumbs_ties",
    function=merge_breadcrumbs_ties,
    parameters=task_vector_parameters(normalize=False, rescale=False) + (_GAMMA,),
    base="required",
    min_models=0,
    takes_float32_inputs=False,
    reference="https://arxiv.org/abs/2312.06795",
)
