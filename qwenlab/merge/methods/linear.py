"""Linear merge: a weighted average of the models."""

from __future__ import annotations

import torch

from qwenlab.errors import QwenlabError
from qwenlab.merge.methods.elementwise import CHUNK, chunks, one_thread
from qwenlab.merge.methods.spec import MergeMethod, Parameter


def merge_linear(tensors: list[torch.Tensor], params: dict) -> torch.Tensor:
    """out = Σᵢ wᵢ·xᵢ / Σᵢ wᵢ (normalize, the default), or Σᵢ wᵢ·xᵢ.

    Wortsman et al. 2022, "Model soups" (arXiv:2203.05482). Every listed model is an input,
    the base model too when it is given (mergekit appends it to the inputs).
    """
    weights = params["weight"]
    total = sum(weights)
    if params.get("normalize", True) and total == 0:
        raise QwenlabError("linear: the weights sum to 0, so they cannot be normalized "
                           "(set normalize: false or change the weights)")
    normalize = params.get("normalize", True)
    flat = [tensor.reshape(-1) for tensor in tensors]
    result = torch.empty(tensors[0].shape, dtype=params.get("out_dtype", torch.float32))
    accumulator_buffer, upcast_buffer = torch.empty((2, min(CHUNK, result.numel())), dtype=torch.float32)
    with one_thread():
        for part in chunks(result.numel()):
            size = part.stop - part.start
            accumulator = accumulator_buffer[:size].copy_(flat[0][part]).mul_(weights[0])
            for tensor, weight in zip(flat[1:], weights[1:]):
                accumulator.add_(upcast_buffer[:size].copy_(tensor[part]), alpha=weight)
            if normalize:
                accumulator.div_(total)
            result.view(-1)[part].copy_(accumulator)  # rounded once, to the stored dtype
    return result


METHOD = MergeMethod(
    name="linear",
    function=merge_linear,
    parameters=(
        Parameter("weight", float, "input", description="the model's weight"),
        Parameter("normalize", bool, default=True, description="divide by the sum of weights"),
    ),
    reference="https://arxiv.org/abs/2203.05482",
    takes_float32_inputs=False,
)
