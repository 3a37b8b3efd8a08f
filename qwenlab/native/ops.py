"""The kernels that are not quantization: the per-row LoRA delta, a decode step's attention, RMSNorm,
and the argmax of logits under a grammar's bit mask.

Each wrapper checks dtype and contiguity, passes every buffer with its length (the kernel checks the
lengths against the dimensions), and returns None where its fast path does not apply.
"""

from __future__ import annotations

import ctypes

import torch

from qwenlab.native.library import NOT_APPLICABLE, KernelArgumentError, buffer, checked, kernel_threads, library


# ---- LoRA deltas for mixed-adapter batches ------------------------------------------------------------
LORA_MAX_RANK = 256  # lora_bgmv.cpp's MAX_RANK


def lora_bgmv_(y: torch.Tensor, x: torch.Tensor, row_adapter: torch.Tensor, a: torch.Tensor, bt: torch.Tensor) -> None:
    """y[r, t] += bt[i]ᵀ (a[i] x[r, t]) with i = row_adapter[r] (rows with -1 are left alone), in place.

    x [rows, T, K] and y [rows, T, N] contiguous fp32; row_adapter int32 [rows]; a [n, R, K] and
    bt [n, R, N] contiguous, both fp32 or both bf16 (scalings folded into bt; the sums are fp32)."""
    rows, tokens, k = x.shape
    n_out = y.shape[-1]
    kernel = "lora_bgmv"
    dtype = torch.bfloat16 if a.dtype == torch.bfloat16 else torch.float32
    xp, x_len = buffer(x, torch.float32, "x", kernel)
    yp, y_len = buffer(y, torch.float32, "y", kernel)
    rp, r_len = buffer(row_adapter, torch.int32, "row_adapter", kernel)
    ap, a_len = buffer(a, dtype, "a", kernel)
    bp, b_len = buffer(bt, dtype, "bt", kernel)
    status = checked(library().lora_bgmv(xp, x_len, rows, tokens, k, rp, r_len, ap, a_len, bp, b_len, a.shape[0],
                                          a.shape[1], n_out, yp, y_len, kernel_threads(), lora_bits(dtype)), kernel)
    if status == NOT_APPLICABLE:
        raise ValueError(f"lora_bgmv: rank {a.shape[1]} is over {LORA_MAX_RANK}")


def lora_bits(dtype: torch.dtype) -> int:
    """lora_bgmv's name for a stack's dtype: 16 (bf16) or 32 (fp32)."""
    return 16 if dtype == torch.bfloat16 else 32


# ---- fused decode attention ---------------------------------------------------------------------------
def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, pos: int, num_heads: int,
                     starts: torch.Tensor | None = None) -> torch.Tensor | None:
    """One new token per row: RoPE, cache write at slot `pos`, attention over slots starts[b]..pos.

    qkv [B, 1, (Hq + 2 Hkv) D], cos/sin [B, 1, 1, D], keys/values [B, Hkv, cap, D], all fp32 and
    contiguous (returns None otherwise: the caller takes the PyTorch path). starts: int64 [B], each row's
    count of leading padding slots (None: all 0); each must lie in [0, pos] (the kernel refuses others).
    Returns [B, 1, Hq D]."""
    b, hkv, cap, d = keys.shape
    tensors = (qkv, cos, sin, keys, values)
    if any(t.dtype != torch.float32 or not t.is_contiguous() for t in tensors) or qkv.shape[1] != 1 \
            or qkv.requires_grad:  # no autograd formula here: anything that needs a gradient takes PyTorch's path
        return None
    if cos.shape != sin.shape or keys.shape != values.shape:  # the kernel takes one length for each pair
        raise KernelArgumentError(f"native decode_attention: cos {list(cos.shape)} and sin {list(sin.shape)}, "
                                  f"keys {list(keys.shape)} and values {list(values.shape)} must match")
    starts_ptr = row_starts(starts, b, "decode_attention")
    out = torch.empty(b, 1, num_heads * d)
    status = checked(library().decode_attention(qkv.data_ptr(), qkv.numel(), b, num_heads, hkv, d, cos.data_ptr(),
                                                 sin.data_ptr(), cos.numel(), keys.data_ptr(), values.data_ptr(),
                                                 keys.numel(), cap, pos, out.data_ptr(), out.numel(), starts_ptr,
                                                 kernel_threads()),
                      "decode_attention")
    return out if status == 0 else None


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      keys: torch.Tensor, values: torch.Tensor, start: int, num_heads: int,
                      starts: torch.Tensor | None = None) -> torch.Tensor | None:
    """A prompt's T new tokens per row: RoPE, cache writes at slots start .. start+T-1, causal attention over
    slots starts[b] .. each query's own (a query inside the row's leading padding sees itself only).

    q [B, T, Hq D], k and v [B, T, Hkv D]: fp32, each with unit stride in its last dimension and one stride per
    token row (slices of one fused q|k|v output qualify); cos/sin [B, 1, T, D] and keys/values [B, Hkv, cap, D]
    contiguous fp32. Returns [B, T, Hq D], or None where the kernel does not apply (another dtype or layout,
    autograd, a head size that is not a multiple of 16): the caller takes PyTorch's path."""
    b, t = q.shape[:2]
    hkv, cap, d = keys.shape[1:]
    if any(x.dtype != torch.float32 or x.requires_grad for x in (q, k, v, cos, sin, keys, values)) \
            or not all(x.is_contiguous() for x in (cos, sin, keys, values)):
        return None
    strides = [_row_stride(x, b, t) for x in (q, k, v)]
    if None in strides:
        return None
    if cos.shape != sin.shape or keys.shape != values.shape:
        raise KernelArgumentError(f"native prefill_attention: cos {list(cos.shape)} and sin {list(sin.shape)}, "
                                  f"keys {list(keys.shape)} and values {list(values.shape)} must match")
    starts_ptr = row_starts(starts, b, "prefill_attention")
    out = torch.empty(b, t, num_heads * d)
    views = [(x.data_ptr(), _floats_from(x)) for x in (q, k, v)]
    status = checked(library().prefill_attention(views[0][0], views[0][1], strides[0], views[1][0], views[1][1],
                                                 strides[1], views[2][0], views[2][1], strides[2], b, t, num_heads,
                                                 hkv, d, cos.data_ptr(), sin.data_ptr(), cos.numel(),
                                                 keys.data_ptr(), values.data_ptr(), keys.numel(), cap, start,
                                                 out.data_ptr(), out.numel(), starts_ptr, kernel_threads()),
                     "prefill_attention")
    return out if status == 0 else None


