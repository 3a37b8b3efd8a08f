"""Training data: JSONL files checked line by line, and data sets built from verifiable tasks.

Formats (TRL's column names; one format per file), read from JSONL or a JSON array:
  SFT  {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}   (OpenAI)
       {"prompt": ..., "completion": ...}             strings (plain text) or message lists (chat)
       {"text": ...}                                  plain text, loss on every token
  DPO  {"prompt": ..., "chosen": ..., "rejected": ...} strings or message lists
       {"chosen": [...], "rejected": [...]}            implicit prompt: the messages both share
Read as is and turned into those: Alpaca {"instruction", "input", "output"} and ShareGPT
{"conversations": [{"from", "value"}]} for SFT; UltraFeedback-style {"prompt": "...", "chosen": [messages],
"rejected": [messages]} for DPO.
With message lists, TRL renders the base's chat template. The loss is on the completion only: for
`messages`, each assistant turn becomes one prompt/completion example (assistant_only_turns), so system
and user tokens are never trained, as TRL's assistant_only_loss would do (which Qwen2.5's template,
without {% generation %} markers, cannot).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from qwenlab.errors import QwenlabError

FORMATS = {"sft": (("messages",), ("prompt", "completion"), ("text",)), "dpo": (("prompt", "chosen", "rejected"),)}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "tool": "tool", "function_response": "tool"}
ROLES = ("system", "user", "assistant", "tool")
# Training instances use seeds from here up; evaluation draws seeds below EVAL_SEED_LIMIT (1,000,000)
# and nano's own training data starts at 10,000,000, so the three never share an instance.
DATA_SEED_OFFSET = 20_000_000
SEEDS_PER_DATA_SEED = 1_000_000


def _check_messages(value, where: str, name: str) -> None:
    if not isinstance(value, list) or not value:
        raise QwenlabError(f"{where}: '{name}' must be a non-empty list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise QwenlabError(f"{where}: {name}[{i}] must be an object with a string 'content'")
        if message.get("role") not in ROLES:
            raise QwenlabError(f"{where}: {name}[{i}] has role {message.get('role')!r}; "
                               f"expected one of {', '.join(ROLES)}")


def _check_text_or_messages(record: dict, keys: tuple[str, ...], where: str) -> bool:
    """All of `keys` are strings (returns False) or all message lists (returns True)."""
    conversational = isinstance(record[keys[0]], list)
    for key in keys:
        value = record[key]
        if conversational:
            _check_messages(value, where, key)
        elif not isinstance(value, str):
            raise QwenlabError(f"{where}: '{key}' must be a string or a list of messages, like '{keys[0]}'")
        if key != "prompt" and not value:
            raise QwenlabError(f"{where}: '{key}' is empty")
    return conversational


def _message_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def common_prefix(a: list, b: list) -> int:
    """How many leading items `a` and `b` share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def as_trl_record(record: dict, kind: str, where: str) -> dict:
    """A record in a common format other than TRL's, turned into TRL's; TRL-format records as they are."""
    if kind == "sft":
        if "chosen" in record and "rejected" in record:
            raise QwenlabError(f"{where}: preference data (chosen/rejected) given to SFT; train it with "
                               "`qwenlab train dpo`")
        if "instruction" in record and "output" in record and "messages" not in record:  # Alpaca
            if not all(isinstance(record.get(k, ""), str) for k in ("instruction", "input", "output")):
                raise QwenlabError(f"{where}: Alpaca fields 'instruction', 'input' and 'output' must be strings")
            user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
            return {"prompt": [{"role": "user", "content": user}],
                    "completion": [{"role": "assistant", "content": record["output"]}]}
        if "conversations" in record and "messages" not in record:  # ShareGPT
            turns = record["conversations"]
            if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
                raise QwenlabError(f"{where}: 'conversations' must be a list of {{'from', 'value'}} objects")
            messages = []
            for i, turn in enumerate(turns):
                role = SHAREGPT_ROLES.get(str(turn.get("from")).lower())
                if role is None or not isinstance(turn.get("value"), str):
                    raise QwenlabError(f"{where}: conversations[{i}] needs 'from' (one of "
                                       f"{', '.join(SHAREGPT_ROLES)}) and a string 'value'")
                messages.append({"role": role, "content": turn["value"]})
            return {"messages": messages}
        return record
    if "chosen" in record and "rejected" in record and _message_list(record["chosen"]) \
            and _message_list(record["rejected"]):
        chosen, rejected = record["chosen"], record["rejected"]
        if "prompt" not in record:  # implicit prompt: the messages both answers share
            shared = common_prefix(chosen, rejected)
            if shared == 0 or shared in (len(chosen), len(rejected)):
                raise QwenlabError(f"{where}: without 'prompt', 'chosen' and 'rejected' must share their first "
                                   "messages (the prompt) and differ after them")
            return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}
        if isinstance(record["prompt"], str):  # UltraFeedback: the prompt as text, the answers as chats
            prompt = [{"role": "user", "content": record["prompt"]}]
            strip = lambda answer: answer[1:] if answer[:1] == prompt else answer
            return {"prompt": prompt, "chosen": strip(chosen), "rejected": strip(rejected)}
    return record


