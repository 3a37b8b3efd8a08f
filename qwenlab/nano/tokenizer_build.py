"""Train a small byte-level BPE that behaves exactly like Qwen2's tokenizer, and write its folder.

Same normaliser (NFC), pre-tokeniser (Qwen2's split regex, then byte level) and decoder as
Qwen2.5, so transformers' Qwen2Tokenizer, llama.cpp's "qwen2" pre-tokeniser and qwenlab agree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

QWEN2_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                     r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (Path(__file__).parent / "chat_template.jinja").read_text()


def train_qwen_style_bpe(corpus: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    # Special tokens go last, after the BPE vocabulary, as in Qwen2.5 (151643 = <|endoftext|>).
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def write_tokenizer_folder(tok: Tokenizer, folder: Path, model_max_length: int = 32768) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


# ---- a tokenizer for random-weight folders: every one of the model's rows decodes to text ----------------

# Qwen2.5's special and added tokens, at its ids (151643 = <|endoftext|>, 151645 = <|im_end|>, ...).
QWEN25_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False)]
QWEN25_FIRST_ADDED_ID = 151643


def _letter_words():
    """(token, left, right) in merge order: 'ab', 'Ġa', 'Ġab', 'abc', 'Ġabc', 'abcd', ... each the merge of two
    earlier tokens, so a byte-level BPE built from them is valid and every token decodes to ASCII text."""
    import itertools
    import string

    letters = string.ascii_lowercase
    for a, b in itertools.product(letters, repeat=2):
        yield a + b, a, b
    for a in letters:
        yield "Ġ" + a, "Ġ", a
    for length in itertools.count(2):
        for word in itertools.product(letters, repeat=length):
            yield "Ġ" + "".join(word), "Ġ" + "".join(word[:-1]), word[-1]
        for word in itertools.product(letters, repeat=length + 1):
            yield "".join(word), "".join(word[:-1]), word[-1]


def full_vocabulary_tokenizer(rows: int, first_added_id: int = QWEN25_FIRST_ADDED_ID) -> Tokenizer:
    """A Qwen2-style byte-level BPE with exactly `rows` ids, all of which decode to something.

    Ids below `first_added_id` are the 256 byte symbols and letter words (synthesised merges, no
    training); Qwen2.5's 22 special/added tokens follow at their real ids; the padding rows after
    them (151665..151935 in Qwen2.5, no token there) are added tokens `<|pad_N|>`, so a random model's
    every sample shows up in the streamed text. `qwenlab random` writes it beside random weights."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    first_added_id = min(first_added_id, rows)
    vocab = {symbol: i for i, symbol in enumerate(alphabet[:first_added_id])}
    merges = []
    words = _letter_words()
    while len(vocab) < first_added_id:
        token, left, right = next(words)
        vocab[token] = len(vocab)
        merges.append([left, right])
    added = QWEN25_ADDED_TOKENS[:rows - first_added_id]
    added += [(f"<|pad_{i}|>", False) for i in range(rows - first_added_id - len(added))]
    added_ids = range(first_added_id, rows)
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": special} for i, (t, special) in zip(added_ids, added)],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    return Tokenizer.from_str(json.dumps(tokenizer_json))


def write_full_vocabulary_tokenizer(folder: Path, rows: int, model_max_length: int = 32768) -> None:
    """tokenizer.json and tokenizer_config.json (nano's chat template) covering `rows` ids, into `folder`."""
    tok = full_vocabulary_tokenizer(rows)
    write_tokenizer_folder(tok, folder, model_max_length)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": special}
        for t, special in QWEN25_ADDED_TOKENS if tok.token_to_id(t) is not None}
    config["added_tokens_decoder"].update({
        str(i): {"content": f"<|pad_{i - QWEN25_FIRST_ADDED_ID - len(QWEN25_ADDED_TOKENS)}|>", "lstrip": False,
                 "normalized": False, "rstrip": False, "single_word": False, "special": False}
        for i in range(QWEN25_FIRST_ADDED_ID + len(QWEN25_ADDED_TOKENS), rows)})
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
