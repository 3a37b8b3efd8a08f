"""The one place serve talks to qwenlab.adapters: attach, detach, and an adapter per batch row.

Adapters live in qwenlab.adapters' LoRALinear modules (attach/detach by module swap, as
`generate` uses them). For batches that mix adapters, serve adds its own stacked path
(the S-LoRA / Punica idea, as one dense op instead of one op per adapter): per adapted linear,
all adapters' A are concatenated into A_cat [R, in] and their B into B_cat [out, R], R = Σ r. Then

    y = base(x) + ((x A_catᵀ) ⊙ M) B_catᵀ        M[row, col] = scaling of col's adapter if it is row's, else 0

costs two thin matmuls per linear whatever the number of adapters (the per-group path in
LoRALinear costs five small ops per adapter present). Only the adapters present in the batch are
stacked (kept while they cover the batch, shrunk after a while; see _restack), so a lone adapter
costs r, not Σ r, once the others have gone.
It runs as a forward hook on each LoRALinear, whose own per-row selection is left empty, so the
module code is untouched.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qwenlab.adapters import LoraAdapter, adapter_names, attach_adapter, detach_adapter, read_adapter
from qwenlab.adapters.apply import lora_modules
from qwenlab.errors import QwenlabError

# Selects in a row whose batch needed fewer adapters than are stacked before the stacks shrink.
SHRINK_AFTER = 64


class _Stack:
    """One LoRALinear's adapters, concatenated; `layout` names which adapter and scaling each column has."""

    def __init__(self, module: nn.Module, order: list[str]):
        names = [n for n in order if n in module.lora_A and n not in module.merged]
        self.a = torch.cat([module.lora_A[n] for n in names]) if names else None
        self.b = torch.cat([module.lora_B[n] for n in names], dim=1) if names else None
        self.layout = tuple((order.index(n), module.lora_A[n].shape[0], module.scaling[n]) for n in names)


class AdapterSet:
    def __init__(self, model: nn.Module):
        self.model = model
        self.paths: dict[str, str] = {}
        self.known: set[str] = set()
        self._modules: list[nn.Module] = []
        self._handles: list = []
        self._stacks: dict[nn.Module, _Stack] = {}
        self._present: tuple[str, ...] = ()  # the adapters stacked now (a superset of the batch's)
        self._surplus_selects = 0
        self._masks: dict[tuple, torch.Tensor] = {}  # layout -> M [rows, 1, R] for the next forward
        self._rows: tuple | None = None
        self._rebuild()

    def names(self) -> list[str]:
        return sorted(self.known)

    @staticmethod
    def read(path: str | Path) -> LoraAdapter:
        """Read and check the files (slow; call off the engine thread)."""
        return read_adapter(path)

    def attach(self, name: str, adapter: LoraAdapter, path: str) -> None:
        """Module swap on the live model: call between forward passes only (the engine thread)."""
        if any(getattr(m, "qkv_proj", None) is not None or getattr(m, "gate_up_proj", None) is not None
               for m in self.model.modules()):
            raise QwenlabError("this quantized base was loaded with fused q|k|v and gate|up layers, which LoRA "
                               "cannot target; start the server with at least one --adapter to load it unfused")
        attach_adapter(self.model, adapter, name)
        self.paths[name] = str(path)
        self._rebuild()

    def detach(self, name: str) -> None:
        detach_adapter(self.model, name)
        self.paths.pop(name, None)
        self._rebuild()

    def select(self, rows: list[str | None]) -> None:
        """One adapter name (or None: the base alone) per row of the next forward pass."""
        key = tuple(rows)
        if key == self._rows:
            return  # the same rows as the last step: the masks still hold
        self._rows = key
        present = {r for r in rows if r is not None}
        self._masks = {}
        if not present:
            return
        self._restack(present)
        stacked = self._present
        row_adapter = torch.tensor([stacked.index(r) if r is not None else -1 for r in rows])
        dtypes = {stack.layout: stack.a.dtype for stack in self._stacks.values() if stack.a is not None}
        for layout, dtype in dtypes.items():
            column_adapter = torch.tensor([i for i, r, _ in layout for _ in range(r)])
            column_scaling = torch.tensor([s for _, r, s in layout for _ in range(r)])
            mask = (row_adapter[:, None] == column_adapter[None, :]) * column_scaling
            self._masks[layout] = mask[:, None, :].to(dtype)  # [rows, 1 (tokens), R]

    def _restack(self, present: set[str]) -> None:
        """Make the stacks hold every adapter in `present`.

        A prefill selects its newcomers' adapters and the decode right after selects every row's, so
        stacking exactly the present set re-concatenated every adapter matrix twice per admission.
        Instead a stack is kept while it covers the batch (an extra adapter's columns are masked to
        zero) and grows by union; it shrinks to the present set only after SHRINK_AFTER selects in a
        row that needed less, so a finished adapter does not cost its r columns for long.
        """
        stacked = set(self._present)
        if present <= stacked:
            self._surplus_selects = self._surplus_selects + 1 if present != stacked else 0
            if self._surplus_selects <= SHRINK_AFTER:
                return
            wanted = present
        else:
            wanted = present | stacked
        self._present = tuple(sorted(wanted))
        self._surplus_selects = 0
        self._stacks = {m: _Stack(m, list(self._present)) for m in self._modules}

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor):
        stack = self._stacks.get(module)
        mask = self._masks.get(stack.layout) if stack is not None else None
        if mask is None:
            return None  # no row of this batch uses an adapter here
        hidden = F.linear(inputs[0], stack.a).mul_(mask)  # [rows, tokens, R]
        if output.is_contiguous():  # add B·hidden into the base output in place: one op, no new tensor
            output.view(-1, output.shape[-1]).addmm_(hidden.view(-1, hidden.shape[-1]), stack.b.t())
            return output
        return output + F.linear(hidden, stack.b)

    def _rebuild(self) -> None:
        """After a module swap: hook the current LoRALinear modules; stacks are rebuilt on next select."""
        for handle in self._handles:
            handle.remove()
        self.known = set(adapter_names(self.model))
        self._modules = list(lora_modules(self.model).values())
        self._handles = []
        for module in self._modules:
            module.selection = None  # LoRALinear adds nothing itself; the hook adds every row's delta
            self._handles.append(module.register_forward_hook(self._hook))
        self._stacks, self._present, self._masks, self._rows = {}, (), {}, None
        self._surplus_selects = 0
