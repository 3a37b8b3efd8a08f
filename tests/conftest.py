"""Shared fixtures: tiny Qwen2 models built with transformers' own classes, and a tiny tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(folder: Path, vocab_size: int = 300) -> None:
    """A byte-level BPE with Qwen's special tokens and ChatML template, like a Qwen2 tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["What is 12 + 7? The answer is 19.", "Reverse the word: apple", "hello world"] * 20
    tok.train_from_iterator(corpus, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "bos_token": None, "model_max_length": 512, "chat_template": QWEN_CHAT_TEMPLATE,
              "added_tokens_decoder": {str(tok.token_to_id(t)): {"content": t, "special": True, "lstrip": False,
                                       "rstrip": False, "normalized": False, "single_word": False}
                                       for t in SPECIAL_TOKENS}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def build_hf_model(folder: Path, *, vocab_size=320, hidden=48, intermediate=80, layers=3, heads=6, kv_heads=2,
                   tied=True, seed=0, std=0.1, dtype=torch.float32, with_tokenizer=True, **extra):
    """Save a random transformers Qwen2ForCausalLM to `folder`; returns the HF model (fp32, eval)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         tie_word_embeddings=tied, rope_theta=10000.0, max_position_embeddings=256,
                         bos_token_id=0, eos_token_id=2, **extra)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    model.to(dtype).save_pretrained(folder)
    if with_tokenizer:
        build_tokenizer(folder, vocab_size=min(vocab_size, 300))
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "model"
    build_hf_model(folder)
    return folder
