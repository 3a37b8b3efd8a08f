"""Quantization formats: round-trip error bounds, packing, HQQ, bad input."""

import pytest
import torch

from qwenlab.errors import QwenlabError
from qwenlab.quant.formats import (QuantSpec, check_group_size, dequantize_int4, dequantize_int8, pack_int4,
                                   quantize_int4, quantize_int8, unpack_int4)


def heavy_tailed(rows=256, cols=256, seed=0):
    """Weights with outliers, like trained LLM weights (a Gaussian scale mixture)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.02 / torch.rand(rows, cols, generator=g).clamp(min=0.05).sqrt()


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int8_round_trip_is_within_half_a_step(group_size):
    w = heavy_tailed()
    q, scale = quantize_int8(w, group_size)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (256, 256 // group_size)
    assert int(q.abs().max()) <= 127
    error = (dequantize_int8(q, scale) - w).abs().view(256, -1, group_size)
    step = scale.float()[..., None]
    assert bool((error <= step / 2 + 1e-6).all())  # round to nearest on the stored scale
    assert (dequantize_int8(q, scale) - w).norm() / w.norm() < 0.01


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_round_trip_is_within_half_a_step(group_size):
    w = heavy_tailed()
    q, scale, zero = quantize_int4(w, group_size)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    back = dequantize_int4(q, scale, zero)
    error = (back - w).abs().view(256, -1, group_size)
    assert bool((error <= scale.float()[..., None] * 0.5 + 1e-4).all())
    assert (back - w).norm() / w.norm() < 0.2
    # the grid spans each group: its min and max are representable up to half a step
    groups = w.view(256, -1, group_size)
    assert torch.allclose(back.view(256, -1, group_size).amax(-1), groups.amax(-1), atol=float(scale.max()))


def test_hqq_lowers_the_error_of_rtn():
    w = heavy_tailed(512, 512, seed=3)
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(4))
    errors = {}
    for method in ("rtn", "hqq"):
        back = dequantize_int4(*quantize_int4(w, 64, method))
        errors[method] = ((x @ back.T - x @ w.T).norm() / (x @ w.T).norm()).item()
    assert errors["hqq"] < 0.97 * errors["rtn"], errors


def test_int4_packing_round_trips():
    q = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (8, 32) and int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)
    assert torch.equal(unpack_int4(packed), q)


def test_group_size_that_does_not_divide_the_row_is_one_clear_error():
    with pytest.raises(QwenlabError, match="group size 64 does not divide the input dimension 96"):
        quantize_int8(torch.randn(4, 96), 64, name="w")
    with pytest.raises(QwenlabError, match="does not divide"):
        check_group_size((4, 100), 32)


def test_spec_validation():
    assert QuantSpec(8, 32).validate().as_dict() == {"bits": 8, "group_size": 32, "method": "rtn"}
    bad_specs = [(QuantSpec(3, 32), "bits"), (QuantSpec(4, 48), "group-size"), (QuantSpec(4, 32, "gptq"), "method")]
    for bad, message in bad_specs:
        with pytest.raises(QwenlabError, match=message):
            bad.validate()
