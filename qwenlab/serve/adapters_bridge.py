"""The one place serve talks to qwenlab.adapters: attach, detach, and an adapter per batch row.

Adapters live in qwenlab.adapters' LoRALinear modules (attach/detach by module swap, as
`generate` uses them). For batches that mix adapters, serve adds its own path (the S-LoRA /
Punica idea: one op per linear for the whole batch, not one per adapter). It replaces each LoRALinear's
forward while serve owns the model (an instance attribute; the module code is untouched).
Two implementations:

- kernel (fp32 activations, where qwenlab's native kernels run): per linear, the adapters' A are stacked
  into [n, R, in] and their B (scaling folded in) into [n, R, out], ranks zero-padded to R; one call of
  lora_bgmv.cpp adds to each token's base output the delta of its own row's adapter. A token costs
  R (in + out) multiply-adds whatever n is. The stacks are fp32 or bf16 (`lora_dtype`, vLLM's
  --lora-dtype): bf16 halves the bytes a decode step reads (measured: ~1 ms off a ~48 ms step on the 0.5B
  int4 shape with 8 adapters). "auto" stores bf16 over a bf16 or quantized base, whose own weights are
  coarser than that, and fp32 over an fp32 base.
- dense (any dtype, any CPU): all adapters' A concatenated into A_cat [R, in] and B into B_cat [out, R],
  R = Σ r, and

      y = base(x) + ((x A_catᵀ) ⊙ M) B_catᵀ        M[row, col] = scaling of col's adapter if it is row's, else 0

  two thin matmuls per linear, but every token pays for every stacked adapter's columns: with 8
  adapters of r 8 on nano that was 40% more multiply-adds than the base (measured: mixed-adapter
  decode at 0.62-0.68x the base's speed, against ~0.8-0.9x with the kernel; benchmarks/serve_bench.py).

Only the adapters present in the batch are stacked (kept while they cover the batch, shrunk after a
while; see _restack), so a lone adapter costs r, not Σ r, once the others have gone.
"""

from __future__ import annotations

import itertools
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qwenlab.adapters import LoraAdapter, adapter_names, attach_adapter, detach_adapter, read_adapter
from qwenlab.adapters.apply import lora_modules
from qwenlab.checkpoint.dtypes import parse_dtype
from qwenlab.errors import QwenlabError
from qwenlab import native
from qwenlab.quant.native import LoraKernelStack, lora_table

# What the kernel path's stacks may hold (serve's --lora-dtype).
LORA_DTYPES = ("auto", "fp32", "bf16")
# Selects in a row whose batch needed fewer adapters than are stacked before the stacks shrink.
SHRINK_AFTER = 64


class _Stack:
    """One LoRALinear's adapters, concatenated (dense path); `layout` names which adapter and scaling
    each column has."""

    def __init__(self, module: nn.Module, order: list[str]):
        names = [n for n in order if n in module.lora_A and n not in module.merged]
        self.a = torch.cat([module.lora_A[n] for n in names]) if names else None
        self.b = torch.cat([module.lora_B[n] for n in names], dim=1) if names else None
        self.layout = tuple((order.index(n), module.lora_A[n].shape[0], module.scaling[n]) for n in names)


_attach_counter = itertools.count(1)


