"""RegMean solved layer by layer on the merged model's own activations (merge/layerwise.py does the solve).

Nguyen et al. 2025, "RegMean++" (arXiv:2508.03121): each decoder linear is the least-squares fit

    min_W Σᵢ λᵢ ‖X̃ᵢ Wᵀ - Yᵢ‖² + ρ‖W - W̄‖²

where X̃ᵢ are the inputs that linear gets in the merged model (the layers before it already merged) on model
i's data. Yᵢ comes from model i's own forward pass (match_outputs, the default: see merge/layerwise.py) or is
X̃ᵢ Wᵢᵀ (RegMean++ as published).
`distill_steps` > 0 then trains the solved linears for that many steps towards each model's own next-token
distributions on the answers of its data (merge/distill.py): the solve matches activations layer by layer, the
distillation the outputs end to end.
The executor solves the whole model once per merge and hands each linear its weight in params["solved"];
any other tensor (embeddings, norms, biases) is the λ-weighted average.
"""

from __future__ import annotations

import torch

from qwenlab.errors import QwenlabError
from qwenlab.merge.methods.spec import MergeMethod, Parameter

# x the mean diagonal, as regmean's. On nano's specialists 1e-4 scored within noise of it in float32 (0.665/0.435
# against 0.645/0.425 on 200 validation prompts) and its int4 variant answered nothing (0.03/0.00, against
# 0.455/0.38); 1e-2 cost float32 accuracy (0.595/0.40). docs/merge.md.
DEFAULT_RIDGE = 1e-3
# 200 steps from the solve's merge of nano's specialists: the worst kept share went from 91% to 93% on 600
# validation prompts and from 88% to 92% on 400 test prompts (docs/merge.md); 2e-4 for 40 steps gained nothing.
DEFAULT_DISTILL_LR = 1e-4


def merge_regmean_sequential(tensors: list[torch.Tensor], params: dict) -> torch.Tensor:
    """W = argmin Σᵢ λᵢ‖X̃ᵢWᵀ - Yᵢ‖² + ρ‖W - W̄‖², solved layer by layer (merge/layerwise.py) for a decoder
    linear's weight; out = Σᵢ λᵢ xᵢ / Σᵢ λᵢ for any other tensor. Nguyen et al. 2025 (arXiv:2508.03121)."""
    if params.get("solved") is not None:
        return params["solved"]
    weights = params["weight"]
    if sum(weights) <= 0:
        raise QwenlabError("regmean_sequential: the weights of the inputs must sum to more than 0")
    return sum(w * t for w, t in zip(weights, tensors)) / sum(weights)


METHOD = MergeMethod(
    name="regmean_sequential",
    function=merge_regmean_sequential,
    parameters=(
        Parameter("weight", float, "input", default=1.0, low=0.0,
                  description="the model's share of each linear's regression"),
        Parameter("ridge", float, default=DEFAULT_RIDGE, low=0.0,
                  description="pull towards the weighted average in directions the data leaves free"),
        Parameter("match_outputs", bool, default=True,
                  description="fit each model's own outputs (true) or its weights on the merged inputs (RegMean++)"),
        Parameter("distill_steps", int, default=0, low=0,
                  description="then this many Adam steps on the linears towards each model's answers (merge/distill.py)"),
        Parameter("distill_lr", float, default=DEFAULT_DISTILL_LR, low=0.0, low_open=True,
                  description="the distillation's learning rate"),
    ),
    min_models=2,
    reference="https://arxiv.org/abs/2508.03121",
    needs_activations=True,
    solves_layers=True,
)
