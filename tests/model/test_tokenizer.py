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