class AdapterSet:
    def __init__(self, model: nn.Module, kernel: bool | None = None, dtype: str = "auto"):
        """kernel: use lora_bgmv (None: wherever it runs, for fp32 adapters; False: always the dense path).
        dtype: the kernel's stacks, one of LORA_DTYPES ("auto": bf16 over a bf16 or quantized base)."""
        if dtype not in LORA_DTYPES:
            raise QwenlabError(f"lora dtype must be one of {', '.join(LORA_DTYPES)}, got '{dtype}'")
        self.model = model
        self.kernel_allowed = kernel
        self.dtype = dtype
        self.stack_dtype = torch.float32
        self.use_kernel = False
        self.paths: dict[str, str] = {}
        self.versions: dict[str, int] = {}  # name -> which attach loaded it (prefix cache namespaces)
        self.known: set[str] = set()
        self._modules: list[nn.Module] = []
        self._stacks: dict[nn.Module, _Stack | LoraKernelStack] = {}
        self._present: tuple[str, ...] = ()  # the adapters stacked now (a superset of the batch's)
        self._surplus_selects = 0
        self._masks: dict[tuple, torch.Tensor] = {}  # dense: layout -> M [rows, 1, R] for the next forward
        self._row_adapter: torch.Tensor | None = None  # kernel: int32 [rows], index into _present or -1
        self._row_adapter_ptr = 0
        self._rows: tuple | None = None
        self._native_table: tuple | None = None  # (decode stack, stacks, lora_table) for native_deltas
        self._rebuild()
        # The one-call native decode stack asks this object for each step's deltas (native_deltas): with
        # adapters attached, a decode step stays one native call (quant.native.run_decode_stack).
        model.row_adapters = self

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
        self.versions[name] = next(_attach_counter)
        self._rebuild()

    def detach(self, name: str) -> None:
        detach_adapter(self.model, name)
        self.paths.pop(name, None)
        self.versions.pop(name, None)
        self._rebuild()

    def select(self, rows: list[str | None]) -> None:
        """One adapter name (or None: the base alone) per row of the next forward pass."""
        key = tuple(rows)
        if key == self._rows:
            return  # the same rows as the last step: the masks still hold
        self._rows = key
        present = {r for r in rows if r is not None}
        self._masks, self._row_adapter = {}, None
        if not present:
            return
        self._restack(present)
        stacked = self._present
        row_adapter = torch.tensor([stacked.index(r) if r is not None else -1 for r in rows])
        if self.use_kernel:
            self._row_adapter = row_adapter.to(torch.int32)
            self._row_adapter_ptr = self._row_adapter.data_ptr()
            return
        dtypes = {stack.layout: stack.a.dtype for stack in self._stacks.values() if stack.a is not None}
        for layout, dtype in dtypes.items():
            column_adapter = torch.tensor([i for i, r, _ in layout for _ in range(r)])
            column_scaling = torch.tensor([s for _, r, s in layout for _ in range(r)])
            mask = (row_adapter[:, None] == column_adapter[None, :]) * column_scaling
            self._masks[layout] = mask[:, None, :].to(dtype)  # [rows, 1 (tokens), R]

    def native_deltas(self, stack):
        """For the native decode stack's step: None where no row of the batch uses an adapter, the stacked
        adapters as its table and each row's index where the kernel path holds them (fp32 lora_bgmv stacks),
        else False (the dense path: the layers then run one by one, through _forward)."""
        if not self.use_kernel:
            return False
        if self._row_adapter is None:
            return None
        cached = self._native_table
        if cached is None or cached[0] is not stack or cached[1] is not self._stacks:
            cached = self._native_table = (stack, self._stacks, lora_table(stack.wrapped, self._stacks))
        return cached[2], self._row_adapter

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
        order = list(self._present)
        self._stacks = {m: LoraKernelStack(m, order, self.stack_dtype) if self.use_kernel else _Stack(m, order)
                        for m in self._modules}

    def _forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The LoRALinear's forward while serve owns it: the base output plus every row's own delta."""
        out = module.base_layer(x)
        stack = self._stacks.get(module)
        if stack is None:
            return out
        if self.use_kernel:
            if self._row_adapter is None or not stack.active:
                return out  # no row of this batch uses an adapter here
            if x.dtype != torch.float32 or not x.is_contiguous():
                x = x.float().contiguous()
            rows, width = x.shape[0], x.shape[-1]
            if rows != len(self._row_adapter):  # the kernel indexes row_adapter by row: never read past it
                raise QwenlabError(f"the adapter selection has {len(self._row_adapter)} rows but the batch has {rows}")
            tokens = x.numel() // (rows * width)
            target = out if out.dtype == torch.float32 and out.is_contiguous() else torch.zeros(out.shape)
            status = self._bgmv(x.data_ptr(), x.numel(), rows, tokens, width, self._row_adapter_ptr, rows,
                                stack.a_ptr, stack.a_len, stack.bt_ptr, stack.bt_len, stack.count, stack.rank,
                                stack.out_features, target.data_ptr(), target.numel(),
                                native.kernel_threads(), stack.bits)  # in place: target += delta
            if status != 0:
                raise QwenlabError(f"lora_bgmv failed on a rank-{stack.rank} stack")
            return out if target is out else out + target.to(out.dtype)
        mask = self._masks.get(stack.layout)
        if mask is None:
            return out
        hidden = F.linear(x, stack.a).mul_(mask)  # [rows, tokens, R]
        if out.is_contiguous():  # add B·hidden into the base output in place: one op, no new tensor
            out.view(-1, out.shape[-1]).addmm_(hidden.view(-1, hidden.shape[-1]), stack.b.t())
            return out
        return out + F.linear(hidden, stack.b)

    def _kernel_fits(self) -> bool:
        """lora_bgmv runs here: the kernel builds, and every adapter is fp32 or bf16 with a rank it takes."""
        if self.kernel_allowed is False or not self._modules or not native.available():
            return False
        # (bf16 adapters of a bf16 base too: the kernel's stacks are fp32 copies, its activations fp32)
        return all(a.dtype in (torch.float32, torch.bfloat16) and a.shape[0] <= native.LORA_MAX_RANK
                   for m in self._modules for a in m.lora_A.values())

    def _rebuild(self) -> None:
        """After a module swap: take over the current LoRALinear modules; stacks are rebuilt on next select."""
        for module in self._modules:
            module.__dict__.pop("forward", None)  # back to LoRALinear.forward
        self.known = set(adapter_names(self.model))
        self._modules = list(lora_modules(self.model).values())
        for module in self._modules:
            module.selection = None  # LoRALinear's own per-row path stays off: _forward adds every row's delta
            # An instance attribute, not a forward hook: a hook costs a slower nn.Module call path and
            # a second Python call per linear, ~5 µs each, which is a tenth of a nano decode step.
            module.forward = partial(self._forward, module)
        self._stacks, self._present, self._masks, self._rows, self._row_adapter = {}, (), {}, None, None
        self._surplus_selects, self._native_table = 0, None
        self.use_kernel = self._kernel_fits()
        self._bgmv = native.library().lora_bgmv if self.use_kernel else None
        self.stack_dtype = self._stack_dtype()

    def _stack_dtype(self) -> torch.dtype:
        """The kernel stacks' dtype: as told, or for "auto" bf16 where the base's linears are quantized or bf16."""
        if self.dtype != "auto":
            return parse_dtype(self.dtype, "lora dtype", allowed=("fp32", "bf16"))
        base = self._modules[0].base_layer if self._modules else None
        weight = getattr(base, "weight", None)
        coarse = hasattr(base, "qweight") or (weight is not None and weight.dtype == torch.bfloat16)
        return torch.bfloat16 if coarse else torch.float32
