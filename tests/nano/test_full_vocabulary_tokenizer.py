"""`qwenlab random` writes a tokenizer with one token per embedding row: every id a random model samples decodes."""

import json

from qwenlab.checkpoint.config import Qwen2Config
from qwenlab.nano.tokenizer_build import write_full_vocabulary_tokenizer

QWEN25_ROWS = 151936


def test_every_row_decodes_and_qwen_special_ids_are_kept(tmp_path):
    from transformers import AutoTokenizer

    from qwenlab.model.tokenizer import load_tokenizer

    write_full_vocabulary_tokenizer(tmp_path, QWEN25_ROWS)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert len(hf) == QWEN25_ROWS
    texts = hf.batch_decode([[i] for i in range(QWEN25_ROWS)], skip_special_tokens=False)
    assert all(texts), [i for i, t in enumerate(texts) if not t][:5]
    # Qwen2.5's own ids for what the engine and the chat template rely on.
    assert hf.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]) \
        == [151643, 151644, 151645, 151657, 151658]
    # qwenlab's tokenizer reads the same folder the same way, and text round-trips.
    ours = load_tokenizer(tmp_path)
    text = "Reverse the word 'hello', then say: done."
    assert ours.encode(text) == hf.encode(text) and ours.decode(ours.encode(text)) == text
    assert ours.vocab_size >= QWEN25_ROWS - 1
    rendered = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in rendered


def test_a_smaller_vocabulary_is_filled_exactly(tmp_path):
    write_full_vocabulary_tokenizer(tmp_path, 1000)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    ids = sorted([*data["model"]["vocab"].values(), *(t["id"] for t in data["added_tokens"])])
    assert ids == list(range(1000))


def test_random_writes_it_beside_the_weights(tmp_path, monkeypatch):
    """The CLI's random model: a small config through the same writer the presets use."""
    from qwenlab.checkpoint.random_model import write_random_model
    from qwenlab.model.tokenizer import load_tokenizer

    config = Qwen2Config(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    out = write_random_model(config, tmp_path / "m", progress=False,
                             write_tokenizer=lambda folder: write_full_vocabulary_tokenizer(folder, 2048))
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    tok = load_tokenizer(out)
    assert all(tok.decode([i]) for i in range(256, 2048))
