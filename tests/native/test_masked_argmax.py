"""token_mask.cpp's masked argmax against torch's argmax over masked logits: odd widths (one id, a tail
word that is not whole, Qwen2.5's 151,936), masks dense and sparse, padding ids past n_valid, ties, and
buffers whose sizes do not fit."""

import pytest
import torch

from qwenlab import native
from qwenlab.native import KernelArgumentError, masked_argmax


@pytest.fixture(autouse=True)
def kernels():
    if not native.available():
        pytest.fail(f"the native kernels should build on this host: {native.unavailable_reason()}")


def pack(allowed: torch.Tensor) -> torch.Tensor:
    """bool [V] -> llguidance's int32 words (id i is bit i % 32 of word i // 32)."""
    words = torch.zeros((allowed.numel() + 31) // 32 * 32, dtype=torch.int64)
    words[: allowed.numel()] = allowed.long()
    bits = (words.view(-1, 32) << torch.arange(32)).sum(-1)
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)


def reference(logits: torch.Tensor, allowed: torch.Tensor, n_valid: int) -> int | None:
    allowed = allowed.clone()
    allowed[n_valid:] = False
    if not allowed.any():
        return None
    return int(logits.masked_fill(~allowed, float("-inf")).argmax())


@pytest.mark.parametrize("width", [1, 7, 31, 33, 400, 1000, 151936])
@pytest.mark.parametrize("density", [0.0005, 0.1, 0.9, 1.0])
def test_equals_torch_on_odd_widths(width, density):
    generator = torch.Generator().manual_seed(width)
    logits = torch.randn(width, generator=generator)
    allowed = torch.rand(width, generator=generator) < density
    for n_valid in {width, max(0, width - 5), width // 2}:
        assert masked_argmax(logits, pack(allowed), n_valid) == reference(logits, allowed, n_valid)


def test_ties_go_to_the_lowest_id_and_an_empty_mask_gives_none():
    logits = torch.zeros(100)
    allowed = torch.zeros(100, dtype=torch.bool)
    allowed[[90, 12, 64]] = True
    assert masked_argmax(logits, pack(allowed), 100) == 12 == reference(logits, allowed, 100)
    assert masked_argmax(logits, pack(torch.zeros(100, dtype=torch.bool)), 100) is None
    assert masked_argmax(logits, pack(allowed), 10) is None  # every allowed id is past n_valid


def test_sizes_that_do_not_fit_are_refused():
    logits, words = torch.randn(64), pack(torch.ones(64, dtype=torch.bool))
    with pytest.raises(KernelArgumentError):
        masked_argmax(logits, words, 65)  # more valid ids than logits
    with pytest.raises(KernelArgumentError):
        masked_argmax(torch.randn(100), words, 100)  # a mask too short for the valid ids
    with pytest.raises(KernelArgumentError):
        masked_argmax(logits.double(), words, 64)
