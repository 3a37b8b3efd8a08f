"""The shipped nano model: loads in the model core and in transformers, agrees, and has learned."""

import json

import pytest
import torch

from qwenlab.eval.task_eval import evaluate_tasks
from qwenlab.cli import main
from qwenlab.model import load_model, load_tokenizer
from qwenlab.nano import nano_path

# (task, difficulty) -> floor: the measured accuracy (n=100, seed 0) minus a margin. Measured:
# arithmetic 0.40 (d1), reverse 0.81, sort_letters 0.78 (d2), count_letter 0.49 (d1). Chance is ~0
# for the exact-answer tasks and ~0.25 for count_letter (answers 0..3).
ACCURACY_FLOOR = {("arithmetic", 1): 0.3, ("reverse", 2): 0.65, ("sort_letters", 2): 0.6, ("count_letter", 1): 0.35}


@pytest.fixture(scope="module")
def nano():
    return load_model("nano"), load_tokenizer(nano_path())


def test_nano_path_command(capsys):
    assert main(["nano", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(nano_path())


def test_nano_is_small_and_qwen_shaped():
    config = json.loads((nano_path() / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["tie_word_embeddings"] is True
    size = sum(p.stat().st_size for p in nano_path().iterdir())
    assert size < 20 * 1024 * 1024


def test_transformers_loads_nano_and_agrees(nano):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = nano
    hf_tok = AutoTokenizer.from_pretrained(nano_path())
    hf = AutoModelForCausalLM.from_pretrained(nano_path(), dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is 12 + 30?"}]
    text = tokenizer.apply_chat_template(messages)
    assert text == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text)
    assert ids == hf_tok(text)["input_ids"]
    with torch.no_grad():
        assert (hf(torch.tensor([ids])).logits - model(torch.tensor([ids]))).abs().max().item() <= 1e-4
        out = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    from qwenlab.model import GenerationConfig, generate

    ours = generate(model, tokenizer, [text], GenerationConfig(max_new_tokens=8))[0]
    expected = hf_tok.decode(out[0, len(ids):], skip_special_tokens=True)
    assert ours.text == expected


def test_nano_accuracy_above_floor(nano):
    model, tokenizer = nano
    for (task, difficulty), floor in ACCURACY_FLOOR.items():
        result = evaluate_tasks(model, tokenizer, [task], n=100, seed=0, difficulty=difficulty, progress=False)[task]
        assert result.accuracy >= floor, (task, difficulty, result.accuracy)


def test_repeat_is_new_to_nano_but_written_in_its_characters():
    # The recipe's second skill must be one nano was never trained on, asked in characters it has seen.
    from qwenlab.nano.train import TRAIN_DIFFICULTIES
    from qwenlab.tasks import generate

    assert "repeat" not in TRAIN_DIFFICULTIES
    seen = set("".join(generate(t, seed, d).prompt for t, ds in TRAIN_DIFFICULTIES.items() for d in ds
                       for seed in range(50)))
    prompts = "".join(generate("repeat", seed, 1).prompt for seed in range(50))
    assert set(prompts) <= seen, set(prompts) - seen
