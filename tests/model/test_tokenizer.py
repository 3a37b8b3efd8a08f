"""Tokenizer and chat template against transformers' AutoTokenizer on the same files."""

import json
import shutil

import pytest

from qwenlab.errors import QwenlabError
from qwenlab.model import load_tokenizer

MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
            {"role": "user", "content": "Reverse the word: apple"}]


def test_encode_decode_and_template_match_transformers(tiny_model_dir):
    from transformers import AutoTokenizer

    ours, theirs = load_tokenizer(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "hello world, What is 12 + 7?"
    assert ours.encode(text) == theirs(text)["input_ids"]
    assert ours.decode(ours.encode(text)) == text
    rendered = ours.apply_chat_template(MESSAGES)
    assert rendered == theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")
    assert ours.encode("<|im_end|>") == [ours.token_id("<|im_end|>")]
    assert ours.token_id("<|im_end|>") in ours.stop_ids()


def test_chat_template_from_jinja_file(tiny_model_dir, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    template = config.pop("chat_template")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text(template.replace("helpful assistant", "jinja assistant"))
    assert "jinja assistant" in load_tokenizer(folder).apply_chat_template(MESSAGES)


def test_missing_chat_template_is_a_clear_error(tiny_model_dir, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(QwenlabError, match="no chat template"):
        load_tokenizer(folder).apply_chat_template(MESSAGES)


def test_missing_tokenizer_file_is_a_clear_error(tmp_path):
    with pytest.raises(QwenlabError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("content, message", [
    ('{"eos_token": ', "tokenizer_config.json: invalid JSON"),
    ("[1, 2]", "tokenizer_config.json: expected a JSON object"),
    ('{"chat_template": 7}', "'chat_template': expected a string"),
    ('{"chat_template": [{"name": "default"}]}', "'chat_template': expected a string or a list"),
])
def test_bad_tokenizer_config_is_a_one_line_error(tiny_model_dir, tmp_path, content, message):
    folder = tmp_path / "tok"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "tokenizer_config.json").write_text(content)
    with pytest.raises(QwenlabError, match=message):
        load_tokenizer(folder)


def test_token_bytes_decode_to_what_decode_gives(tiny_model_dir):
    """Each token's bytes, read as UTF-8 the way `tokenizers` does, are its decode; specials add none."""
    tok = load_tokenizer(tiny_model_dir)
    assert tok.byte_level
    for token in range(tok.vocab_size + 2):
        data = tok.token_bytes(token)
        assert data.decode("utf-8", errors="replace") == tok.decode([token]), token
    assert tok.token_bytes(tok.token_id("<|im_end|>")) == b""
    assert any(tok.decode([t]) == "\ufffd" for t in range(tok.vocab_size))  # lone bytes were covered
