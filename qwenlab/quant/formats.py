"""Weight-only quantization formats as pure functions over tensors.

int8: symmetric per group of `group_size` input columns,  w ~= scale * q,          q in [-127, 127]
int4: asymmetric per group (scale and zero point),       w ~= scale * (q - zero), q in [0, 15]

Scales and zero points are float16 (as AWQ/HQQ store them); the zero point is a float, as in
HQQ, so the rounding grid can sit anywhere between a group's min and max. Two methods:
- "rtn": round to nearest on the min/max grid.
- "hqq": Half-Quadratic Quantization (Badri & Shaji, 2023): keep the scale, optimise the zero
  point by alternating a sparsity-promoting (l_p, p < 1) shrinkage of the error with a closed-form
  zero update; data-free. Applied to int4, where rounding error matters (int8 is near lossless).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwenlab.errors import QwenlabError

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "hqq")


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 64
    method: str = "rtn"

    def validate(self) -> "QuantSpec":
        if self.bits not in BITS:
            raise QwenlabError(f"--bits must be 8 or 4, got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise QwenlabError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size}")
        if self.method not in METHODS:
            raise QwenlabError(f"unknown quantization method '{self.method}'; expected one of {', '.join(METHODS)}")
        return self

    def as_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "method": self.method}


def check_group_size(shape: tuple[int, ...], group_size: int, name: str = "weight") -> int:
    """Number of groups per row; a clear error when the group size does not divide the row."""
    if len(shape) != 2:
        raise QwenlabError(f"{name}: expected a 2-D weight, got shape {list(shape)}")
    if shape[1] % group_size:
        raise QwenlabError(f"{name}: group size {group_size} does not divide the input dimension {shape[1]}")
    return shape[1] // group_size


def _groups(w: torch.Tensor, group_size: int, name: str) -> torch.Tensor:
    check_group_size(tuple(w.shape), group_size, name)
    return w.float().reshape(w.shape[0], -1, group_size)


# ---- int8 ---------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor, group_size: int, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K], scale fp16 [N, K/group_size])."""
    g = _groups(w, group_size, name)
    scale = (g.abs().amax(-1) / 127.0).to(torch.float16)
    s = scale.float().clamp(min=torch.finfo(torch.float16).tiny)[..., None]  # quantize with the stored scale
    q = torch.round(g / s).clamp(-127, 127).to(torch.int8)
    return q.reshape(w.shape), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    return (q.float().reshape(n, scale.shape[1], -1) * scale.float()[..., None]).reshape(n, k)


# ---- int4 ---------------------------------------------------------------------------------
def _int4_grid(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and float zero point (fp16-rounded) so that [min, max] maps onto [0, 15]."""
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15.0).to(torch.float16)
    s = scale.float().clamp(min=torch.finfo(torch.float16).tiny)
    zero = (-lo / s).to(torch.float16)
    return scale, zero


def _int4_round(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    s = scale.float().clamp(min=torch.finfo(torch.float16).tiny)[..., None]
    return torch.round(g / s + zero.float()[..., None]).clamp(0, 15)


def _hqq_zero(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, iters: int = 20, p: float = 0.7,
              beta: float = 10.0, kappa: float = 1.01) -> torch.Tensor:
    """HQQ's proximal solver for the zero point, scale fixed (hqq/core/optimize.py, 'legacy')."""
    s = scale.float().clamp(min=torch.finfo(torch.float16).tiny)[..., None]
    z = zero.float()[..., None]
    best, best_z = float("inf"), z
    for _ in range(iters):
        q = torch.round(g / s + z).clamp(0, 15)
        error = g - (q - z) * s
        current = error.abs().mean().item()
        if current >= best:
            break
        best, best_z = current, z
        # Generalised soft-thresholding: the l_p (p < 1) prox keeps large errors, zeroes small ones.
        shrunk = torch.sign(error) * torch.relu(error.abs() - error.abs().clamp(min=1e-12).pow(p - 1) / beta)
        z = (q - (g - shrunk) / s).mean(-1, keepdim=True)
        beta *= kappa
    return best_z[..., 0].to(torch.float16)


def quantize_int4(w: torch.Tensor, group_size: int, method: str = "rtn",
                  name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q uint8 [N, K] in 0..15, scale fp16 [N, G], zero fp16 [N, G])."""
    g = _groups(w, group_size, name)
    scale, zero = _int4_grid(g)
    if method == "hqq":
        zero = _hqq_zero(g, scale, zero)
    q = _int4_round(g, scale, zero).to(torch.uint8)
    return q.reshape(w.shape), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    g = q.float().reshape(n, scale.shape[1], -1)
    return ((g - zero.float()[..., None]) * scale.float()[..., None]).reshape(n, k)


# ---- storage: two int4 values per byte ----------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] in 0..15 -> uint8 [N, K/2]; column 2i in the low nibble, 2i+1 in the high one."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def quantize_weight(w: torch.Tensor, spec: QuantSpec, name: str = "weight") -> dict[str, torch.Tensor]:
    """The tensors one quantized Linear weight is stored as (suffixes of the weight's name)."""
    if spec.bits == 8:
        q, scale = quantize_int8(w, spec.group_size, name)
        return {"qweight": q, "scales": scale}
    q, scale, zero = quantize_int4(w, spec.group_size, spec.method, name)
    return {"qweight": pack_int4(q), "scales": scale, "zeros": zero}


def dequantize_weight(tensors: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    if bits == 8:
        return dequantize_int8(tensors["qweight"], tensors["scales"])
    return dequantize_int4(unpack_int4(tensors["qweight"]), tensors["scales"], tensors["zeros"])
