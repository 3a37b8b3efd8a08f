"""The Qwen2 architecture in plain PyTorch.

Module and attribute names mirror Hugging Face's Qwen2ForCausalLM (model.layers.N.self_attn.q_proj,
...), so a checkpoint's state dict loads with no name map and PEFT adapter keys line up.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from qwenlab.checkpoint.config import Qwen2Config
from qwenlab.model.kv_cache import KVCache, KVCacheProtocol
from qwenlab.model.linear import Linear, fast_linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # the same sums, one call
        # Normalise in fp32 and cast back before the weight, exactly as Qwen2 does in bf16.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    """RoPE in the 'rotate half' layout HF uses (first half / second half, not interleaved)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        # Always on the CPU, even inside a meta-device context: torch.arange on meta imports torch's
        # symbolic-shapes stack (sympy), ~68 MiB resident for the rest of the process.
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        self.register_buffer("inv_freq", 1.0 / (theta ** exponent), persistent=False)
        self._cos = self._sin = torch.empty(0, device="cpu")

    def _grow(self, length: int) -> None:
        positions = torch.arange(length, dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq[None, :]
        table = torch.cat((freqs, freqs), dim=-1)
        self._cos, self._sin = table.cos(), table.sin()

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        needed = int(positions.max()) + 1
        if needed > self._cos.shape[0]:
            self._grow(max(needed, 2 * self._cos.shape[0], 256))
        # [B, T, D] -> [B, 1, T, D] to broadcast over heads
        return self._cos[positions].to(dtype)[:, None], self._sin[positions].to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.q_proj = Linear(h, self.num_heads * d, bias=True)
        self.k_proj = Linear(h, self.num_kv_heads * d, bias=True)
        self.v_proj = Linear(h, self.num_kv_heads * d, bias=True)
        self.o_proj = Linear(self.num_heads * d, h, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCacheProtocol | None, layer: int, start: int):
        return self.attend_projected(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin, mask, cache, layer, start)

    def attend_projected(self, q, k, v, cos, sin, mask, cache: KVCacheProtocol | None, layer: int, start: int):
        """RoPE and attention for the projections q [B, T, H·D] and k, v [B, T, Hkv·D]."""
        b, t, _ = q.shape
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return self.attend(q, k, v, mask, cache, layer, start)

    def attend(self, q, k, v, mask, cache: KVCacheProtocol | None, layer: int, start: int) -> torch.Tensor:
        """Cache write, attention over everything cached, output projection: o_proj(softmax(qkᵀ/√d)·v)."""
        b, _, t, _ = q.shape
        if cache is not None:
            k, v = cache.write(layer, start, k, v)
        # GQA: each KV head serves num_heads / num_kv_heads query heads, without copying k/v.
        causal = mask is None and t > 1
        if (causal and cache is None and q.dtype == torch.bfloat16 and t <= MATMUL_ATTENTION_MAX_TOKENS
                and torch.is_grad_enabled() and q.requires_grad):
            out = causal_attention_by_matmul(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                 enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


# bf16 training on sequences up to this long takes causal_attention_by_matmul: SDPA's CPU flash kernel has a slow bf16
# backward (8 x 77 tokens, 14 heads: 18 ms forward and backward against 6). From ~190 tokens flash is faster.
MATMUL_ATTENTION_MAX_TOKENS = 160


def causal_attention_by_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√d + causal mask) v as two batched matmuls, as transformers' eager attention computes it (scores
    in the inputs' dtype, softmax in fp32). q [B, H, T, D]; k, v [B, Hkv, T, D]: the H/Hkv query heads of each
    KV head are stacked as rows of one matmul, so k and v are not copied per query head."""
    b, h, t, d = q.shape
    groups = h // k.shape[1]
    queries = q.reshape(b, k.shape[1], groups * t, d)
    scores = (queries @ k.transpose(-1, -2)) * d ** -0.5
    position = torch.arange(t)
    future = position[None, :] > position.repeat(groups)[:, None]  # [groups·T, T]: key after the row's query
    scores = scores.masked_fill(future, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (weights @ v).reshape(b, h, t, d)


class MLP(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(h, i, bias=False)
        self.up_proj = Linear(h, i, bias=False)
        self.down_proj = Linear(i, h, bias=False)

    # Training may set a fused path: fused(mlp, x) -> the output, or None where it does not apply
    # (adapters/fused_mlp.py: LoRA training's MLP, keeping half the activations).
    fused = None

    def forward(self, x):
        if self.fused is not None:
            out = self.fused(self, x)
            if out is not None:
                return out
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache, layer, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, start)
        return x + self.mlp(self.post_attention_layernorm(x))


def new_embedding(vocab: int, hidden: int) -> nn.Embedding:
    """nn.Embedding with its usual N(0, 1) init, except on the meta device (loading), where init is skipped:
    `normal_` on a meta tensor imports torch's symbolic-shapes stack (sympy), ~68 MiB resident for the
    rest of the process — 5% of a 1.5B int4 model's memory (measured with /proc/self/status)."""
    weight = torch.empty(vocab, hidden)
    if weight.device.type != "meta":
        nn.init.normal_(weight)  # what nn.Embedding.reset_parameters does: same values, same RNG draws
    return nn.Embedding(vocab, hidden, _weight=weight)


class Qwen2Body(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.embed_tokens = new_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.model = Qwen2Body(config)
        # A tied head reads embed_tokens.weight: no lm_head parameter exists (as in the file).
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)

    @property
    def dtype(self) -> torch.dtype:
        """The activation (and KV cache) dtype; read from a norm, which quantized models keep in float."""
        return self.model.norm.weight.dtype

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache.for_model(self.config, batch, capacity, self.dtype)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCacheProtocol | None = None,
                valid: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits for `tokens` [B, T].

        positions: RoPE positions [B, T] (default 0..T-1 after what the cache holds).
        valid: [B, T] bool, False for left-padding tokens (only needed with padding).
        last_only: compute the head for the last position only (prefill in generation).
        """
        x = self.final_hidden(tokens, positions, cache, valid, last_only)
        # lm_head is None when tied (Qwen2.5 0.5B-3B); quantized models set it to the shared quantized table.
        return self.lm_head(x) if self.lm_head is not None else fast_linear(x, self.model.embed_tokens.weight)

    def final_hidden(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                     cache: KVCacheProtocol | None = None, valid: torch.Tensor | None = None,
                     last_only: bool = False) -> torch.Tensor:
        """The final norm's output [B, T, hidden]: what the head multiplies (training takes the log-probs it needs
        from it in chunks, never the [B, T, vocab] logits). Arguments as forward's."""
        b, t = tokens.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + t).expand(b, t)
        if valid is None:
            valid = torch.ones(b, t, dtype=torch.bool)
        if cache is not None:
            cache.reserve(valid)
        mask = self._attention_mask(valid, cache, start)
        x = self.model.embed_tokens(tokens)
        cos, sin = self.rotary(positions, x.dtype)
        x = self.run_layers(x, cos, sin, mask, cache, start)
        if last_only:
            x = x[:, -1:]
        return self.model.norm(x)

    checkpoint_layers = False  # training: keep each layer's input only, recompute the rest in the backward

    def run_layers(self, x, cos, sin, mask, cache: KVCacheProtocol | None, start: int) -> torch.Tensor:
        recompute = self.checkpoint_layers and cache is None and torch.is_grad_enabled()
        for index, layer in enumerate(self.model.layers):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache, index, start, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, index, start)
        return x

    @staticmethod
    def _attention_mask(valid: torch.Tensor, cache: KVCacheProtocol | None, start: int) -> torch.Tensor | None:
        """None when plain causal attention is right; else a [B, 1, T, S] boolean mask."""
        b, t = valid.shape
        padded = cache.has_padding if cache is not None else not bool(valid.all())
        if not padded and start == 0:
            return None  # SDPA's is_causal (or full attention for T = 1)
        if not padded and t == 1:
            return None  # one new token attends to every cached slot
        slots_valid = cache.valid[:, : start + t] if cache is not None else valid
        query_slot = torch.arange(start, start + t)[:, None]
        key_slot = torch.arange(start + t)[None, :]
        allowed = (key_slot <= query_slot)[None] & slots_valid[:, None, :]
        # A padding query would attend nothing (NaN); let every slot see itself.
        allowed |= (key_slot == query_slot)[None]
        return allowed[:, None]
