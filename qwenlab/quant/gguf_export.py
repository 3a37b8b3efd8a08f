"""Export a Qwen2 checkpoint folder to one GGUF file that llama.cpp loads (F16, Q8_0 or Q4_0).

Written with the `gguf` package (GGUFWriter, gguf.quants); the metadata keys and tensor names
are llama.cpp's "qwen2" architecture. Qwen2 uses NEOX-style RoPE (rotate half), which is what
llama.cpp applies for qwen2, so q/k weights are written unpermuted (unlike LLaMA's export).

The tokenizer goes in as llama.cpp's "gpt2" BPE model with the "qwen2" pre-tokenizer: the
byte-level token strings, merges and token types from tokenizer.json, plus the chat template,
so llama.cpp tokenizes prompts exactly as qwenlab does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from qwenlab.errors import QwenlabError

GGUF_TYPES = ("f16", "q8_0", "q4_0")
QK = 32  # Q8_0 / Q4_0 block length along a row

# HF name inside a layer -> llama.cpp name (blk.N.<name>); one table, in one place.
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# llama.cpp token types (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def gguf_tensor_name(hf_name: str) -> str:
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    parts = hf_name.split(".", 3)  # model.layers.N.rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in LAYER_NAMES:
        return f"blk.{parts[2]}.{LAYER_NAMES[parts[3]]}"
    raise QwenlabError(f"tensor '{hf_name}' has no GGUF name for the qwen2 architecture")


def check_gguf_type(kind: str) -> str:
    kind = str(kind).lower()
    if kind not in GGUF_TYPES:
        raise QwenlabError(f"unknown GGUF type '{kind}'; expected one of {', '.join(GGUF_TYPES)}")
    return kind


def read_gguf_vocab(folder: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens (byte-level strings), token types and merges ("a b") from tokenizer.json."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise QwenlabError(f"{path}: missing tokenizer.json (a GGUF file carries the tokenizer)")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") not in ("BPE", None) or "vocab" not in model:
        raise QwenlabError(f"{path}: expected a byte-level BPE tokenizer (Qwen2 style)")
    by_id: dict[int, tuple[str, int]] = {i: (t, NORMAL) for t, i in model["vocab"].items()}
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = (added["content"], CONTROL if added.get("special") else USER_DEFINED)
    if by_id and max(by_id) >= vocab_size:
        raise QwenlabError(f"{path}: token id {max(by_id)} is outside the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):  # the embedding may be padded past the tokenizer (Qwen2.5: 151936)
        text, kind = by_id.get(i, (f"[PAD{i}]", UNUSED))
        tokens.append(text)
        types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def _special_ids(folder: Path, config, tokens: list[str]) -> tuple[dict[str, int], str | None]:
    from qwenlab.model.tokenizer import Tokenizer

    tokenizer = Tokenizer(folder)
    index = {t: i for i, t in enumerate(tokens)}
    ids = {}
    if tokenizer.eos_token in index:
        ids["eos"] = index[tokenizer.eos_token]
    if tokenizer.pad_token in index:
        ids["pad"] = index[tokenizer.pad_token]
    if isinstance(config.bos_token_id, int) and 0 <= config.bos_token_id < len(tokens):
        ids["bos"] = config.bos_token_id  # Qwen: <|endoftext|>, never prepended (add_bos_token false)
    return ids, tokenizer.chat_template


def _tensor_data(tensor: torch.Tensor, kind: str):
    """(numpy array, raw ggml type or None, type name) for one tensor."""
    import gguf

    weight = tensor.float()
    if weight.dim() == 1:  # norms and biases stay f32, as llama.cpp's own converter writes them
        return weight.numpy(), None, "f32"
    if kind == "f16" or weight.shape[-1] % QK:
        return weight.to(torch.float16).numpy(), None, "f16"
    qtype = gguf.GGMLQuantizationType.Q8_0 if kind == "q8_0" else gguf.GGMLQuantizationType.Q4_0
    return gguf.quants.quantize(weight.numpy(), qtype), qtype, kind


def export_gguf(model: str | Path, out: str | Path, kind: str = "q8_0", *, head_kind: str | None = None,
                force: bool = False) -> dict:
    """Write MODEL (an HF Qwen2 folder, float weights) to OUT as GGUF; returns a summary.

    head_kind: the type of the token embedding / LM head (default: `kind`), e.g. q8_0 in a q4_0
    file to mirror a qwenlab int4 model with an int8 head.
    """
    from qwenlab.checkpoint import open_checkpoint
    from qwenlab.checkpoint.lineage import make_lineage

    kind = check_gguf_type(kind)
    head_kind = kind if head_kind is None else check_gguf_type(head_kind)
    try:
        import gguf
    except ImportError:
        raise QwenlabError("the 'gguf' package is needed for GGUF export: pip install gguf") from None
    checkpoint = open_checkpoint(model, validate=False)
    if "quantization" in checkpoint.config.extra:
        raise QwenlabError(f"{checkpoint.path}: is already quantized by qwenlab; "
                           "export the float model it was made from")
    checkpoint.validate()
    from qwenlab.checkpoint.writer import prepare_output_dir, temp_sibling, write_text_atomic

    out = prepare_output_dir(out, force, [checkpoint.path], kind="file")
    config = checkpoint.config
    tokens, types, merges = read_gguf_vocab(checkpoint.path, config.vocab_size)
    special, chat_template = _special_ids(checkpoint.path, config, tokens)

    tmp = temp_sibling(out)  # written whole, then renamed over OUT: never a half-written .gguf
    writer = gguf.GGUFWriter(str(tmp), "qwen2")
    writer.add_name(checkpoint.path.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                          "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[kind])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if "bos" in special:
        writer.add_bos_token_id(special["bos"])
    if "eos" in special:
        writer.add_eos_token_id(special["eos"])
    if "pad" in special:
        writer.add_pad_token_id(special["pad"])
    writer.add_add_bos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)

    written: dict[str, int] = {}
    names = [n for n in checkpoint.tensor_names() if not (n == "lm_head.weight" and config.tie_word_embeddings)]
    try:
        for name in names:
            head = name in ("model.embed_tokens.weight", "lm_head.weight")
            data, raw_type, type_name = _tensor_data(checkpoint.get(name), head_kind if head else kind)
            writer.add_tensor(gguf_tensor_name(name), data, raw_dtype=raw_type)
            written[type_name] = written.get(type_name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    lineage = make_lineage("export", f"gguf-{kind}", {"source": checkpoint.path},
                           {"type": kind, "head_type": head_kind})
    write_text_atomic(out.with_name(out.name + ".lineage.json"), json.dumps(lineage, indent=2) + "\n")
    return {"path": str(out), "type": kind, "tensors_by_type": written, "bytes": out.stat().st_size,
            "vocab": len(tokens)}