def check_record(record, kind: str, where: str) -> tuple[str, bool]:
    """Return (format, conversational) of one record, or raise naming file:line."""
    if not isinstance(record, dict):
        raise QwenlabError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if kind == "sft" and "text" in record and not any(k in record for k in ("messages", "prompt")):
        if not isinstance(record["text"], str) or not record["text"]:
            raise QwenlabError(f"{where}: 'text' must be a non-empty string")
        return "text", False
    for keys in FORMATS[kind]:
        if all(k in record for k in keys):
            if keys == ("messages",):
                _check_messages(record["messages"], where, "messages")
                if not any(m["role"] == "assistant" for m in record["messages"]):
                    raise QwenlabError(f"{where}: 'messages' has no assistant message to learn from")
                return "messages", True
            return "/".join(keys), _check_text_or_messages(record, keys, where)
    expected = " or ".join("/".join(f"'{k}'" for k in keys) for keys in FORMATS[kind])
    raise QwenlabError(f"{where}: expected keys {expected} for {kind.upper()} data, got {sorted(record) or 'none'}")


def load_jsonl(path: str | Path, kind: str) -> tuple[list[dict], bool]:
    """Read and check a JSONL data file: (records with only the format's keys, conversational?)."""
    path = Path(path)
    if path.is_dir():
        raise QwenlabError(f"{path}: expected a JSONL data file, found a folder")
    if not path.is_file():
        raise QwenlabError(f"{path}: data file not found")
    records, first = [], None
    for where, number, record in _read_records(path):
        if isinstance(record, dict):
            record = as_trl_record(record, kind, where)
        shape = check_record(record, kind, where)
        if first is None:
            first = (shape, number)
        elif shape != first[0]:
            describe = lambda s: f"'{s[0]}' ({'chat messages' if s[1] else 'plain text'})"
            raise QwenlabError(f"{where}: format {describe(shape)} differs from line {first[1]}'s "
                               f"{describe(first[0])}; use one format per file")
        records.append({k: record[k] for k in shape[0].split("/")})
    if not records:
        raise QwenlabError(f"{path}: empty dataset (no records)")
    return records, first[0][1]


def _read_records(path: Path):
    """(where, number, record) for each record: one per line of JSONL, or the items of a JSON array."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QwenlabError(f"{path}: not UTF-8 text ({e.reason})") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise QwenlabError(f"{path}: a JSON array that does not parse ({e.msg} at line {e.lineno}); "
                               "expected JSONL (one JSON object per line) or a valid JSON array") from None
        if isinstance(items, list):
            for index, item in enumerate(items):
                yield f"{path}[{index}]", index + 1, item
            return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise QwenlabError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        yield where, number, record


def assistant_only_turns(records: list[dict]) -> list[dict]:
    """`messages` conversations as one prompt/completion example per assistant turn: the loss then falls on
    assistant tokens only (system and user turns are context). Other records are returned as they are."""
    out = []
    for record in records:
        if "messages" not in record:
            out.append(record)
            continue
        messages = record["messages"]
        out += [{"prompt": messages[:i], "completion": [message]}
                for i, message in enumerate(messages) if message["role"] == "assistant" and i > 0]
    return out


def split_records(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, validation): a seeded random `fraction` held out, at least one record when fraction > 0."""
    if fraction <= 0:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = max(1, round(len(records) * fraction))
    if held >= len(records):
        raise QwenlabError(f"val_fraction {fraction} leaves no training data from {len(records)} records")
    held_out = set(order[:held])
    train = [r for i, r in enumerate(records) if i not in held_out]
    return train, [r for i, r in enumerate(records) if i in held_out]


