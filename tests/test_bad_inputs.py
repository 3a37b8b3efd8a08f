"""Every CLI command fails cleanly on bad input (issue 18, part 6).

One table: for each command, missing files, folders where files belong (and the reverse), empty,
truncated or corrupt JSON / YAML / JSONL / safetensors, unknown config fields, wrong dtypes and
shapes, out-of-range numbers, unwritable outputs and existing outputs without --force. Each case
runs `qwenlab` in-process and checks: exit code 2, no traceback, the error on one line that names
the culprit (a file or a field), and nothing written or removed, in the case's folder or in the
shared model folders.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenlab.cli import main
from tests.conftest import build_hf_model


@dataclass
class Case:
    id: str
    argv: list[str]
    culprit: str  # must appear in the error line; placeholders as in argv
    setup: Callable[[Path, dict], object] | None = None  # writes the bad input; its return value is {bad}


CASES: list[Case] = []


def case(id: str, argv: list[str], culprit: str, setup=None) -> None:
    CASES.append(Case(id, argv, culprit, setup))


# ---- bad inputs, written into the case's folder ---------------------------------------------------
def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def files(**named: str | bytes):
    """Setup writing files into the case folder, e.g. files(**{"c.yaml": "a: ["})."""
    def setup(t: Path, fx: dict) -> None:
        for name, content in named.items():
            write(t / name, content.format(**fx) if isinstance(content, str) else content)
    return setup


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_tensor(path: Path, name: str, change) -> None:
    tensors = load_file(path)
    tensors[name] = change(tensors[name])
    save_file(tensors, path, metadata={"format": "pt"})


def bad_model(change: Callable[[Path], object], source: str = "model"):
    """Setup: a copy of a fixture model with `change` applied; {bad} is its folder."""
    def setup(t: Path, fx: dict) -> Path:
        folder = t / "m"
        shutil.copytree(fx[source], folder)
        change(folder)
        return folder
    return setup


def bad_adapter(change: Callable[[Path], object]):
    def setup(t: Path, fx: dict) -> Path:
        folder = t / "a"
        shutil.copytree(fx["adapter"], folder)
        change(folder)
        return folder
    return setup


def truncate(name: str, keep: int):
    return lambda folder: (folder / name).write_bytes((folder / name).read_bytes()[:keep])


def replace_with_folder(name: str):
    def change(folder: Path) -> None:
        (folder / name).unlink()
        (folder / name).mkdir()
    return change


def existing(name: str):
    """Setup: an output that already exists (a folder holding a file, or a file)."""
    def setup(t: Path, fx: dict) -> None:
        write(t / name / "keep.txt", "old") if "." not in name else write(t / name, "old")
    return setup


UNWRITABLE = "{t}/afile/out"  # under a regular file: no folder can be made there, even as root
ST = "model.safetensors"
MODEL_CORRUPTIONS = {
    "config-empty": (lambda f: (f / "config.json").write_text(""), "config.json"),
    "config-truncated": (truncate("config.json", 40), "config.json"),
    "config-not-an-object": (lambda f: (f / "config.json").write_text("[1, 2]"), "config.json"),
    "config-wrong-type": (lambda f: edit_json(f / "config.json", hidden_size="wide"), "hidden_size"),
    "config-negative": (lambda f: edit_json(f / "config.json", num_hidden_layers=-1), "num_hidden_layers"),
    "config-is-a-folder": (replace_with_folder("config.json"), "config.json"),
    "weights-empty": (lambda f: (f / ST).write_bytes(b""), ST),
    "weights-truncated": (truncate(ST, 1000), ST),
    "weights-corrupt-header": (lambda f: (f / ST).write_bytes((f / ST).read_bytes()[:8] + b"{garbage" * 8), ST),
    "weights-is-a-folder": (replace_with_folder(ST), ST),
    "weights-missing": (lambda f: (f / ST).unlink(), ST),
    "weights-wrong-dtype": (lambda f: edit_tensor(f / ST, "model.norm.weight", lambda x: x.to(torch.int32)),
                            "model.norm.weight"),
    "weights-wrong-shape": (lambda f: edit_tensor(f / ST, "model.norm.weight", lambda x: torch.ones(3)),
                            "model.norm.weight"),
    "index-corrupt": (lambda f: write(f / "model.safetensors.index.json", "{not json"), "model.safetensors.index.json"),
}
GENERATE = ["--prompt", "hi", "--max-new-tokens", "2"]

# ---- info, generate, chat, random, nano --------------------------------------------------------------
case("info-missing-folder", ["info", "{t}/nope"], "{t}/nope")
case("info-file-for-a-folder", ["info", "{model}/config.json"], "config.json")
case("info-empty-folder", ["info", "{t}/empty"], "{t}/empty", files(**{"empty/.keep": ""}))
for name, (change, culprit) in MODEL_CORRUPTIONS.items():
    case(f"info-{name}", ["info", "{bad}"], culprit, bad_model(change))
for name, change, culprit in [
    ("tokenizer-empty", lambda f: (f / "tokenizer.json").write_text(""), "tokenizer.json"),
    ("tokenizer-truncated", truncate("tokenizer.json", 100), "tokenizer.json"),
    ("tokenizer-config-truncated", truncate("tokenizer_config.json", 30), "tokenizer_config.json"),
    ("tokenizer-config-not-an-object", lambda f: (f / "tokenizer_config.json").write_text("[]"), "tokenizer_config.json"),
    ("generation-config-truncated", lambda f: write(f / "generation_config.json", '{"eos_token_id": '),
     "generation_config.json"),
    ("generation-config-eos-not-an-id", lambda f: write(f / "generation_config.json", '{"eos_token_id": "x"}'),
     "generation_config.json"),
    ("chat-template-broken", lambda f: edit_json(f / "tokenizer_config.json", chat_template="{% if %}"),
     "tokenizer_config.json"),
    ("weights-truncated", truncate(ST, 1000), ST),
]:
    case(f"generate-{name}", ["generate", "{bad}", *GENERATE, "--chat"], culprit, bad_model(change))
for flag, value in [("--max-new-tokens", "-1"), ("--max-new-tokens", "many"), ("--temperature", "nan"),
                    ("--temperature", "-1"), ("--top-k", "-3"), ("--top-p", "0"), ("--repetition-penalty", "inf"),
                    ("--seed", "-1"), ("--seed", str(2**64)), ("--max-context", "0")]:
    case(f"generate{flag}={value}", ["generate", "{model}", *GENERATE, flag, value], flag)
case("generate-tiny-temperature", ["generate", "{model}", *GENERATE, "--temperature", "1e-300"], "temperature")
case("generate-max-context-beyond-the-model", ["generate", "{model}", *GENERATE, "--max-context", "100000"],
     "max_context")
case("generate-empty-stop-string", ["generate", "{model}", *GENERATE, "--stop", ""], "stop")
case("generate-unknown-dtype", ["generate", "{model}", *GENERATE, "--dtype", "fp8"], "fp8")
case("generate-adapter-missing", ["generate", "{model}", *GENERATE, "--adapter", "{t}/nope"], "{t}/nope")
case("generate-adapter-is-a-model", ["generate", "{model}", *GENERATE, "--adapter", "{model}"], "adapter_config.json")
for name, change, culprit in [
    ("config-truncated", truncate("adapter_config.json", 30), "adapter_config.json"),
    ("config-not-an-object", lambda f: (f / "adapter_config.json").write_text("[]"), "adapter_config.json"),
    ("rank-wrong-type", lambda f: edit_json(f / "adapter_config.json", r="x"), "'r'"),
    ("alpha-pattern-bad-regex", lambda f: edit_json(f / "adapter_config.json", alpha_pattern={"(": 2}), "alpha_pattern"),
    ("weights-truncated", truncate("adapter_model.safetensors", 300), "adapter_model.safetensors"),
    ("weights-int-dtype", lambda f: edit_tensor(f / "adapter_model.safetensors", next(iter(
        load_file(f / "adapter_model.safetensors"))), lambda x: x.to(torch.int64)), "adapter_model.safetensors"),
    ("weights-missing", lambda f: (f / "adapter_model.safetensors").unlink(), "adapter_model.safetensors"),
]:
    case(f"generate-adapter-{name}", ["generate", "{model}", *GENERATE, "--adapter", "{bad}"], culprit,
         bad_adapter(change))
case("chat-broken-template", ["chat", "{bad}"], "tokenizer_config.json",
     bad_model(lambda f: edit_json(f / "tokenizer_config.json", chat_template="{% if %}")))
case("chat-top-p-above-one", ["chat", "{model}", "--top-p", "2"], "--top-p")
case("random-unknown-preset", ["random", "qwen9-huge", "{t}/out"], "qwen9-huge")
case("random-bad-shard-size", ["random", "qwen2.5-0.5b", "{t}/out", "--max-shard-size", "lots"], "--max-shard-size")
case("random-negative-seed", ["random", "qwen2.5-0.5b", "{t}/out", "--seed", "-1"], "--seed")
case("random-output-exists", ["random", "qwen2.5-0.5b", "{t}/out"], "{t}/out", existing("out"))
case("random-unwritable-output", ["random", "qwen2.5-0.5b", UNWRITABLE], "{t}/afile")
case("nano-unknown-action", ["nano", "where"], "where")
case("unknown-command", ["frobnicate"], "frobnicate")

# ---- eval -----------------------------------------------------------------------------------------
EVAL = ["eval", "{model}", "--no-record"]
case("eval-unknown-task", [*EVAL, "--tasks", "nope"], "nope")
case("eval-zero-n", [*EVAL, "--tasks", "reverse", "--n", "0"], "--n")
case("eval-zero-batch-size", [*EVAL, "--tasks", "reverse", "--batch-size", "0"], "--batch-size")
case("eval-difficulty-out-of-range", [*EVAL, "--tasks", "reverse", "--difficulty", "99"], "difficulty")
case("eval-model-truncated-weights", ["eval", "{bad}", "--tasks", "reverse"], ST, bad_model(truncate(ST, 1000)))
case("eval-perplexity-missing", [*EVAL, "--perplexity", "{t}/nope.txt"], "nope.txt")
case("eval-perplexity-folder", [*EVAL, "--perplexity", "{t}/docs"], "{t}/docs", files(**{"docs/a.txt": "x"}))
case("eval-perplexity-empty", [*EVAL, "--perplexity", "{t}/e.txt"], "e.txt", files(**{"e.txt": ""}))
case("eval-perplexity-binary", [*EVAL, "--perplexity", "{t}/e.txt"], "e.txt", files(**{"e.txt": b"\xff\xfe\x00"}))
case("eval-perplexity-truncated-jsonl", [*EVAL, "--perplexity", "{t}/e.jsonl"], "e.jsonl:2",
     files(**{"e.jsonl": '{{"text": "a"}}\n{{"te'}))
case("eval-perplexity-zero-stride", [*EVAL, "--perplexity", "{t}/e.txt", "--stride", "0"], "--stride",
     files(**{"e.txt": "hello"}))
case("eval-gsm8k-truncated", [*EVAL, "--gsm8k", "{t}/g.jsonl"], "g.jsonl:2",
     files(**{"g.jsonl": '{{"question": "1+1", "answer": "#### 2"}}\n{{"q'}))
case("eval-gsm8k-binary", [*EVAL, "--gsm8k", "{t}/g.jsonl"], "g.jsonl", files(**{"g.jsonl": b"\xff\xfe"}))
case("eval-gsm8k-negative-fewshot", [*EVAL, "--gsm8k", "{t}/g.jsonl", "--fewshot", "-1"], "--fewshot",
     files(**{"g.jsonl": '{{"question": "1+1", "answer": "#### 2"}}\n'}))

# ---- run (recipes) --------------------------------------------------------------------------------
case("run-recipe-missing", ["run", "{t}/nope.yaml", "--out", "{t}/run"], "nope.yaml")
case("run-recipe-folder", ["run", "{t}/recipes", "--out", "{t}/run"], "{t}/recipes", files(**{"recipes/x.yaml": ""}))
case("run-recipe-empty", ["run", "{t}/r.yaml", "--out", "{t}/run"], "r.yaml", files(**{"r.yaml": ""}))
case("run-recipe-corrupt", ["run", "{t}/r.yaml", "--out", "{t}/run"], "r.yaml", files(**{"r.yaml": "stages: [\n  - {{"}))
case("run-unknown-stage", ["run", "{t}/r.yaml", "--out", "{t}/run"], "bogus",
     files(**{"r.yaml": "stages:\n  - bogus: {{}}\n"}))
case("run-stage-unknown-parameter", ["run", "{t}/r.yaml", "--out", "{t}/run"], "bogus",
     files(**{"r.yaml": "models: {{m: {model}}}\nstages:\n  - info: {{model: m, bogus: 1}}\n"}))
case("run-stage-unknown-model", ["run", "{t}/r.yaml", "--out", "{t}/run"], "nope",
     files(**{"r.yaml": "models: {{m: {model}}}\nstages:\n  - info: {{model: nope}}\n"}))

# ---- train, data, grpo ----------------------------------------------------------------------------
SFT = "\n".join([json.dumps({"prompt": "hi", "completion": "there"})] * 30) + "\n"
TRAIN = ["train", "sft", "--base", "{model}", "--data", "{t}/d.jsonl", "--out", "{t}/out", "--steps", "1",
         "--no-progress"]
data = files(**{"d.jsonl": SFT.replace("{", "{{").replace("}", "}}")})
case("train-config-missing", ["train", "sft", "--config", "{t}/nope.yaml"], "nope.yaml")
case("train-config-folder", ["train", "sft", "--config", "{t}/conf"], "{t}/conf", files(**{"conf/x": ""}))
case("train-config-corrupt", ["train", "sft", "--config", "{t}/c.yaml"], "c.yaml", files(**{"c.yaml": "a: [b"}))
case("train-config-unknown-key", ["train", "sft", "--config", "{t}/c.yaml"], "bogus", files(**{"c.yaml": "bogus: 1\n"}))
case("train-config-wrong-type", ["train", "sft", "--config", "{t}/c.yaml"], "lora_r", files(**{"c.yaml": "lora_r: x\n"}))
case("train-data-missing", ["train", "sft", "--base", "{model}", "--data", "{t}/nope.jsonl", "--out", "{t}/out"],
     "nope.jsonl")
case("train-data-folder", [*TRAIN[:4], "--data", "{t}/dd", *TRAIN[6:]], "{t}/dd", files(**{"dd/x": ""}))
case("train-data-empty", TRAIN, "d.jsonl", files(**{"d.jsonl": ""}))
case("train-data-truncated", TRAIN, "d.jsonl:31", files(**{"d.jsonl": SFT.replace("{", "{{").replace("}", "}}")
                                                            + '{{"prompt'}))
case("train-data-binary", TRAIN, "d.jsonl", files(**{"d.jsonl": b"\xff\xfe"}))
case("train-dpo-data-in-sft-format", ["train", "dpo", *TRAIN[2:]], "d.jsonl:1", data)
case("train-negative-lora-r", [*TRAIN, "--lora-r", "-1"], "lora_r", data)
case("train-nan-epochs", [*TRAIN, "--epochs", "nan"], "epochs", data)
case("train-negative-learning-rate", [*TRAIN, "--learning-rate", "-1"], "learning_rate", data)
case("train-negative-warmup", [*TRAIN, "--warmup", "-1"], "warmup", data)
case("train-unknown-scheduler", [*TRAIN, "--scheduler", "bogus"], "scheduler", data)
case("train-negative-seed", [*TRAIN, "--seed", "-1"], "seed", data)
case("train-base-missing", [*TRAIN[:2], "--base", "{t}/nope", *TRAIN[4:]], "{t}/nope", data)
case("train-resume-damaged-checkpoint", [*TRAIN, "--resume"], "trainer_state.json",
     lambda t, fx: (data(t, fx), files(**{"out/checkpoints/checkpoint-1/trainer_state.json": "{{bad"})(t, fx)))
case("train-output-exists", TRAIN, "{t}/out", lambda t, fx: (data(t, fx), existing("out")(t, fx)))
case("train-unwritable-output", [*TRAIN[:6], "--out", UNWRITABLE, *TRAIN[8:]], "{t}/afile", data)
case("data-zero-n", ["data", "sft", "{t}/d.jsonl", "--task", "reverse", "--n", "0"], "--n")
case("data-unknown-task", ["data", "sft", "{t}/d.jsonl", "--task", "nope", "--n", "2"], "nope")
case("data-difficulty-out-of-range", ["data", "dpo", "{t}/d.jsonl", "--task", "reverse", "--n", "2",
                                      "--difficulty", "99"], "difficulty")
case("data-output-exists", ["data", "sft", "{t}/d.jsonl", "--task", "reverse", "--n", "2"], "d.jsonl",
     existing("d.jsonl"))
case("data-output-is-a-folder", ["data", "sft", "{t}/out", "--task", "reverse", "--n", "2", "--force"], "{t}/out",
     existing("out"))
case("data-unwritable-output", ["data", "sft", UNWRITABLE, "--task", "reverse", "--n", "2"], "{t}/afile")
case("data-rejected-from-missing", ["data", "dpo", "{t}/d.jsonl", "--task", "reverse", "--n", "2",
                                    "--rejected-from", "{t}/nope"], "{t}/nope")
GRPO = ["grpo", "--model", "{model}", "--out", "{t}/out", "--steps", "1"]
case("grpo-zero-steps", [*GRPO, "--steps", "0"], "--steps")
case("grpo-nan-temperature", [*GRPO, "--temperature", "nan"], "--temperature")
case("grpo-top-p-above-one", [*GRPO, "--top-p", "1.5"], "--top-p")
case("grpo-unknown-task", [*GRPO, "--tasks", "nope"], "nope")
case("grpo-one-generation", [*GRPO, "--num-generations", "1"], "num_generations")
case("grpo-model-missing", ["grpo", "--model", "{t}/nope", *GRPO[3:]], "{t}/nope")
case("grpo-init-adapter-missing", [*GRPO, "--init-adapter", "{t}/nope"], "{t}/nope")
case("grpo-output-is-a-file", ["grpo", "--model", "{model}", "--out", "{t}/f", "--steps", "1"], "{t}/f",
     files(f="old"))
case("train-grpo-negative-beta", ["train", *GRPO, "--beta", "-1"], "--beta")

# ---- adapters -------------------------------------------------------------------------------------
case("adapter-merge-base-missing", ["adapter", "merge", "{t}/nope", "{adapter}", "{t}/out"], "{t}/nope")
case("adapter-merge-adapter-missing", ["adapter", "merge", "{model}", "{t}/nope", "{t}/out"], "{t}/nope")
case("adapter-merge-adapter-is-a-file", ["adapter", "merge", "{model}", "{model}/config.json", "{t}/out"],
     "config.json")
case("adapter-merge-adapter-config-empty", ["adapter", "merge", "{model}", "{bad}", "{t}/out"], "adapter_config.json",
     bad_adapter(lambda f: (f / "adapter_config.json").write_text("")))
case("adapter-merge-adapter-wrong-shape", ["adapter", "merge", "{model}", "{bad}", "{t}/out"], "q_proj",
     bad_adapter(lambda f: edit_tensor(f / "adapter_model.safetensors",
                                       "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                                       lambda x: torch.ones(x.shape[0], 7))))
case("adapter-merge-unknown-dtype", ["adapter", "merge", "{model}", "{adapter}", "{t}/out", "--dtype", "fp5"], "fp5")
case("adapter-merge-output-exists", ["adapter", "merge", "{model}", "{adapter}", "{t}/out"], "{t}/out",
     existing("out"))
case("adapter-merge-unwritable-output", ["adapter", "merge", "{model}", "{adapter}", UNWRITABLE], "{t}/afile")
case("adapter-extract-zero-rank", ["adapter", "extract", "{model}", "{model}", "{t}/out", "--rank", "0"], "--rank")
case("adapter-extract-finetuned-truncated", ["adapter", "extract", "{model}", "{bad}", "{t}/out", "--rank", "2"], ST,
     bad_model(truncate(ST, 1000)))
case("adapter-combine-bad-weights", ["adapter", "combine", "{t}/out", "{adapter}", "{adapter2}", "--method", "linear",
                                     "--weights", "1,nan"], "--weights")
case("adapter-combine-density-above-one", ["adapter", "combine", "{t}/out", "{adapter}", "{adapter2}", "--method",
                                           "ties", "--density", "2"], "--density")
case("adapter-combine-zero-rank", ["adapter", "combine", "{t}/out", "{adapter}", "{adapter2}", "--method", "svd",
                                   "--rank", "0"], "--rank")
case("adapter-combine-adapter-missing", ["adapter", "combine", "{t}/out", "{adapter}", "{t}/nope"], "{t}/nope")
case("adapter-combine-output-exists", ["adapter", "combine", "{t}/out", "{adapter}", "{adapter2}"], "{t}/out",
     existing("out"))

# ---- merge ----------------------------------------------------------------------------------------
MERGE = ("merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 0.5}}\n"
         "  - model: {other}\n    parameters: {{weight: 0.5}}\ndtype: float32\n")
MERGE_ARGS = ["merge", "{t}/c.yaml", "{t}/out"]
case("merge-config-missing", ["merge", "{t}/nope.yaml", "{t}/out"], "nope.yaml")
case("merge-config-folder", ["merge", "{t}/conf", "{t}/out"], "{t}/conf", files(**{"conf/x": ""}))
case("merge-config-empty", MERGE_ARGS, "c.yaml", files(**{"c.yaml": ""}))
case("merge-config-corrupt", MERGE_ARGS, "c.yaml", files(**{"c.yaml": "merge_method: [linear\n"}))
case("merge-unknown-key", MERGE_ARGS, "bogus", files(**{"c.yaml": MERGE + "bogus: 1\n"}))
case("merge-wrong-type", MERGE_ARGS, "models[0].parameters.weight",
     files(**{"c.yaml": MERGE.replace("weight: 0.5", "weight: heavy", 1)}))
case("merge-nan-weight", MERGE_ARGS, "weight", files(**{"c.yaml": MERGE.replace("0.5", ".nan", 1)}))
case("merge-model-listed-twice", MERGE_ARGS, "models[1].model", files(**{"c.yaml": MERGE.replace("{other}", "{model}")}))
case("merge-unknown-method", MERGE_ARGS, "bogus", files(**{"c.yaml": MERGE.replace("linear", "bogus")}))
case("merge-model-missing", MERGE_ARGS, "{t}/nope", files(**{"c.yaml": MERGE.replace("{other}", "{t}/nope")}))
case("merge-unknown-dtype", MERGE_ARGS, "float7", files(**{"c.yaml": MERGE.replace("float32", "float7")}))
case("merge-zero-shard-size", [*MERGE_ARGS, "--max-shard-size", "0"], "--max-shard-size", files(**{"c.yaml": MERGE}))
case("merge-output-exists", MERGE_ARGS, "{t}/out", lambda t, fx: (files(**{"c.yaml": MERGE})(t, fx),
                                                                  existing("out")(t, fx)))
case("merge-unwritable-output", ["merge", "{t}/c.yaml", UNWRITABLE], "{t}/afile", files(**{"c.yaml": MERGE}))

# ---- quantize, export, bench ----------------------------------------------------------------------
case("quantize-model-missing", ["quantize", "{t}/nope", "{t}/out"], "{t}/nope")
case("quantize-model-truncated", ["quantize", "{bad}", "{t}/out"], ST, bad_model(truncate(ST, 1000), "model64"))
case("quantize-bad-group-size", ["quantize", "{model64}", "{t}/out", "--group-size", "7"], "--group-size")
case("quantize-unknown-method", ["quantize", "{model64}", "{t}/out", "--method", "bogus"], "bogus")
case("quantize-output-exists", ["quantize", "{model64}", "{t}/out"], "{t}/out", existing("out"))
case("quantize-unwritable-output", ["quantize", "{model64}", UNWRITABLE], "{t}/afile")
case("gguf-unknown-type", ["export", "gguf", "{model64}", "{t}/m.gguf", "--type", "q3"], "q3")
case("gguf-output-exists", ["export", "gguf", "{model64}", "{t}/m.gguf", "--type", "f16"], "m.gguf",
     existing("m.gguf"))
case("gguf-output-is-a-folder", ["export", "gguf", "{model64}", "{t}/out", "--type", "f16", "--force"], "{t}/out",
     existing("out"))
case("gguf-unwritable-output", ["export", "gguf", "{model64}", UNWRITABLE, "--type", "f16"], "{t}/afile")
BENCH = ["bench", "{model64}", "--no-record"]
case("bench-bad-ctx", [*BENCH, "--ctx", "abc"], "--ctx")
case("bench-zero-runs", [*BENCH, "--runs", "0"], "--runs")
case("bench-zero-threads", [*BENCH, "--threads", "0"], "--threads")
case("bench-unknown-dtype", [*BENCH, "--dtype", "fp3"], "fp3")
case("bench-unknown-kernel", [*BENCH, "--kernel", "bogus"], "--kernel")
case("bench-model-missing", ["bench", "{t}/nope", "--no-record"], "{t}/nope")

# ---- serve, swarm ---------------------------------------------------------------------------------
case("serve-model-missing", ["serve", "{t}/nope"], "{t}/nope")
case("serve-negative-port", ["serve", "{model}", "--port", "-1"], "--port")
case("serve-zero-max-batch", ["serve", "{model}", "--max-batch", "0"], "--max-batch")
case("serve-adapter-missing", ["serve", "{model}", "--adapter", "a={t}/nope"], "{t}/nope")
case("swarm-negative-port", ["swarm", "bootstrap", "--model", "{model}", "--out", "{t}/out", "--port", "-1"], "--port")
case("swarm-negative-local", ["swarm", "join", "--peers", "/ip4/127.0.0.1/tcp/1", "--model", "{model}", "--out",
                              "{t}/out", "--local", "-1"], "--local")
case("swarm-peers-garbage", ["swarm", "join", "--peers", "garbage", "--model", "{model}", "--out", "{t}/out"],
     "garbage")
case("swarm-peers-without-id", ["swarm", "join", "--peers", "/ip4/127.0.0.1/tcp/1", "--model", "{model}", "--out",
                                "{t}/out"], "/p2p/PEER_ID")
case("swarm-announce-not-an-ip", ["swarm", "bootstrap", "--model", "{model}", "--out", "{t}/out", "--announce",
                                  "not-an-ip"], "--announce")
case("swarm-host-out-of-range", ["swarm", "bootstrap", "--model", "{model}", "--out", "{t}/out", "--host",
                                 "999.1.1.1"], "--host")
case("swarm-model-missing", ["swarm", "bootstrap", "--model", "{t}/nope", "--out", "{t}/out", "--port", "0"],
     "{t}/nope")

# ---- ls, compare, card, merge-search --------------------------------------------------------------
case("ls-missing", ["ls", "{t}/nope"], "{t}/nope")
case("ls-config-truncated", ["ls", "{bad}"], "config.json", bad_model(truncate("config.json", 40)))
case("ls-weights-corrupt", ["ls", "{bad}"], ST, bad_model(MODEL_CORRUPTIONS["weights-corrupt-header"][0]))
case("compare-missing", ["compare", "{t}/nope", "--out", "{t}/out"], "{t}/nope")
case("compare-output-is-a-file", ["compare", "{model}", "--out", "{t}/f"], "{t}/f", files(f="old"))
case("compare-unwritable-output", ["compare", "{model}", "--out", UNWRITABLE], "{t}/afile")
case("compare-run-variants-corrupt", ["compare", "{t}/run", "--out", "{t}/out"], "variants.json",
     files(**{"run/variants.json": "{{"}))
case("card-missing", ["card", "{t}/nope", "--print"], "{t}/nope")
case("card-config-truncated", ["card", "{bad}", "--print"], "config.json", bad_model(truncate("config.json", 40)))
case("card-unwritable-output", ["card", "{model}", "--out", UNWRITABLE + "/README.md"], "{t}/afile")
SEARCH = ("merge:\n  merge_method: linear\n  models:\n    - model: {model}\n      parameters: {{weight: 0.5}}\n"
          "    - model: {other}\n      parameters: {{weight: 0.5}}\n"
          "search:\n  - {{path: 'models[0].parameters.weight', low: 0, high: 1}}\n"
          "objective: {{tasks: [reverse], n: 2}}\n")
SEARCH_ARGS = ["merge-search", "{t}/s.yaml", "--out", "{t}/out", "--trials", "1"]
case("merge-search-config-missing", ["merge-search", "{t}/nope.yaml", "--out", "{t}/out"], "nope.yaml")
case("merge-search-config-folder", ["merge-search", "{t}/conf", "--out", "{t}/out"], "{t}/conf",
     files(**{"conf/x": ""}))
case("merge-search-config-corrupt", SEARCH_ARGS, "s.yaml", files(**{"s.yaml": "merge: {{"}))
case("merge-search-unknown-key", SEARCH_ARGS, "bogus", files(**{"s.yaml": SEARCH + "bogus: 1\n"}))
case("merge-search-wrong-type", SEARCH_ARGS, "objective.n", files(**{"s.yaml": SEARCH.replace("n: 2", "n: two")}))
case("merge-search-zero-trials", [*SEARCH_ARGS[:-1], "0"], "--trials", files(**{"s.yaml": SEARCH}))
case("merge-search-unknown-task", [*SEARCH_ARGS, "--tasks", "nope"], "nope", files(**{"s.yaml": SEARCH}))
case("merge-search-bad-merge", SEARCH_ARGS, "bogus", files(**{"s.yaml": SEARCH.replace("linear", "bogus")}))
case("merge-search-negative-step", SEARCH_ARGS, "search[0].step",
     files(**{"s.yaml": SEARCH.replace("high: 1}}", "high: 1, step: -1}}")}))
case("merge-search-bad-storage", [*SEARCH_ARGS, "--storage", "nosuchdb://x"], "--storage", files(**{"s.yaml": SEARCH}))
case("merge-search-write-best-exists", [*SEARCH_ARGS, "--write-best", "{t}/best"], "{t}/best",
     lambda t, fx: (files(**{"s.yaml": SEARCH})(t, fx), existing("best")(t, fx)))


# ---- fixtures and the check -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def fx(tiny_model_dir, tmp_path_factory) -> dict:
    """Shared, valid inputs: two tiny models of one shape, one whose width quantizes, two adapters."""
    from qwenlab.adapters import LoraAdapter, write_adapter
    from qwenlab.checkpoint import open_checkpoint

    root = tmp_path_factory.mktemp("bad-inputs")
    build_hf_model(root / "other", seed=1)
    build_hf_model(root / "model64", vocab_size=300, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2)
    config = open_checkpoint(tiny_model_dir).config
    for name, seed in (("adapter", 0), ("adapter2", 1)):
        generator = torch.Generator().manual_seed(seed)
        modules = {f"model.layers.{i}.self_attn.q_proj": (torch.randn(2, config.hidden_size, generator=generator),
                                                          torch.randn(config.hidden_size, 2, generator=generator))
                   for i in range(config.num_hidden_layers)}
        write_adapter(LoraAdapter(modules=modules, alpha=4), root / name, tokenizer_from=tiny_model_dir)
    return {"model": str(tiny_model_dir), "other": str(root / "other"), "model64": str(root / "model64"),
            "adapter": str(root / "adapter"), "adapter2": str(root / "adapter2")}


def snapshot(*roots: Path) -> dict[str, tuple[bool, int]]:
    """Every path under the roots, with (is a folder, size): anything written or removed shows."""
    seen = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            seen[str(path)] = (path.is_dir(), 0 if path.is_dir() else path.stat().st_size)
    return seen


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_cleanly(bad: Case, fx, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QWENLAB_HOME", str(tmp_path / "home"))  # measurements, kernels: never the user's
    folder = tmp_path / "case"
    write(folder / "afile", "a regular file")
    values = {**fx, "t": str(folder)}
    made = bad.setup(folder, values) if bad.setup else None
    values["bad"] = str(made)
    argv = [arg.format(**values) for arg in bad.argv]
    culprit = bad.culprit.format(**values)
    shared = [Path(p) for p in fx.values()]
    before = snapshot(folder, *shared)
    capsys.readouterr()

    try:
        code = main(argv)
    except SystemExit as e:  # argparse's refusal of a flag
        code = e.code
    out, err = capsys.readouterr()

    assert code == 2, f"exit {code}\nstdout: {out[-500:]}\nstderr: {err[-2000:]}"
    assert "Traceback" not in out + err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and err.rstrip("\n").endswith(errors[0]), err  # one line, the last one
    assert culprit in errors[0], f"{culprit!r} not named in: {errors[0]}"
    assert snapshot(folder, *shared) == before, "the command wrote or removed files"
