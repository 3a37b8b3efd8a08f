"""Fixtures: a tiny Qwen2 model whose dims are multiples of 32 (GGUF Q8_0/Q4_0 blocks and the kernel fit)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import build_hf_model

# vocab 300 is not a multiple of 16 or 64: the head exercises the kernel's row padding.
TINY32 = dict(vocab_size=300, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, tied=True, std=0.05)


@pytest.fixture(scope="session")
def tiny32_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny32") / "model"
    build_hf_model(folder, **TINY32)
    return folder


@pytest.fixture(scope="session")
def quantized_dirs(tiny32_dir, tmp_path_factory) -> dict[int, Path]:
    from qwenlab.quant import quantize_model

    root = tmp_path_factory.mktemp("quantized")
    return {bits: quantize_model(tiny32_dir, root / f"int{bits}", bits=bits, group_size=32, progress=False)
            for bits in (8, 4)}
