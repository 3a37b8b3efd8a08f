"""The quantized model's own modules, swapped into the model core at load (gpt-fast's quantize.py way):
fused projections, and the native one-call paths where qwenlab's kernels run.

- FusedAttention: q|k|v in one matmul (rows concatenate exactly: every format is row-wise), and a single
  native call for RoPE + cache write + attention: one new token per row (decode_attention), or a prompt's
  tokens (prefill_attention, see attend_on_cache; the float models' attention takes it too).
- FusedMLP: gate|up in one matmul; the native down projection applies SiLU·mul while it quantizes
  its input.
- NativeRMSNorm: one native call instead of torch's ~10-op CPU decomposition.
Each falls back to the model core's PyTorch code wherever its fast path does not apply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenlab.model.kv_cache import KVCacheProtocol, leading_padding
from qwenlab.model.qwen2 import Attention, RMSNorm, rotate_half
from qwenlab import native


class FusedAttention(Attention):
    def __init__(self, config, qkv_proj: nn.Module, o_proj: nn.Module, native_decode: bool):
        nn.Module.__init__(self)  # not Attention's: no separate q/k/v layers to allocate
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.qkv_proj, self.o_proj = qkv_proj, o_proj
        self.native_decode = native_decode

    def forward(self, x, cos, sin, mask, cache: KVCacheProtocol | None, layer: int, start: int):
        b, t, _ = x.shape
        qkv = self.qkv_proj(x)
        if self.native_decode and t == 1 and mask is None and cache is not None:
            buffers = cache.slot_buffers()
            if buffers is not None:
                keys, values = buffers[layer]
                out = native.decode_attention(qkv, cos, sin, keys, values, start, self.num_heads)
                if out is not None:
                    return self.o_proj(out)
        qk_width = (self.num_heads + self.num_kv_heads) * self.head_dim
        if self.native_decode and t > 1:
            q_width = self.num_heads * self.head_dim
            out = attend_on_cache(qkv[..., :q_width], qkv[..., q_width:qk_width], qkv[..., qk_width:], cos, sin,
                                  cache, layer, start, self.num_heads)
            if out is not None:
                return self.o_proj(out)
        qk = qkv[..., :qk_width].view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = (qk * cos + rotate_half(qk) * sin).split((self.num_heads, self.num_kv_heads), dim=1)  # one RoPE
        v = qkv[..., qk_width:].view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return self.attend(q, k, v, mask, cache, layer, start)


def attend_on_cache(q, k, v, cos, sin, cache: KVCacheProtocol | None, layer: int, start: int,
                    num_heads: int) -> torch.Tensor | None:
    """A prompt's attention in one native call (native.prefill_attention: RoPE, cache write, causal attention
    on the kernels' threads), for the projections q [B, T, H·D], k, v [B, T, Hkv·D]; None where it does not
    apply and the caller takes PyTorch's path: no cache or one without plain slot buffers, padding that is not
    leading padding (the kernel takes each row's leading padding as its first slot), anything but fp32, autograd.
    At 512 tokens on the 0.5B shape it takes ~2 ms a layer where SDPA (one thread, as the quantized models run
    PyTorch's ops) took ~10."""
    buffers = cache.slot_buffers() if cache is not None else None
    if buffers is None:
        return None
    starts = leading_padding(cache) if cache.has_padding else None
    if cache.has_padding and starts is None:
        return None
    keys, values = buffers[layer]
    return native.prefill_attention(q, k, v, cos, sin, keys, values, start, num_heads, starts)


class FusedMLP(nn.Module):
    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module, silu_mul_in_down: bool):
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj
        self.silu_mul_in_down = silu_mul_in_down  # the native down projection computes silu(gate)·up itself

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        if self.silu_mul_in_down:
            return self.down_proj.forward_silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class NativeRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = native.rms_norm(x, self.weight, self.eps)  # None: not fp32/contiguous, or needs a gradient
        return out if out is not None else super().forward(x)