def _row_stride(x: torch.Tensor, b: int, t: int) -> int | None:
    """The one stride between consecutive token rows of x [B, T, W] (unit stride within a row), or None."""
    if x.dim() != 3 or x.shape[:2] != (b, t) or (x.stride(2) != 1 and x.shape[2] > 1):
        return None
    if b > 1 and t > 0 and x.stride(0) != t * x.stride(1):
        return None
    return x.stride(1) if t > 1 else x.shape[2] if b <= 1 else x.stride(0)


def _floats_from(x: torch.Tensor) -> int:
    """How many floats x's storage holds from x's first element on: the kernel's bound for strided reads."""
    return x.untyped_storage().nbytes() // 4 - x.storage_offset()


def row_starts(starts: torch.Tensor | None, rows: int, kernel: str) -> int | None:
    """The address of per-row start slots (contiguous int64, one per row) for a decode kernel, or None."""
    if starts is None:
        return None
    address, length = buffer(starts, torch.int64, "starts", kernel)
    if length != rows or starts.dim() != 1:
        raise KernelArgumentError(f"native {kernel}: starts must have one entry per row ({rows}), "
                                  f"got shape {list(starts.shape)}")
    return address


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm of fp32 contiguous x [..., n] with weight [n]; None (use PyTorch) for anything else."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or not x.is_contiguous() \
            or not weight.is_contiguous() or x.requires_grad:
        return None  # (no autograd formula here: anything that needs a gradient takes PyTorch's path)
    n = x.shape[-1]
    out = torch.empty_like(x)
    checked(library().rms_norm(x.data_ptr(), x.numel(), x.numel() // max(n, 1), n, weight.data_ptr(), weight.numel(),
                                eps, out.data_ptr(), out.numel()), "rms_norm")
    return out


# ---- grammar masks --------------------------------------------------------------------------------------
def masked_argmax(logits: torch.Tensor, mask_words: torch.Tensor, n_valid: int) -> int | None:
    """The id of the largest of `logits` [V] (fp32, contiguous) among those whose bit is set in `mask_words`
    (int32, llguidance's layout: id i is bit i % 32 of word i // 32) and below `n_valid`; ties go to the
    lowest id. None when no id is allowed. Costs a pass over the set bits, with no bool row unpacked."""
    kernel = "masked_argmax"
    lp, l_len = buffer(logits, torch.float32, "logits", kernel)
    mp, m_len = buffer(mask_words, torch.int32, "mask", kernel)
    out = ctypes.c_int64(-1)
    checked(library().masked_argmax(lp, l_len, mp, m_len, n_valid, ctypes.addressof(out)), kernel)
    return out.value if out.value >= 0 else None
