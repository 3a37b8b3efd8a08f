"""LoRA SFT speed and memory on the CPU: tokens/s and peak RSS of `qwenlab train sft` (engine trl: TRL + PEFT;
engine native: qwenlab's own loop), beside a plain PEFT + transformers loop (fp32 and bf16 autocast) on the same
records, LoRA and batch: issue 23's anchor. Also each dtype's compute bound on this machine.

    python benchmarks/lora_bench.py [--models nano,qwen2.5-0.5b] [--steps 6] [--batch-size 8] [--threads 2]
                                    [--engines qwenlab:fp32,native:fp32,native:bf16,peft:fp32,peft:bf16]

Each model trains in its own subprocess (so peak RSS is that run's alone) on chat prompt/completion
data from the arithmetic task, LoRA r 16 / alpha 32 on all linears, logging every step. LoRA dropout is 0 on
every engine, as in the PEFT loop (PEFT's default); --lora-dropout sets it for the qwenlab engines.
tokens/s counts non-padding input tokens over the steps after the first (warm-up excluded).
The compute bound: a LoRA step needs, per token, the forward (2 FLOP per weight of every linear and the head)
and the backward's input gradients (2 more): 4 x those weights, the issue's count. A dtype's bound in tokens/s is
the machine's matmul rate in that dtype (a [512 x 896] @ [896 x 4864] product, timed in the same run) over that.
A preset name (qwen2.5-0.5b) is a random-weight model of that exact shape, written once with
`qwenlab random` into --work-dir: the same cost per token as the real model.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(model: str, work: Path, steps: int, batch_size: int, threads: int, engine: str = "trl",
          dtype: str = "fp32", dropout: float = 0.0, recompute: bool = False, kind: str = "sft") -> dict:
    """Runs in the subprocess: one short SFT (or DPO) run; prints a JSON line of figures."""
    from qwenlab.adapters import read_adapter
    from qwenlab.checkpoint import open_checkpoint
    from qwenlab.train import TrainConfig, train_dpo, train_sft
    from qwenlab.train.data import dpo_records_from_task, sft_records_from_task, write_jsonl

    make_records = dpo_records_from_task if kind == "dpo" else sft_records_from_task
    records = make_records("arithmetic", steps * batch_size, seed=7)
    data = write_jsonl(records, work / f"{Path(model).name}-{kind}.jsonl", force=True)
    config = TrainConfig(base=model, data=str(data), out=str(work / f"{Path(model).name}-lora"), steps=steps,
                         batch_size=batch_size, logging_steps=1, save_steps=0, save_total_limit=1, val_fraction=0.0,
                         threads=threads, progress=False, force=True, engine=engine, dtype=dtype,
                         lora_dropout=dropout, gradient_checkpointing=recompute)
    started = time.time()
    result = (train_dpo if kind == "dpo" else train_sft)(config)
    wall = time.time() - started
    logs = [e for e in result.log_history if "loss" in e and "train_runtime" in e]
    if len(logs) < 2:
        sys.exit(f"expected a log with loss and train_runtime at every step, got {result.log_history[:3]}")
    first, last = logs[0], logs[-1]
    steady_tokens = last["num_input_tokens_seen"] - first["num_input_tokens_seen"]
    steady_seconds = last["train_runtime"] - first["train_runtime"]
    adapter = read_adapter(config.out)
    return {
        "model": model,
        "params_m": round(open_checkpoint(model).config.parameter_count() / 1e6, 1),
        "lora_params_m": round(sum(a.numel() + b.numel() for a, b in adapter.modules.values()) / 1e6, 2),
        "steps": result.steps,
        "tokens_per_step": round(last["num_input_tokens_seen"] / result.steps),
        "tokens_per_s": round(steady_tokens / steady_seconds, 1),
        "s_per_step": round(steady_seconds / (len(logs) - 1), 2),
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "first_loss": round(first["loss"], 4), "last_loss": round(last["loss"], 4),
    }


def matmul_rate(threads: int) -> dict:
    """GFLOP/s of torch matmuls in fp32 and bf16 on an MLP-sized product, best of several runs."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, w = torch.randn(512, 896, dtype=dtype), torch.randn(4864, 896, dtype=dtype)
        for _ in range(3):
            x @ w.t()
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(10):
                x @ w.t()
            best = min(best, (time.perf_counter() - started) / 10)
        out[name] = round(2 * 512 * 896 * 4864 / best / 1e9, 1)
    return out