def write_jsonl(records: list[dict], out: str | Path, force: bool = False) -> Path:
    """Write records atomically (a temporary file renamed into place)."""
    out = Path(out)
    if out.is_dir():  # --force replaces a file, never a folder
        raise QwenlabError(f"{out}: is a folder; expected the path of a JSONL file to write")
    if out.exists() and not force:
        raise QwenlabError(f"{out}: file exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# ---- data from verifiable tasks -------------------------------------------------------------
def training_instances(task: str, n: int, seed: int = 0, difficulty: int | None = None):
    """n instances of `task` with seeds DATA_SEED_OFFSET + seed * 1,000,000 + i, disjoint from evaluation."""
    from qwenlab.tasks import generate

    if not isinstance(n, int) or not 0 < n <= SEEDS_PER_DATA_SEED:
        raise QwenlabError(f"--n must be from 1 to {SEEDS_PER_DATA_SEED}, got {n!r}")
    if not isinstance(seed, int) or seed < 0:
        raise QwenlabError(f"--seed must be a non-negative integer, got {seed!r}")
    base = DATA_SEED_OFFSET + seed * SEEDS_PER_DATA_SEED
    return [generate(task, base + i, difficulty) for i in range(n)]


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def sft_records_from_task(task: str, n: int, seed: int = 0, difficulty: int | None = None) -> list[dict]:
    """Chat prompt/completion pairs whose completion is the verified answer."""
    from qwenlab.tasks import get_task

    source = get_task(task)  # the answer in the form the task's verifier reads (<answer> tags for reasoning_gym)
    return [{"prompt": _user(i.prompt), "completion": _assistant(source.reference_completion(i))}
            for i in training_instances(task, n, seed, difficulty)]


def wrong_answer(task: str, expected: str, rng: random.Random) -> str:
    """A near miss (an off-by-a-bit number, a word with two letters swapped or changed) or a badly
    formatted reply; always one the task's verifier scores 0."""
    from qwenlab.tasks import score

    for _ in range(100):
        if expected.lstrip("-").isdigit():
            value = int(expected) + rng.choice([-10, -2, -1, 1, 2, 10])
            candidate = str(value)
        else:
            letters = list(expected)
            i = rng.randrange(len(letters))
            if len(letters) > 1 and rng.random() < 0.5:
                j = min(i + 1, len(letters) - 1) if i < len(letters) - 1 else i - 1
                letters[i], letters[j] = letters[j], letters[i]
            else:
                letters[i] = rng.choice("abcdefghijklmnopqrstuvwxyz")
            candidate = "".join(letters)
        if rng.random() < 0.25:  # badly formatted: chatter, no usable answer
            candidate = rng.choice(["I am not sure.", "It depends.", f"Maybe {candidate}, or not."])
        if score(task, candidate, expected) == 0.0:
            return candidate
    return "I do not know."


def dpo_records_from_task(task: str, n: int, seed: int = 0, difficulty: int | None = None,
                          rejected_from: str | None = None) -> list[dict]:
    """Chat preference pairs: chosen is the verified answer, rejected a wrong or badly formatted one.

    With `rejected_from` (a model folder or 'nano'), rejected is that model's own greedy reply where
    the verifier scores it 0 (on-policy pairs: DPO then pushes down the mistakes the model actually
    makes, which synthetic near misses it never produces do not); where the model is right, a
    synthetic wrong answer stands in.
    """
    from qwenlab.tasks import score

    instances = training_instances(task, n, seed, difficulty)
    rng = random.Random(f"dpo:{task}:{seed}")
    rejected = [wrong_answer(task, i.expected, rng) for i in instances]  # synthetic
    if rejected_from is not None:
        own = policy_replies(rejected_from, [i.prompt for i in instances])
        rejected = [reply if reply.strip() and score(task, reply, i.expected) == 0.0 else synthetic
                    for i, reply, synthetic in zip(instances, own, rejected)]
    return [{"prompt": _user(i.prompt), "chosen": _assistant(i.expected), "rejected": _assistant(wrong)}
            for i, wrong in zip(instances, rejected)]


def policy_replies(model_path: str, prompts: list[str], batch_size: int = 64, max_new_tokens: int = 24) -> list[str]:
    """The greedy chat replies of a model (qwenlab's engine, batched) to each prompt."""
    from tqdm import tqdm

    from qwenlab.model import load_model, load_tokenizer
    from qwenlab.model.generate import GenerationConfig, generate
    from qwenlab.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(model_path)
    model, tokenizer = load_model(checkpoint, "fp32"), load_tokenizer(checkpoint.path)
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    replies = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="policy replies", unit="batch", leave=False):
        replies += [c.text for c in generate(model, tokenizer, prompts[start:start + batch_size], config, chat=True)]
    return replies

