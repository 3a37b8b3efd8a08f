"""Drop-in quantized Linear layers (and a quantized embedding that can share the LM head's table).

Each layer is built from the stored format (formats.py), read in row chunks, and repacked once for
its backend, so loading never holds more than one chunk of temporaries:
- "native": qwenlab's VNNI kernel (native/), int8 and int4, activations quantized to int8 on the fly.
- "aten":   PyTorch's own CPU kernels, bf16 activations: `_weight_int4pack_mm_for_cpu` for int4 (same
            group-wise format) and `_weight_int8pack_mm` for int8, which is per output channel only, so
            int8 groups are requantized per channel at load (adds ~0.1% weight error).
- "reference": dequantize and F.linear, for when neither applies (slow, exact).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qwenlab.errors import QwenlabError
from qwenlab.native import available as kernels_available, unavailable_reason as kernels_unavailable_reason
from qwenlab.quant import native
from qwenlab.model.memory import release_free_memory
from qwenlab.quant.formats import QuantSpec, dequantize_int4, dequantize_int8, quantize_weight, unpack_int4

BACKENDS = ("native", "aten", "reference")
CHUNK_ROWS = 4096  # rows repacked at a time (a multiple of the kernel's 64-row groups)

# rows [start, stop) of one weight in the stored format: {"qweight", "scales"[, "zeros"]}
RowReader = Callable[[int, int], dict[str, torch.Tensor]]


def choose_backend(bits: int, out_features: int, in_features: int, group_size: int, requested: str | None) -> str:
    if requested not in (None, "auto", *BACKENDS):
        raise QwenlabError(f"unknown kernel backend '{requested}'; expected one of auto, {', '.join(BACKENDS)}")
    native_ok = native.supports(out_features, in_features, group_size) and kernels_available()
    aten_ok = bits == 8 or out_features % 16 == 0  # aten's int4 packing takes rows in blocks of 16
    if requested == "native" and not native_ok:
        reason = kernels_unavailable_reason() or f"in_features {in_features} is not a multiple of 32"
        raise QwenlabError(f"the native kernel cannot run this layer: {reason}")
    if requested == "aten" and not aten_ok:
        raise QwenlabError("PyTorch's int4 CPU kernel needs out_features to be a multiple of 16")
    if requested in BACKENDS:
        return requested
    return "native" if native_ok else "aten" if aten_ok else "reference"


class QuantizedLinear(nn.Module):
    """Sizes, bias, construction from stored tensors, and the row gather a tied embedding uses."""

    bits: int

    def __init__(self, read_rows: RowReader, out_features: int, in_features: int, group_size: int,
                 bias: torch.Tensor | None = None, backend: str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        if out_features <= 0 or in_features <= 0 or group_size <= 0 or in_features % group_size:
            raise ValueError(f"a {self.bits}-bit layer needs positive sizes and a group size that divides "
                             f"in_features; got out {out_features}, in {in_features}, group {group_size}")
        if bias is not None and tuple(bias.shape) != (out_features,):  # the kernel adds N floats from it
            raise ValueError(f"bias has shape {list(bias.shape)}, expected [{out_features}]")
        self.backend = choose_backend(self.bits, out_features, in_features, group_size, backend)
        bias = None if bias is None else bias.detach().float().contiguous()
        self.store(bias=bias, native_bias=None if bias is None or self.backend != "native" else native.pad_rows(bias))
        self._load(read_rows)
        # The kernel's buffers checked once, here, with their addresses and lengths: a forward passes them
        # as they are (the kernel checks the lengths again, in O(1)).
        self.packed = None if self.backend != "native" else native.PackedLinear(
            self.qweight, self.scales, self.mins if self.bits == 4 else None, self.native_bias, group_size)

    @classmethod
    def from_tensors(cls, group_size: int, bias: torch.Tensor | None = None, backend: str | None = None,
                     **stored: torch.Tensor) -> "QuantizedLinear":
        """From whole stored tensors (qweight, scales[, zeros]) as quantize_weight returns them."""
        n, k = stored["scales"].shape[0], stored["scales"].shape[1] * group_size
        return cls(lambda a, b: {key: v[a:b] for key, v in stored.items()}, n, k, group_size, bias, backend)

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int, bias: torch.Tensor | None = None,
                   backend: str | None = None, method: str = "rtn") -> "QuantizedLinear":
        stored = quantize_weight(weight, QuantSpec(cls.bits, group_size, method).validate())
        return cls.from_tensors(group_size, bias, backend, **stored)

    def store(self, **tensors: torch.Tensor | None) -> None:
        """Keep tensors as (non-persistent) buffers: they move with the module and count in its memory."""
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor, persistent=False)

    def chunks(self, read_rows: RowReader):
        for start in range(0, self.out_features, CHUNK_ROWS):
            stop = min(self.out_features, start + CHUNK_ROWS)
            yield start, self._checked_chunk(read_rows(start, stop), stop - start)
            if start:  # a layer of several chunks (the 151936-row head): drop each chunk's temporaries
                release_free_memory()

    def _checked_chunk(self, chunk: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
        """Rows of the stored tensors, checked against this layer's sizes before they are repacked: the
        packed buffers are sized from out/in_features, and the kernels read exactly those sizes."""
        packed_width = self.in_features if self.bits == 8 else self.in_features // 2
        expected = {"qweight": ((rows, packed_width), (torch.int8 if self.bits == 8 else torch.uint8,)),
                    "scales": ((rows, self.in_features // self.group_size), (torch.float16, torch.float32))}
        if self.bits == 4:
            expected["zeros"] = expected["scales"]
        for key, (shape, dtypes) in expected.items():
            t = chunk.get(key)
            if t is None or tuple(t.shape) != shape or t.dtype not in dtypes:
                found = "missing" if t is None else f"{list(t.shape)} {t.dtype}"
                raise ValueError(f"{self.bits}-bit layer: stored '{key}' is {found}, expected {list(shape)} "
                                 f"of {' or '.join(str(d) for d in dtypes)}")
        return chunk

    def forward_silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """self(silu(gate) * up) from a fused gate|up output [..., 2 * in_features] (the MLP's down
        projection). The native kernel applies SiLU·mul while it quantizes its input, so no
        intermediate tensor exists; other backends compute it in PyTorch."""
        if self.backend != "native":
            gate, up = gate_up.chunk(2, dim=-1)
            return self(F.silu(gate) * up)
        y = self.packed(gate_up, self.out_features, silu_mul=True)
        return y if gate_up.dtype == torch.float32 else y.to(gate_up.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, backend={self.backend}, bias={self.bias is not None}")

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight [N, K] this layer multiplies by (for tests and the reference path)."""
        return self.weight_rows(torch.arange(self.out_features))

    def weight_rows(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _load(self, read_rows: RowReader) -> None:
        raise NotImplementedError

    def _native_buffers(self, weight_shape: tuple[int, ...], params: tuple[str, ...]) -> None:
        groups = native.padded_rows(self.out_features) // native.ROW_GROUP
        g = self.in_features // self.group_size
        self.store(qweight=torch.empty(groups, *weight_shape, dtype=torch.uint8),
                   **{p: torch.empty(groups, g, 4, native.ROW_BLOCK, dtype=torch.float16) for p in params})

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int8WeightLinear(QuantizedLinear):
    """w = scales * q per group; q int8 [N, K]."""

    bits = 8

    def _load(self, read_rows: RowReader) -> None:
        n, k = self.out_features, self.in_features
        if self.backend == "native":
            self._native_buffers((k // native.ACT_BLOCK, 8, 4, native.ROW_BLOCK, 4), ("scales",))
            for start, t in self.chunks(read_rows):
                g = start // native.ROW_GROUP
                packed = native.pack_int8(t["qweight"])
                self.qweight[g:g + packed.shape[0]] = packed
                self.scales[g:g + packed.shape[0]] = native.pack_group_params(t["scales"])
        elif self.backend == "aten":  # per-channel requantization for _weight_int8pack_mm
            self.store(qweight=torch.empty(n, k, dtype=torch.int8), scales=torch.empty(n, dtype=torch.bfloat16))
            for start, t in self.chunks(read_rows):
                w = dequantize_int8(t["qweight"], t["scales"])
                channel_scale = (w.abs().amax(1) / 127.0).clamp(min=1e-12)
                stop = start + w.shape[0]
                self.qweight[start:stop] = torch.round(w / channel_scale[:, None]).clamp(-127, 127).to(torch.int8)
                self.scales[start:stop] = channel_scale.to(torch.bfloat16)
        else:
            parts = [t for _, t in self.chunks(read_rows)]
            self.store(qweight=torch.cat([p["qweight"] for p in parts]),
                       scales=torch.cat([p["scales"] for p in parts]).to(torch.float16))

    def weight_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if self.backend == "native":
            return dequantize_int8(native.gather_rows_int8(self.qweight, rows),
                                   native.gather_group_params(self.scales, rows))
        if self.backend == "aten":
            return self.qweight[rows].float() * self.scales[rows].float()[:, None]
        return dequantize_int8(self.qweight[rows], self.scales[rows])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "native":
            y = self.packed(x, self.out_features)
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        if self.backend == "aten":
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
            return self._finish(torch._weight_int8pack_mm(x2, self.qweight, self.scales), x)
        return self._finish(F.linear(x.float(), dequantize_int8(self.qweight, self.scales)), x)


class Int4WeightLinear(QuantizedLinear):
    """w = scales * (q - zeros) per group; q in 0..15, stored two per byte [N, K/2]."""

    bits = 4

    def _load(self, read_rows: RowReader) -> None:
        if self.backend == "native":
            self._native_buffers((self.in_features // native.ACT_BLOCK, 4, 4, native.ROW_BLOCK, 4), ("scales", "mins"))
            for start, t in self.chunks(read_rows):
                g = start // native.ROW_GROUP
                packed = native.pack_int4(unpack_int4(t["qweight"]))
                self.qweight[g:g + packed.shape[0]] = packed
                self.scales[g:g + packed.shape[0]] = native.pack_group_params(t["scales"])
                # The kernel adds m = -scale * zero per group: w = scale * q + m.
                self.mins[g:g + packed.shape[0]] = native.pack_group_params(-(t["scales"].float() * t["zeros"].float()))
            return
        parts = [t for _, t in self.chunks(read_rows)]
        stored = {key: torch.cat([p[key] for p in parts]) for key in ("qweight", "scales", "zeros")}
        if self.backend == "aten":
            # PyTorch's tinygemm convention: w = (q - 8) * scale + zero_aten, so zero_aten = scale * (8 - zero).
            s, z = stored["scales"].float(), stored["zeros"].float()
            q = unpack_int4(stored["qweight"]).to(torch.int32)
            self.store(qweight=torch._convert_weight_to_int4pack_for_cpu(q, 1),
                       scales_and_zeros=torch.stack((s.t(), (s * (8 - z)).t()), dim=-1).to(torch.bfloat16).contiguous())
        else:
            self.store(qweight=stored["qweight"], scales=stored["scales"].half(), zeros=stored["zeros"].half())

    def weight_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if self.backend == "native":
            q = native.gather_rows_int4(self.qweight, rows).float()
            s = native.gather_group_params(self.scales, rows).float()
            m = native.gather_group_params(self.mins, rows).float()
            t, k = q.shape
            return (q.view(t, s.shape[1], -1) * s[..., None] + m[..., None]).view(t, k)
        if self.backend == "aten":
            # Rows of the tinygemm layout are not addressable: run the identity through the kernel.
            eye = torch.eye(self.in_features, dtype=torch.bfloat16)
            full = torch._weight_int4pack_mm_for_cpu(eye, self.qweight, self.group_size, self.scales_and_zeros)
            return full.t().float()[rows]
        return dequantize_int4(unpack_int4(self.qweight[rows]), self.scales[rows], self.zeros[rows])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "native":
            y = self.packed(x, self.out_features)
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        if self.backend == "aten":
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
            y = torch._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, self.scales_and_zeros)
            return self._finish(y, x)
        w = dequantize_int4(unpack_int4(self.qweight), self.scales, self.zeros)
        return self._finish(F.linear(x.float(), w), x)


LINEAR_CLASSES = {8: Int8WeightLinear, 4: Int4WeightLinear}


class QuantizedEmbedding(nn.Module):
    """Token embedding read from a quantized table; a tied model passes its quantized LM head."""

    def __init__(self, table: QuantizedLinear, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.table, self.dtype = table, dtype
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.table.weight_rows(tokens.reshape(-1))
        return rows.to(self.dtype).view(*tokens.shape, self.embedding_dim)


class FloatEmbedding(nn.Module):
    """A float (e.g. bf16-stored) embedding table whose lookups come out in the activation dtype."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.dtype = dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight).to(self.dtype)


class FloatHead(nn.Module):
    """An LM head kept in a float storage dtype (bf16), computed in the activation dtype."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return F.linear(x, self.weight)
        return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
