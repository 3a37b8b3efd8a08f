"""Random-weight checkpoints with exact Qwen2.5 shapes: real-size speed costs the same per token."""

from __future__ import annotations

import zlib
from pathlib import Path

import torch
from tqdm import tqdm

from qwenlab.checkpoint.names import expected_tensor_shapes
from qwenlab.checkpoint.writer import DEFAULT_MAX_SHARD_BYTES, CheckpointWriter, copy_tokenizer_files
from qwenlab.checkpoint.config import Qwen2Config


def random_tensor(name: str, shape: tuple[int, ...], seed: int, std: float = 0.02) -> torch.Tensor:
    """Deterministic per tensor name (not per write order): N(0, std) matrices, ones for norms."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator) * std


def write_random_model(config: Qwen2Config, out: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, force: bool = False,
                       tokenizer_from: Path | None = None, write_tokenizer=None, progress: bool = True) -> Path:
    """tokenizer_from: a folder whose tokenizer files are copied; write_tokenizer: a function that writes
    tokenizer files into the (temporary) output folder, e.g. one covering the whole vocabulary."""
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    config = config.replace(torch_dtype=dtype_name)
    shapes = expected_tensor_shapes(config)
    with CheckpointWriter(out, config.to_hf_dict(), max_shard_bytes=max_shard_bytes, force=force,
                          generation_config={"bos_token_id": config.bos_token_id,
                                             "eos_token_id": config.eos_token_id}) as writer:
        for name, shape in tqdm(shapes.items(), desc="random weights", unit="tensor", disable=not progress):
            writer.add(name, random_tensor(name, shape, seed).to(dtype))
        if write_tokenizer is not None:
            write_tokenizer(writer.path_in_output(""))
        elif tokenizer_from is not None:
            copy_tokenizer_files(Path(tokenizer_from), writer.path_in_output(""))
    return Path(out)
