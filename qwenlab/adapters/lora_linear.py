"""LoRALinear: a base linear-like module plus several named LoRA adapters, chosen per row.

    y[row] = base(x[row]) + scaling_a · (x[row] Aₐᵀ) Bₐᵀ     a = the adapter chosen for that row

The base may be any module mapping [..., in] -> [..., out] (nn.Linear today, a quantized linear
later); only merge/unmerge need it to have a `.weight`. The choice of adapters is a Selection set
on the module before forward (apply.py sets the same Selection on every LoRALinear of a model);
rows whose adapter is None get the base only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwenlab.adapters.dropout import lora_dropout
from qwenlab.adapters.merge import merge_lora, unmerge_lora
from qwenlab.errors import QwenlabError


@dataclass(frozen=True)
class Selection:
    """Which adapter each row of the batch uses: (name, row indices or None for all rows) groups."""

    batch: int | None  # None: any batch size (one adapter for every row)
    groups: tuple[tuple[str, torch.Tensor | None], ...]

    @classmethod
    def build(cls, choice: str | None | list[str | None] | tuple[str | None, ...]) -> "Selection | None":
        if choice is None:
            return None
        if isinstance(choice, str):
            return cls(None, ((choice, None),))
        rows: dict[str, list[int]] = {}
        for row, name in enumerate(choice):
            if name is not None:
                rows.setdefault(name, []).append(row)
        batch = len(choice)
        groups = tuple((name, None if len(r) == batch else torch.tensor(r)) for name, r in rows.items())
        return cls(batch, groups)

    def names(self) -> list[str]:
        return [name for name, _ in self.groups]


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        weight = getattr(base_layer, "weight", None)
        self.in_features = getattr(base_layer, "in_features", None) or weight.shape[1]
        self.out_features = getattr(base_layer, "out_features", None) or weight.shape[0]
        self.lora_A = nn.ParameterDict()  # name -> [r, in]
        self.lora_B = nn.ParameterDict()  # name -> [out, r]
        self.scaling: dict[str, float] = {}
        self.merged: list[str] = []  # adapters folded into base_layer.weight (they then apply to every row)
        self.selection: Selection | None = None
        self.dropout = 0.0  # training only (PEFT's lora_dropout): on the LoRA path's input, in train() mode
        # None: the LoRA path runs in the adapter's dtype. Training in bf16 sets bf16: fp32 master weights cast per
        # step, as autocast does, instead of every activation cast up to fp32 and the result back.
        self.compute_dtype: torch.dtype | None = None

    def add_adapter(self, name: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        if a.shape[1] != self.in_features or b.shape[0] != self.out_features or a.shape[0] != b.shape[1]:
            raise QwenlabError(f"adapter '{name}': lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit a "
                               f"linear of [out, in] = [{self.out_features}, {self.in_features}]")
        dtype = self._dtype()
        self.lora_A[name] = nn.Parameter(a.detach().to(dtype), requires_grad=False)
        self.lora_B[name] = nn.Parameter(b.detach().to(dtype), requires_grad=False)
        self.scaling[name] = float(scaling)

    def remove_adapter(self, name: str) -> None:
        if name in self.merged:
            self.unmerge(name)
        for table in (self.lora_A, self.lora_B):
            if name in table:
                del table[name]
        self.scaling.pop(name, None)

    def _dtype(self) -> torch.dtype:
        weight = getattr(self.base_layer, "weight", None)
        return weight.dtype if weight is not None and weight.is_floating_point() else torch.float32

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = scaling · B @ A in fp32."""
        return self.scaling[name] * (self.lora_B[name].float() @ self.lora_A[name].float())

    # ---- merge into the base weight -------------------------------------------------
    def merge(self, name: str) -> None:
        if name in self.merged or name not in self.lora_A:
            return
        weight = self._base_weight("merge")
        weight.data = merge_lora(weight.data, self.lora_A[name], self.lora_B[name], self.scaling[name])
        self.merged.append(name)

    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        weight = self._base_weight("unmerge")
        weight.data = unmerge_lora(weight.data, self.lora_A[name], self.lora_B[name], self.scaling[name])
        self.merged.remove(name)

    def _base_weight(self, action: str) -> torch.Tensor:
        weight = getattr(self.base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise QwenlabError(f"cannot {action} a LoRA adapter into a {type(self.base_layer).__name__} "
                               "(no floating-point weight); keep the adapter unmerged")
        return weight

    # ---- forward ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        selection = self.selection
        if selection is None:
            return out
        if selection.batch is not None and x.shape[0] != selection.batch:
            raise QwenlabError(f"the adapter selection has {selection.batch} rows but the batch has {x.shape[0]}")
        for name, rows in selection.groups:
            if name not in self.lora_A or name in self.merged:
                continue  # this adapter does not touch this module, or is already in the weight
            a, b = self.lora_A[name], self.lora_B[name]
            rows_x = x if rows is None else x.index_select(0, rows)
            if self.dropout and self.training:
                rows_x = lora_dropout(rows_x, self.dropout)
            if self.compute_dtype is not None:  # training: the adapter cast to the activations' dtype
                a, b = a.to(self.compute_dtype), b.to(self.compute_dtype)
            # In the adapter's dtype (fp32 adapters may ride on a bf16 base), back to the output's.
            delta = F.linear(F.linear(rows_x.to(a.dtype), a) * self.scaling[name], b).to(out.dtype)
            out = out + delta if rows is None else out.index_add(0, rows, delta)
        return out

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.lora_A[n].shape[0]}" for n in self.lora_A)
        return f"in={self.in_features}, out={self.out_features}, adapters=[{ranks}]"
