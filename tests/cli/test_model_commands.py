"""One smoke test per model-core verb, through the real entry point."""

import subprocess
import sys

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
    assert result.returncode == 1 and result.stderr.startswith("error: prompt has") and "Traceback" not in result.stderr


def test_chat_multi_turn_with_reset_and_exit(tiny_model_dir):
    result = run_cli("chat", str(tiny_model_dir), "--max-new-tokens", "4", input_text="hello\n/reset\nworld\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "(conversation cleared)" in result.stderr
    assert result.stdout.count("> ") >= 3


def test_unknown_preset_for_random(tmp_path, capsys):
    assert main(["random", "qwen9-huge", str(tmp_path / "x")]) == 1
    assert "unknown preset 'qwen9-huge'" in capsys.readouterr().err
