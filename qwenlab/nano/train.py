"""Train nano: a tiny Qwen2-architecture chat model on a mix of the verifiable tasks.

    python -m qwenlab.nano.train [--out qwenlab/nano/weights] [--steps 3000] [--threads 2]

Deterministic for a given thread count: every random choice comes from seeded generators.
The shipped weights are `--steps 3000 --threads 2`: 1234 s (0.41 s/step) alone on a 2-core machine.
At 1200 steps (the first shipped nano) the loss was still falling and arithmetic stayed near
chance (0.08 at difficulty 1 against 0.41 now), which left GRPO no reward signal to work with.
Reads top to bottom: corpus -> tokenizer -> model -> training loop -> save -> quick eval.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qwenlab.checkpoint import CheckpointWriter
from qwenlab.model import Qwen2Config, Qwen2ForCausalLM
from qwenlab.nano import WEIGHTS_DIR
from qwenlab.nano.tokenizer_build import train_qwen_style_bpe, write_tokenizer_folder
from qwenlab.model.tokenizer import Tokenizer
from qwenlab.tasks import TASKS, generate as generate_task

# Seeds at or above this value are training data; evaluation uses seeds below it.
TRAIN_SEED_OFFSET = 10_000_000
# Training difficulties per task (the default difficulty and one harder level stay partly unsolved).
TRAIN_DIFFICULTIES = {"arithmetic": (1, 2, 3), "reverse": (1, 2, 3), "sort_letters": (1, 2, 3),
                      "count_letter": (1, 2, 3)}


def nano_config(vocab_size: int) -> Qwen2Config:
    # Dims are multiples of 32 so GGUF Q8_0/Q4_0 blocks fit; GQA 4/2 and a tied head, like Qwen2.5.
    return Qwen2Config(vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, torch_dtype="bfloat16")


def chat_example(task: str, seed: int, difficulty: int) -> tuple[list[dict], str]:
    instance = generate_task(task, seed, difficulty)
    return [{"role": "user", "content": instance.prompt}], instance.expected


def build_examples(n: int, seed: int) -> list[tuple[list[dict], str]]:
    rng = random.Random(seed)
    names = [t for t in TASKS if t in TRAIN_DIFFICULTIES] or list(TASKS)
    out = []
    for i in range(n):
        task = names[i % len(names)]
        difficulty = rng.choice(TRAIN_DIFFICULTIES.get(task, (1, 2)))
        out.append(chat_example(task, TRAIN_SEED_OFFSET + i, difficulty))
    rng.shuffle(out)
    return out


def encode_examples(tokenizer: Tokenizer, examples) -> list[tuple[list[int], int]]:
    """(ids, answer_start): loss is taken on the answer and its <|im_end|> only."""
    encoded = []
    for messages, answer in examples:
        prompt = tokenizer.encode(tokenizer.apply_chat_template(messages))
        answer_ids = tokenizer.encode(answer + "<|im_end|>")
        encoded.append((prompt + answer_ids, len(prompt)))
    return encoded


def make_batch(batch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(ids) for ids, _ in batch)
    tokens = torch.full((len(batch), length), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), length), -100, dtype=torch.long)
    for row, (ids, answer_start) in enumerate(batch):
        tokens[row, :len(ids)] = torch.tensor(ids)
        # target at position p is token p+1; only answer tokens count
        targets[row, answer_start - 1:len(ids) - 1] = torch.tensor(ids[answer_start:])
    return tokens, targets


def init_weights(model: Qwen2ForCausalLM, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
        else:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, vocab_size: int, threads: int,
          log_every: int = 100) -> dict:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    started = time.time()
    examples = build_examples(steps * batch_size, seed)
    tmp_tok = out.parent / f".{out.name}.tokenizer-tmp"
    tok = train_qwen_style_bpe(_corpus_for_tokenizer(examples[:20000]), vocab_size - 3)
    write_tokenizer_folder(tok, tmp_tok, model_max_length=512)
    tokenizer = Tokenizer(tmp_tok)
    encoded = encode_examples(tokenizer, examples)
    config = nano_config(tokenizer.vocab_size)
    model = Qwen2ForCausalLM(config)
    init_weights(model, seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.98), eps=1e-8)
    history = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup=max(1, steps // 20))
        tokens, targets = make_batch(encoded[step * batch_size:(step + 1) * batch_size], tokenizer.pad_id)
        logits = model(tokens)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % log_every == 0 or step == steps - 1:
            history.append({"step": step, "loss": round(loss.item(), 4), "elapsed_s": round(time.time() - started, 1)})
            print(f"step {step:5d}/{steps}  loss {loss.item():.4f}  {time.time() - started:6.0f}s", flush=True)
    train_seconds = time.time() - started
    model.eval()
    save(model, config, tmp_tok, out, {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                                       "threads": threads, "examples": len(examples),
                                       "train_seconds": round(train_seconds, 1), "loss_history": history})
    return {"train_seconds": train_seconds, "final_loss": history[-1]["loss"]}


def _corpus_for_tokenizer(examples) -> list[str]:
    """The rendered chats themselves, so the template's words become single tokens."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        Path(__file__).with_name("chat_template.jinja").read_text())
    return [template.render(messages=m + [{"role": "assistant", "content": a}], add_generation_prompt=False)
            for m, a in examples]


def save(model: Qwen2ForCausalLM, config: Qwen2Config, tokenizer_dir: Path, out: Path, training: dict) -> None:
    import shutil

    tokenizer = Tokenizer(tokenizer_dir)
    eos = [tokenizer.token_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
    config = config.replace(bos_token_id=eos[1], eos_token_id=eos[0])
    generation = {"bos_token_id": eos[1], "eos_token_id": eos, "pad_token_id": eos[1], "do_sample": False}
    with CheckpointWriter(out, config.to_hf_dict(), generation_config=generation, force=True) as writer:
        for name, tensor in model.state_dict().items():
            writer.add(name, tensor.to(torch.bfloat16))
        for file in tokenizer_dir.iterdir():
            shutil.copy2(file, writer.path_in_output(file.name))
        (writer.path_in_output("training.json")).write_text(json.dumps(training, indent=2) + "\n")
    shutil.rmtree(tokenizer_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    result = train(args.out, args.steps, args.batch_size, args.lr, args.seed, args.vocab_size, args.threads)
    print(f"trained in {result['train_seconds']:.0f}s, final loss {result['final_loss']:.4f} -> {args.out}")


if __name__ == "__main__":
    main()
