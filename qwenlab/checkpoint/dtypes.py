"""The one table of dtypes: safetensors' names, their torch types and sizes, and the names users write."""

from __future__ import annotations

import torch

from qwenlab.errors import QwenlabError

# safetensors dtype -> (torch dtype or None where torch has no CPU type we use, bytes per element)
SAFETENSORS: dict[str, tuple[torch.dtype | None, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1), "U16": (None, 2), "U32": (None, 4), "U64": (None, 8),
    "F8_E4M3": (None, 1), "F8_E5M2": (None, 1),
}
FLOAT_NAMES = ("F32", "BF16", "F16")  # what a float checkpoint's weights may be stored as

# What users write (flags, YAML): short and long names, with or without "torch."
USER_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "fp64": torch.float64, "float64": torch.float64,
}
LONG_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}
SHORT_NAMES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16", "F64": "fp64", "I8": "int8", "U8": "uint8"}


def element_bytes(safetensors_name: str) -> int | None:
    return SAFETENSORS[safetensors_name][1] if safetensors_name in SAFETENSORS else None


def torch_dtype(safetensors_name: str) -> torch.dtype | None:
    return SAFETENSORS.get(safetensors_name, (None, 0))[0]


def parse_dtype(name: str | torch.dtype, field: str = "dtype",
                allowed: tuple[str, ...] = ("fp32", "bf16", "fp16", "fp64")) -> torch.dtype:
    """A user's dtype name ('bf16', 'bfloat16', 'torch.bfloat16') as a torch dtype, or one line naming `field`."""
    if isinstance(name, torch.dtype):
        return name
    dtype = USER_NAMES.get(str(name).lower().removeprefix("torch."))
    if dtype is None or not any(USER_NAMES[a] == dtype for a in allowed):
        raise QwenlabError(f"{field}: unknown dtype '{name}' (expected one of {', '.join(allowed)})")
    return dtype
