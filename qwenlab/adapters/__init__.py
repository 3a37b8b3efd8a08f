"""LoRA adapters: PEFT's file format, run-time multi-adapter layers, merge, extract and combine."""

from qwenlab.adapters.adapted_checkpoint import AdaptedCheckpoint, merge_adapter_into_folder
from qwenlab.adapters.apply import (
    active_adapters,
    adapter_names,
    attach_adapter,
    detach_adapter,
    load_model_with_adapters,
    merge_adapter,
    set_active_adapters,
    unmerge_adapter,
    without_adapter_wrappers,
)
from qwenlab.adapters.lora_linear import LoRALinear
from qwenlab.adapters.peft_format import LoraAdapter, is_adapter_folder, read_adapter, write_adapter

__all__ = ["AdaptedCheckpoint", "LoRALinear", "LoraAdapter", "active_adapters", "adapter_names", "attach_adapter",
           "detach_adapter", "is_adapter_folder", "load_model_with_adapters", "merge_adapter",
           "merge_adapter_into_folder", "read_adapter", "set_active_adapters", "unmerge_adapter", "without_adapter_wrappers",
           "write_adapter"]
