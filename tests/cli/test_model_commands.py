"""One smoke test per model-core verb, through the real entry point."""

import shutil
import subprocess
import sys

import pytest

from qwenlab.cli import main


def run_cli(*args, input_text=None):
    return subprocess.run([sys.executable, "-m", "qwenlab", *args], capture_output=True, text=True,
                          input=input_text, timeout=120)


def test_info_for_the_1_5b_preset(capsys):
    assert main(["info", "qwen2.5-1.5b"]) == 0
    out = capsys.readouterr().out
    assert "1.54B total, 1.31B non-embedding" in out and "12 / 2" in out and "151936" in out


def test_info_json_for_a_folder(tiny_model_dir, capsys):
    import json

    assert main(["info", str(tiny_model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"]["layers"] == 3 and info["architecture"]["tied_embeddings"] is True


def test_generate_streams_the_same_text_as_the_library(tiny_model_dir):
    from qwenlab.model import GenerationConfig, generate, load_model, load_tokenizer

    expected = generate(load_model(tiny_model_dir), load_tokenizer(tiny_model_dir), ["hello"],
                        GenerationConfig(max_new_tokens=8))[0].text
    result = run_cli("generate", str(tiny_model_dir), "--prompt", "hello", "--max-new-tokens", "8", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_generate_chat_and_prompt_too_long(tiny_model_dir):
    assert run_cli("generate", str(tiny_model_dir), "--prompt", "hi", "--chat", "--max-new-tokens", "3").returncode == 0
    result = run_cli("generate", str(tiny_model_dir), "--prompt", "hello world " * 50, "--max-context", "16")
    assert result.returncode == 2 and result.stderr.startswith("error: prompt has") and "Traceback" not in result.stderr


def test_chat_multi_turn_with_reset_and_exit(tiny_model_dir):
    result = run_cli("chat", str(tiny_model_dir), "--max-new-tokens", "4", input_text="hello\n/reset\nworld\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "(conversation cleared)" in result.stderr
    assert result.stdout.count("> ") >= 3


def test_unknown_preset_for_random(tmp_path, capsys):
    assert main(["random", "qwen9-huge", str(tmp_path / "x")]) == 2
    assert "unknown preset 'qwen9-huge'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def random_hf_model(tmp_path_factory):
    """A tiny random transformers Qwen2 with nano's byte-level tokenizer. Its greedy tokens are lone
    bytes that decode to U+FFFD, at the end of the completion too (issue 18's case)."""
    from qwenlab.nano import nano_path
    from tests.conftest import build_hf_model

    folder = tmp_path_factory.mktemp("hf-random") / "model"
    model = build_hf_model(folder, vocab_size=400, seed=13, std=0.05, with_tokenizer=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(nano_path() / name, folder / name)
    return folder, model


def transformers_greedy_text(folder, model, prompt: str, new_tokens: int) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
    assert len(out) == new_tokens  # no stop token: the whole completion is compared
    return tokenizer.decode(out, skip_special_tokens=True)


def test_generate_prints_exactly_what_transformers_decodes(random_hf_model, capsys):
    folder, model = random_hf_model
    expected = transformers_greedy_text(folder, model, "hello", 16)
    assert expected.endswith("\ufffd")  # bytes that can never be UTF-8, last: they used to be dropped
    assert main(["generate", str(folder), "--prompt", "hello", "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_chat_reply_is_exactly_what_transformers_decodes(random_hf_model, capsys, monkeypatch):
    import io

    from qwenlab.model import load_tokenizer

    folder, model = random_hf_model
    prompt = load_tokenizer(folder).apply_chat_template([{"role": "user", "content": "hello"}])
    expected = transformers_greedy_text(folder, model, prompt, 12)
    assert expected.endswith("\ufffd")
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", str(folder), "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == f"> {expected}\n> "


def test_presets_by_size_alone_as_the_readme_writes_them():
    from qwenlab.checkpoint.config import get_preset

    assert get_preset("0.5b") == get_preset("Qwen2.5-0.5B") and get_preset("1.5b").num_attention_heads == 12


def test_generate_takes_a_positional_or_stdin_prompt_a_system_message_and_prints_speed(tiny_model_dir):
    flag = run_cli("generate", str(tiny_model_dir), "--prompt", "hello", "--max-new-tokens", "5")
    positional = run_cli("generate", str(tiny_model_dir), "hello", "--max-new-tokens", "5")
    piped = run_cli("generate", str(tiny_model_dir), "-", "--max-new-tokens", "5", "--verbose", input_text="hello")
    assert flag.returncode == positional.returncode == piped.returncode == 0, piped.stderr
    assert flag.stdout == positional.stdout == piped.stdout
    assert "time to first token" in piped.stderr and "tokens/s" in piped.stderr
    both = run_cli("generate", str(tiny_model_dir), "hello", "--prompt", "hi")
    assert both.returncode == 2 and "give the prompt once" in both.stderr


def test_the_library_generates_from_chat_messages_and_loads_nano_s_tokenizer_by_name():
    from qwenlab.loading import load
    from qwenlab.model import GenerationConfig, generate, load_tokenizer

    model, tokenizer, _ = load("nano")
    assert load_tokenizer("nano").encode("hello") == tokenizer.encode("hello")
    config = GenerationConfig(max_new_tokens=6)
    as_text = generate(model, tokenizer, ["What is 2 + 3?"], config, chat=True)[0].text
    as_messages = generate(model, tokenizer, [[{"role": "user", "content": "What is 2 + 3?"}]], config)[0].text
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    with_system = generate(model, tokenizer, [conversation], config)[0]
    assert as_text == as_messages
    assert with_system.prompt_tokens == len(tokenizer.encode(tokenizer.apply_chat_template(conversation)))


def test_info_takes_a_preset_by_size_as_random_does(capsys):
    assert main(["info", "1.5b"]) == 0
    assert "12 / 2" in capsys.readouterr().out
