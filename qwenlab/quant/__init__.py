"""Weight-only int8/int4 quantization (group-wise), fast CPU linear layers, and GGUF export.

Imports are lazy so that `import qwenlab.quant` stays cheap (gguf and the kernel build load on use).
"""

from __future__ import annotations

__all__ = ["GGUF_TYPES", "QuantSpec", "export_gguf", "load_quantized_model", "quantize_model"]


def __getattr__(name: str):
    if name in ("GGUF_TYPES", "export_gguf"):
        from qwenlab.quant import gguf_export

        return getattr(gguf_export, name)
    if name == "QuantSpec":
        from qwenlab.quant.formats import QuantSpec

        return QuantSpec
    if name == "quantize_model":
        from qwenlab.quant.quantize import quantize_model

        return quantize_model
    if name == "load_quantized_model":
        from qwenlab.quant.load import load_quantized_model

        return load_quantized_model
    raise AttributeError(f"module 'qwenlab.quant' has no attribute {name!r}")
