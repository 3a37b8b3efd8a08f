"""Attach LoRA adapters to a loaded model core, unmerged, and choose them per call or per row.

    model = load_model("nano")
    attach_adapter(model, "runs/math", "math")
    attach_adapter(model, "runs/reverse", "reverse")
    with active_adapters(model, ["math", None, "reverse"]):   # one name per row of the batch
        generate(model, tokenizer, [p1, p2, p3], config)
    with active_adapters(model, "math"):                        # every row
        ...

Attaching swaps each targeted linear for a LoRALinear that wraps it (module names are PEFT's,
so `model.layers.0.self_attn.q_proj` in the file is the same module here); the model code
is not changed.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from qwenlab.adapters.lora_linear import LoRALinear, Selection
from qwenlab.adapters.peft_format import LoraAdapter, check_adapter_fits, read_adapter
from qwenlab.errors import QwenlabError

Choice = str | None | Sequence[str | None]


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for module in lora_modules(model).values():
        names.update(dict.fromkeys(module.lora_A))
    return list(names)


def _base_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            shapes[name + ".weight"] = (module.out_features, module.in_features)
        elif isinstance(module, nn.Linear) or hasattr(module, "in_features"):
            shapes[name + ".weight"] = (module.out_features, module.in_features)
    return shapes


def attach_adapter(model: nn.Module, adapter: LoraAdapter | str | Path, name: str) -> LoraAdapter:
    """Add `adapter` (a folder or a LoraAdapter) to `model` under `name`, inactive until chosen."""
    if not isinstance(adapter, LoraAdapter):
        adapter = read_adapter(adapter)
    if name in adapter_names(model):
        raise QwenlabError(f"an adapter named '{name}' is already attached")
    check_adapter_fits(adapter, _base_shapes(model), base_name="the loaded model")
    for module_name in adapter.modules:
        module = model.get_submodule(module_name)
        if not isinstance(module, LoRALinear):
            parent_name, _, child = module_name.rpartition(".")
            module = LoRALinear(module)
            setattr(model.get_submodule(parent_name), child, module)
        a, b = adapter.modules[module_name]
        module.add_adapter(name, a, b, adapter.scaling(module_name))
    return adapter


def detach_adapter(model: nn.Module, name: str) -> None:
    """Remove an adapter (unmerging it first if merged); linears with no adapter left are unwrapped."""
    _check_names(model, [name])
    for module_name, module in lora_modules(model).items():
        module.remove_adapter(name)
        if not module.lora_A:
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.base_layer)


def _check_names(model: nn.Module, names: list[str]) -> None:
    known = adapter_names(model)
    for name in names:
        if name not in known:
            raise QwenlabError(f"unknown adapter '{name}'; attached: {', '.join(known) or 'none'}")


def set_active_adapters(model: nn.Module, choice: Choice) -> None:
    """Choose the adapter(s) for the following forward calls: a name, None, or one entry per row."""
    selection = Selection.build(list(choice) if choice is not None and not isinstance(choice, str) else choice)
    if selection is not None:
        _check_names(model, selection.names())
    for module in lora_modules(model).values():
        module.selection = selection


@contextmanager
def active_adapters(model: nn.Module, choice: Choice) -> Iterator[None]:
    """`with active_adapters(model, ["math", None]):` - the choice holds inside the block only."""
    previous = {name: m.selection for name, m in lora_modules(model).items()}
    set_active_adapters(model, choice)
    try:
        yield
    finally:
        for name, module in lora_modules(model).items():
            module.selection = previous.get(name)


def merge_adapter(model: nn.Module, name: str) -> None:
    """Fold an adapter into the base weights (W + scaling·B@A): it then applies to every row."""
    _check_names(model, [name])
    for module in lora_modules(model).values():
        module.merge(name)


def unmerge_adapter(model: nn.Module, name: str) -> None:
    _check_names(model, [name])
    for module in lora_modules(model).values():
        module.unmerge(name)


@contextmanager
def without_adapter_wrappers(model: nn.Module) -> Iterator[None]:
    """Inside the block, each LoRALinear is replaced by its base layer, whose weight holds every adapter merged into
    it: the model is a plain one again (a float model's native decode stack then runs, see quant.float_native).
    Refused while any adapter is unmerged: the block would silently drop it."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                unmerged = [a for a in child.lora_A if a not in child.merged]
                if unmerged:
                    raise QwenlabError(f"adapter '{unmerged[0]}' is not merged: merge it before running without the "
                                       "adapter wrappers")
                swapped.append((parent, name, child))
    for parent, name, wrapper in swapped:
        parent._modules[name] = wrapper.base_layer
    try:
        yield
    finally:
        for parent, name, wrapper in swapped:
            parent._modules[name] = wrapper


def load_model_with_adapters(base, adapters: dict[str, str | Path] | None = None, dtype: str | torch.dtype = "fp32"):
    """Load a base model folder (or 'nano') and attach adapters {name: folder}."""
    from qwenlab.model import load_model

    model = load_model(base, dtype)
    for name, folder in (adapters or {}).items():
        attach_adapter(model, folder, name)
    return model
