"""Model folder -> quantized model folder: safetensors + a "quantization" section in config.json.

Stored layout, per quantized Linear `<module>` (e.g. model.layers.0.mlp.up_proj):
  <module>.qweight  int8 [N, K] (8-bit) or uint8 [N, K/2] (4-bit, two values per byte)
  <module>.scales   fp16 [N, K/group_size]
  <module>.zeros    fp16 [N, K/group_size]   (4-bit only; w = scales * (q - zeros))
  <module>.bias     fp32                     (q/k/v projections)
The token embedding (tied to the LM head in Qwen2.5 0.5B-3B) is one table,
`model.embed_tokens.*`, quantized with `head_bits` (or kept as `model.embed_tokens.weight` in bf16
when head_bits is 16); an untied `lm_head` gets the same treatment. Norms are stored in fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from qwenlab.checkpoint import CheckpointWriter, LINEAR_MODULES, copy_tokenizer_files, expected_tensor_shapes
from qwenlab.checkpoint.lineage import make_lineage, write_lineage
from qwenlab.errors import QwenlabError
from qwenlab.quant.formats import QuantSpec, check_group_size, quantize_weight

FORMAT = "qwenlab-weight-only"
FORMAT_VERSION = 1
HEAD_BITS = (16, 8, 4)
# Measured on the Qwen2.5-0.5B shape (docs/quantization.md): an int8 head/embedding costs ~1/100 of
# the int4 layers' logit error and is 2x lighter than bf16, so it is the default for both widths.
DEFAULT_HEAD_BITS = 8
# Same bits per weight and error as llama.cpp's Q8_0 (8.5) and Q4_0 (4.5): a like-for-like comparison.
DEFAULT_GROUP_SIZE = {8: 32, 4: 64}
ROW_CHUNK = 8192  # quantize this many rows at a time, so memory stays bounded on the 151936-row embedding


def is_linear_weight(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in LINEAR_MODULES


def head_names(config) -> list[str]:
    return ["model.embed_tokens.weight"] + ([] if config.tie_word_embeddings else ["lm_head.weight"])


def quantize_rows(weight: torch.Tensor, spec: QuantSpec, name: str) -> dict[str, torch.Tensor]:
    """quantize_weight over row chunks (every format is row-wise, so chunks concatenate exactly)."""
    check_group_size(tuple(weight.shape), spec.group_size, name)
    parts = [quantize_weight(weight[i:i + ROW_CHUNK], spec, name) for i in range(0, weight.shape[0], ROW_CHUNK)]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def quantization_section(spec: QuantSpec, head_bits: int) -> dict:
    return {"format": FORMAT, "version": FORMAT_VERSION, **spec.as_dict(), "head_bits": head_bits,
            "zero_point": "float" if spec.bits == 4 else "none", "scale_dtype": "float16",
            "int4_packing": "two per byte, even column in the low nibble" if spec.bits == 4 else None}


def quantize_model(model: str | Path, out: str | Path, *, bits: int = 4, group_size: int | None = None,
                   method: str = "rtn", head_bits: int | None = None, force: bool = False,
                   progress: bool = True) -> Path:
    """Quantize every Linear of MODEL (and its embedding/LM head per head_bits) into the folder OUT."""
    from qwenlab.checkpoint import open_checkpoint

    if bits not in DEFAULT_GROUP_SIZE:
        raise QwenlabError(f"--bits must be 8 or 4, got {bits}")
    group_size = DEFAULT_GROUP_SIZE[bits] if group_size is None else int(group_size)
    spec = QuantSpec(bits, group_size, method).validate()
    head_bits = DEFAULT_HEAD_BITS if head_bits is None else int(head_bits)
    if head_bits not in HEAD_BITS:
        raise QwenlabError(f"--head-bits must be 16 (keep bf16), 8 or 4, got {head_bits}")
    checkpoint = open_checkpoint(model, validate=False)
    if "quantization" in checkpoint.config.extra:
        bits_found = checkpoint.config.extra["quantization"].get("bits")
        raise QwenlabError(f"{checkpoint.path}: is already quantized ({bits_found}-bit); "
                           "quantize the float model instead")
    checkpoint.validate()
    config = checkpoint.config
    shapes = expected_tensor_shapes(config)
    for name, shape in shapes.items():  # fail before writing anything
        if is_linear_weight(name) or (name in head_names(config) and head_bits < 16):
            check_group_size(shape, group_size, name)
    head_spec = QuantSpec(head_bits if head_bits < 16 else 8, group_size, method)

    config_dict = dict(checkpoint.config_dict)
    config_dict["quantization"] = quantization_section(spec, head_bits)
    with CheckpointWriter(out, config_dict, generation_config=checkpoint.generation_config, force=force,
                          inputs=[checkpoint.path]) as writer:
        for name in tqdm(shapes, desc=f"int{bits} quantize", unit="tensor", disable=not progress):
            tensor = checkpoint.get(name)
            if is_linear_weight(name) or (name in head_names(config) and head_bits < 16):
                use = spec if is_linear_weight(name) else head_spec
                module = name[: -len(".weight")]
                for suffix, value in quantize_rows(tensor, use, name).items():
                    writer.add(f"{module}.{suffix}", value)
            elif name in head_names(config):
                writer.add(name, tensor.to(torch.bfloat16))
            else:
                writer.add(name, tensor.float())  # norms and biases: tiny, kept exact
            del tensor
        copy_tokenizer_files(checkpoint.path, writer.path_in_output(""))
        # inside the folder being written: the lineage is part of the output, never missing from it
        write_lineage(writer.path_in_output(""), make_lineage(
            "quantized", f"int{bits}-g{group_size}-{method}", {"base": checkpoint.path},
            {**spec.as_dict(), "head_bits": head_bits}))
    return Path(out)
