"""What a merge method declares: its parameters (type, scope, default, allowed range) and its inputs.

A method itself is a pure function `(tensors, params) -> tensor` computing in float32. When the
method uses a base model, `tensors[0]` is the base and `tensors[1:]` the other models, in config
order; per-model parameters arrive as lists aligned with the tensors they apply to.
`params["out_dtype"]` (when given) is the dtype the result will be stored in: a method may round
to it as it writes its result, saving a pass over a float32 copy; others return float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

REQUIRED = object()

# shared: one value per tensor, read from slice and global `parameters` only (as mergekit does);
# input: one value per input model; non_base: one value per input model other than the base.
Scope = Literal["shared", "input", "non_base"]
BasePolicy = Literal["required", "optional", "ignored"]


@dataclass(frozen=True)
class Parameter:
    name: str
    type: type  # float, int or bool: YAML values are validated with pydantic, as mergekit does
    scope: Scope = "shared"
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # density is in (0, 1]: 0 itself is refused
    description: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def allowed_range(self) -> str:
        left = "(" if self.low_open else "["
        return f"{left}{self.low}, {self.high}]"

    def in_range(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value <= self.high


@dataclass(frozen=True)
class MergeMethod:
    name: str
    function: Callable[[list[torch.Tensor], dict], torch.Tensor]
    parameters: tuple[Parameter, ...] = ()
    base: BasePolicy = "ignored"
    # Counted without the base when the method uses one (base "required" or "optional").
    min_models: int = 1
    max_models: int | None = None
    reference: str = ""
    # False: the method gets tensors in their stored dtype and upcasts as it computes (saves a
    # float32 copy of every input where the arithmetic can promote on the fly).
    takes_float32_inputs: bool = True
    uses_seed: bool = False  # DARE/DELLA draw random masks: the executor passes a per-tensor seed
    # regmean: the executor passes params["grams"], each input's Gram matrix of the inputs of the linear
    # the tensor belongs to (None for tensors that are not a linear's weight), measured on the model's `data`
    needs_activations: bool = False
    # regmean_sequential: the executor solves every decoder linear once per merge, in forward order on the
    # merged model's own activations (merge/layerwise.py), and passes params["solved"] (None for other tensors)
    solves_layers: bool = False

    def parameter(self, name: str) -> Parameter | None:
        return next((p for p in self.parameters if p.name == name), None)

    def parameter_names(self) -> list[str]:
        return [p.name for p in self.parameters]
