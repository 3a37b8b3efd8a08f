"""The tensor names and shapes of a Hugging Face Qwen2 checkpoint, derived from its config."""

from __future__ import annotations

from qwenlab.checkpoint.config import Qwen2Config

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layer_prefix(index: int) -> str:
    return f"model.layers.{index}."


def layer_tensor_shapes(config: Qwen2Config, index: int) -> dict[str, tuple[int, ...]]:
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * config.head_dim
    p = layer_prefix(index)
    return {
        p + "input_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (h, h),
        p + "self_attn.q_proj.bias": (h,),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.k_proj.bias": (kv,),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.v_proj.bias": (kv,),
        p + "self_attn.o_proj.weight": (h, h),
        p + "post_attention_layernorm.weight": (h,),
        p + "mlp.gate_proj.weight": (i, h),
        p + "mlp.up_proj.weight": (i, h),
        p + "mlp.down_proj.weight": (h, i),
    }


def expected_tensor_shapes(config: Qwen2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen2 checkpoint of this config holds, in the order HF writes them."""
    shapes = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size)}
    for index in range(config.num_hidden_layers):
        shapes.update(layer_tensor_shapes(config, index))
    shapes["model.norm.weight"] = (config.hidden_size,)
    # Tied models (Qwen2.5 0.5B/1.5B/3B) store no lm_head: the head reuses embed_tokens.
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    return shapes
