"""Replay: the base model's own greedy answers to other prompts, mixed into SFT data.

An adapter trained on one task alone drifts everywhere else (on nano, SFT on `repeat` took
`reverse` from 0.91 to 0.02). Training on a share of examples whose targets are what the base
already says keeps the adapter's output on other prompts where it was: a cheap self-distillation
that needs no outside data. The prompts come from the user's JSONL (`replay_prompts`) or from
the built-in tasks (`replay_tasks`), at task seeds used by neither evaluation nor training data.

`replay_answers: reference` rehearses instead: the answers are the data's own (the tasks' reference
answers, or the assistant turns of the JSONL), as when a fine-tune mixes the base's training or general
chat data back in. The base's mistakes are then not taught again, and two specialists that both rehearse
the same data pull the shared skills the same way, which keeps a merge of them from cancelling out.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from qwenlab.errors import QwenlabError

# Task seeds of replay prompts: above evaluation's (< 1,000,000) and training data's (20,000,000 +
# 1,000,000 per data seed) for any data seed below 2**30.
REPLAY_SEED_OFFSET = 2**50


def replay_count(train_size: int, share: float) -> int:
    """How many replay examples make `share` of the final set (train_size real examples + these)."""
    if not 0 <= share < 1:
        raise QwenlabError(f"replay must be a share from 0 to below 1, got {share!r}")
    return round(train_size * share / (1 - share))


ANSWERS = ("base", "reference")  # whose answers replay trains on: the base's greedy ones, or the data's own


def task_instances(tasks: list[str], n: int, seed: int = 0) -> list:
    """n task instances, round-robin over `tasks`, each task's difficulty cycling from 1 to its default
    (the base's behaviour is kept across the range users evaluate at)."""
    from qwenlab.tasks import generate
    from qwenlab.tasks.registry import DEFAULT_DIFFICULTY

    if not tasks:
        raise QwenlabError("replay: no tasks to draw prompts from (replay_tasks is empty)")
    instances = []
    for i in range(n):
        task, round_ = tasks[i % len(tasks)], i // len(tasks)
        difficulty = 1 + round_ % max(1, DEFAULT_DIFFICULTY.get(task) or 1)
        instances.append(generate(task, REPLAY_SEED_OFFSET + seed * 1_000_000 + round_, difficulty))
    return instances


def task_prompts(tasks: list[str], n: int, seed: int = 0) -> list[list[dict]]:
    """The chat prompts of task_instances."""
    return [[{"role": "user", "content": instance.prompt}] for instance in task_instances(tasks, n, seed)]


def task_reference_records(tasks: list[str], n: int, seed: int = 0) -> list[dict]:
    """Rehearsal records: task_instances' prompts with each task's reference answer."""
    return [{"prompt": [{"role": "user", "content": instance.prompt}],
             "completion": [{"role": "assistant", "content": instance.expected}]}
            for instance in task_instances(tasks, n, seed)]


def file_prompts(path: str | Path, n: int, seed: int = 0) -> list[list[dict]]:
    """n chat prompts from a JSONL file: `messages` (up to the last user turn) or `prompt` (text or messages)."""
    from qwenlab.train.data import _read_records

    path = Path(path)
    if not path.is_file():
        raise QwenlabError(f"{path}: replay prompts file not found")
    prompts = []
    for where, _, record in _read_records(path):
        messages = record.get("messages") if isinstance(record, dict) else None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if isinstance(messages, list) and messages:
            last_user = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"),
                            default=None)
            if last_user is not None:
                prompts.append(messages[:last_user + 1])
                continue
        if isinstance(prompt, str) and prompt.strip():
            prompts.append([{"role": "user", "content": prompt}])
        elif isinstance(prompt, list) and prompt:
            prompts.append(prompt)
        else:
            raise QwenlabError(f"{where}: expected 'messages' with a user turn, or 'prompt', for replay prompts")
    if not prompts:
        raise QwenlabError(f"{path}: no prompts for replay")
    random.Random(seed).shuffle(prompts)
    return [prompts[i % len(prompts)] for i in range(n)]  # cycled when the file is shorter than n


def file_reference_records(path: str | Path, n: int, seed: int = 0) -> list[dict]:
    """Rehearsal records from a JSONL of chats: each record's last assistant turn is the answer, the turns
    before it the prompt (`messages`), or `prompt` and `completion` as given."""
    from qwenlab.train.data import _read_records

    path = Path(path)
    if not path.is_file():
        raise QwenlabError(f"{path}: replay prompts file not found")
    records = []
    for where, _, record in _read_records(path):
        if isinstance(record, dict) and isinstance(record.get("messages"), list):
            messages = record["messages"]
            last = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"
                        and isinstance(m.get("content"), str) and m["content"].strip()), default=None)
            if last and any(isinstance(m, dict) and m.get("role") == "user" for m in messages[:last]):
                records.append({"prompt": messages[:last], "completion": [messages[last]]})
                continue
        elif isinstance(record, dict) and isinstance(record.get("completion"), (str, list)) and record["completion"]:
            prompt, completion = record.get("prompt"), record["completion"]
            if isinstance(prompt, str) and prompt.strip():
                prompt = [{"role": "user", "content": prompt}]
            if isinstance(completion, str):
                completion = [{"role": "assistant", "content": completion}]
            if isinstance(prompt, list) and prompt:
                records.append({"prompt": prompt, "completion": completion})
                continue
        raise QwenlabError(f"{where}: replay_answers 'reference' needs an answer to rehearse: 'messages' with a "
                           "user turn and then an assistant turn, or 'prompt' and 'completion'")
    if not records:
        raise QwenlabError(f"{path}: no records for replay")
    random.Random(seed).shuffle(records)
    return [records[i % len(records)] for i in range(n)]  # cycled when the file is shorter than n


def replay_records(base: Path, prompts: list[list[dict]], *, max_new_tokens: int = 96, batch_size: int = 32,
                   progress: bool = True) -> list[dict]:
    """Chat prompt/completion records whose completion is the base's greedy answer."""
    from tqdm import tqdm

    from qwenlab.model import GenerationConfig, generate, load_model, load_tokenizer

    model, tokenizer = load_model(base), load_tokenizer(base)
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    records = []
    bar = tqdm(total=len(prompts), desc="replay: base answers", unit="prompt", disable=not progress,
               file=sys.stderr)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        for prompt, completion in zip(chunk, generate(model, tokenizer, chunk, config, chat=True)):
            if completion.text.strip():  # an empty answer teaches nothing but stopping
                records.append({"prompt": prompt, "completion": [{"role": "assistant", "content": completion.text}]})
        bar.update(len(chunk))
    bar.close()
    return records


def mix(train: list[dict], replay: list[dict], seed: int) -> list[dict]:
    """The training set with the replay examples spread through it (a fixed order per seed)."""
    mixed = train + replay
    random.Random(seed).shuffle(mixed)
    return mixed