def step_flops_per_token(model: str) -> float:
    """4 x the weights of every linear and the head (forward + input gradients), plus attention's 2 x 2 x T x h
    per layer and token, at T = 80, about the data's length."""
    from qwenlab.checkpoint import open_checkpoint

    c = open_checkpoint(model).config
    h, i, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    linear = layers * (h * h * 2 + h * kv * 2 + 3 * h * i) + c.vocab_size * h
    return 4 * linear + layers * 2 * 2 * 2 * 80 * h


def peft_loop(model: str, work: Path, steps: int, batch_size: int, threads: int, dtype: str) -> dict:
    """The anchor: the loop a user writes with PEFT + transformers, on the same records, LoRA and batch as
    `qwenlab train sft`: chat-templated prompt + completion, loss on the completion tokens, AdamW at 2e-4,
    fp32 (or bf16 autocast), no gradient checkpointing."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwenlab.checkpoint import open_checkpoint
    from qwenlab.train.data import sft_records_from_task

    model = str(open_checkpoint(model).path)  # 'nano' or a folder
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(base, lora)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-4)
    records = sft_records_from_task("arithmetic", steps * batch_size, seed=7)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    times, tokens, loss_curve = [], [], []
    for step in range(steps):
        rows, labels = [], []
        for record in records[step * batch_size:(step + 1) * batch_size]:
            prompt = tokenizer.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(record["prompt"] + record["completion"], tokenize=False)
            p_ids, ids = tokenizer(prompt)["input_ids"], tokenizer(full)["input_ids"]
            rows.append(ids)
            labels.append([-100] * len(p_ids) + ids[len(p_ids):])
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        label_ids = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = peft_model(input_ids=input_ids, attention_mask=attention, labels=label_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
        tokens.append(int(attention.sum()))
        loss_curve.append(float(loss.detach()))
    steady = slice(1, None)  # the first step (allocator, oneDNN's first calls) is warm-up
    return {
        "model": model,
        "params_m": round(sum(p.numel() for p in base.parameters()) / 1e6, 1),
        "lora_params_m": round(sum(p.numel() for p in peft_model.parameters() if p.requires_grad) / 1e6, 2),
        "steps": steps,
        "tokens_per_step": round(sum(tokens) / steps),
        "tokens_per_s": round(sum(tokens[steady]) / sum(times[steady]), 1),
        "s_per_step": round(sum(times[steady]) / (steps - 1), 2),
        "wall_s": round(sum(times), 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "first_loss": round(loss_curve[0], 4), "last_loss": round(loss_curve[-1], 4),
    }


def model_folder(name: str, work: Path, tokenizer_from: str) -> str:
    """A folder for `name`: itself, or a random-weight model of a preset's shape with a real tokenizer."""
    from qwenlab.checkpoint import copy_tokenizer_files, resolve_model_path
    from qwenlab.checkpoint.config import PRESETS

    if name.lower() not in PRESETS:
        return name
    folder = work / name
    if not (folder / "config.json").is_file():
        done = subprocess.run([sys.executable, "-m", "qwenlab", "random", name, str(folder)], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"qwenlab random {name}: {done.stderr.strip()}")
    if not (folder / "tokenizer.json").is_file():
        copy_tokenizer_files(resolve_model_path(tokenizer_from), folder)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="nano,qwen2.5-0.5b")
    parser.add_argument("--kind", choices=("sft", "dpo"), default="sft",
                        help="dpo: `qwenlab train dpo` on preference pairs; the anchor is then the TRL engine "
                             "(qwenlab:fp32|bf16), as there is no PEFT DPO loop here")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "qwenlab-lora-bench")
    parser.add_argument("--tokenizer-from", default="nano", help="tokenizer for random-weight preset models")
    parser.add_argument("--engines", default="qwenlab:fp32,native:fp32,native:bf16,peft:fp32,peft:bf16",
                        help="comma list of qwenlab:fp32|bf16 (`qwenlab train sft`, TRL), native:fp32|bf16 "
                             "(`--engine native`) and peft:fp32|bf16 (a PEFT + transformers loop; bf16: autocast)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout of the qwenlab engines "
                        "(the PEFT loop's is 0)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="the qwenlab engines recompute activations in the backward (less memory)")
    parser.add_argument("--engine", default="qwenlab:fp32", help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.child:
        engine, dtype = args.engine.split(":")
        if engine == "matmul":
            figures = matmul_rate(args.threads)
        elif engine in ("qwenlab", "native"):
            figures = child(args.child, args.work_dir, args.steps, args.batch_size, args.threads,
                            "native" if engine == "native" else "trl", dtype, args.lora_dropout,
                            args.gradient_checkpointing, args.kind)
        else:
            figures = peft_loop(args.child, args.work_dir, args.steps, args.batch_size, args.threads, dtype)
        print("RESULT " + json.dumps(figures))
        return
    rows = []
    rate = _run_child(["--child", "-", "--threads", str(args.threads), "--engine", "matmul:fp32"], "matmul rate")
    for name in args.models.split(","):
        folder = model_folder(name.strip(), args.work_dir, args.tokenizer_from)
        for engine in args.engines.split(","):
            command = [sys.executable, __file__, "--child", folder, "--steps", str(args.steps), "--batch-size",
                       str(args.batch_size), "--threads", str(args.threads), "--work-dir", str(args.work_dir),
                       "--engine", engine, "--lora-dropout", str(args.lora_dropout), "--kind", args.kind,
                       *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])]
            figures = _run_child(command[2:], f"{name} / {engine}")
            # DPO also runs the reference forward: 2 more FLOP per weight and token
            flops = step_flops_per_token(folder) * (1.5 if args.kind == "dpo" else 1.0)
            dtype = engine.split(":")[1]
            bound = rate[dtype] * 1e9 / flops
            rows.append({**figures, "model": name, "engine": engine, "bound": bound,
                         "share": figures["tokens_per_s"] / bound})
            print(f"{name} / {engine}: done", file=sys.stderr)
    print(f"LoRA {args.kind.upper()} (TRL {_version('trl')}, PEFT {_version('peft')}, torch {_version('torch')}), r 16 on all "
          f"linears, batch {args.batch_size}, {args.threads} threads, LoRA dropout {args.lora_dropout:g} "
          f"(PEFT loop: 0){', qwenlab engines with gradient checkpointing' if args.gradient_checkpointing else ''}\n")
    print(f"matmul rate on this machine: fp32 {rate['fp32']} GFLOP/s, bf16 {rate['bf16']} GFLOP/s\n")
    anchor_engine = "qwenlab:" if args.kind == "dpo" else "peft:"
    print(f"| model | engine | tokens/step | tokens/s | vs {'TRL engine' if args.kind == 'dpo' else 'PEFT loop'} "
          "(same dtype) | s/step | compute bound (tok/s) | "
          "share of bound | peak RSS (MiB) | loss step 1 -> last |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        anchor = next((a for a in rows if a["model"] == r["model"]
                       and a["engine"] == anchor_engine + r["engine"].split(":")[1]), None)
        versus = f"{r['tokens_per_s'] / anchor['tokens_per_s']:.2f}x" if anchor else "-"
        print(f"| {r['model']} | {ENGINES[r['engine']].replace('train sft', 'train ' + args.kind)} | {r['tokens_per_step']} | {r['tokens_per_s']} | {versus} | "
              f"{r['s_per_step']} | {r['bound']:.1f} | {100 * r['share']:.0f}% | {r['peak_rss_mib']} | "
              f"{r['first_loss']} -> {r['last_loss']} |")


def _run_child(arguments: list[str], what: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    if done.returncode or line is None:
        sys.exit(f"{what}: benchmark run failed:\n{done.stderr[-3000:]}")
    return json.loads(line[7:])


ENGINES = {"qwenlab:fp32": "qwenlab train sft (TRL + PEFT), fp32", "qwenlab:bf16": "qwenlab train sft (TRL + PEFT), bf16",
           "native:fp32": "qwenlab train sft --engine native, fp32",
           "native:bf16": "qwenlab train sft --engine native, bf16 base", "peft:fp32": "PEFT + transformers loop, fp32",
           "peft:bf16": "PEFT + transformers loop, bf16 autocast"}


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
