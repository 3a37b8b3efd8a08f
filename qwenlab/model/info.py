"""What a model is and what it costs: architecture table, parameter counts, memory per dtype."""

from __future__ import annotations

from qwenlab.checkpoint.config import Qwen2Config

# Bytes per weight, including per-group scales (bf16, group 128) and int4 zero points.
BYTES_PER_WEIGHT = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0 + 2 / 128, "int4": 0.5 + 4 / 128}


def human_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def describe(config: Qwen2Config) -> dict:
    total = config.parameter_count()
    return {
        "architecture": {
            "layers": config.num_hidden_layers,
            "query_heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "hidden": config.hidden_size,
            "intermediate": config.intermediate_size,
            "vocab": config.vocab_size,
            "context": config.max_position_embeddings,
            "rope_theta": config.rope_theta,
            "tied_embeddings": config.tie_word_embeddings,
        },
        "parameters": {"total": total, "non_embedding": config.non_embedding_parameters(),
                       "embedding": config.embedding_parameters()},
        # Weight memory only (no KV cache or activations).
        "memory_bytes": {dtype: int(total * b) for dtype, b in BYTES_PER_WEIGHT.items()},
    }


def format_description(info: dict, title: str) -> str:
    arch = info["architecture"]
    rows = [
        ("layers", arch["layers"]),
        ("heads (Q / KV)", f"{arch['query_heads']} / {arch['kv_heads']}  (head dim {arch['head_dim']})"),
        ("hidden", arch["hidden"]),
        ("intermediate", arch["intermediate"]),
        ("vocab", arch["vocab"]),
        ("context", arch["context"]),
        ("rope_theta", f"{arch['rope_theta']:g}"),
        ("tied embeddings", "yes" if arch["tied_embeddings"] else "no"),
        ("parameters", f"{human_count(info['parameters']['total'])} total, "
                       f"{human_count(info['parameters']['non_embedding'])} non-embedding"),
    ]
    rows += [(f"memory {dtype}", human_bytes(size)) for dtype, size in info["memory_bytes"].items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join([title] + [f"  {k:<{width}}  {v}" for k, v in rows])
