"""What a data-aware merge (regmean) needs from each model: the Gram matrix XᵀX of every linear's inputs.

Each model runs on its own examples (ActivationData: built-in task instances or a JSONL of chats), and a
hook on each linear of the decoder layers adds xᵀx over the real (unpadded) tokens. Results are cached
per (model, data), so merge search measures each model once however many trials re-solve the merge.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import torch
from tqdm import tqdm

from qwenlab.errors import QwenlabError

# Task seeds of merge data: above evaluation's (< 1,000,000), training data's (20,000,000 + ...) and replay's (2**50).
MERGE_DATA_SEED_OFFSET = 2**51
BATCH = 16
_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 4  # models; a 0.5B model's matrices take ~2.4 GB in float32


def data_examples(data, tokenizer, where: str) -> list[tuple[str, str]]:
    """(prompt, text) per example: the text rendered whole, and the part of it before the answer (the chat up to
    its last assistant turn, with the generation prompt; "" where the whole text is the answer: `text` records
    and chats that do not end with the assistant)."""
    from qwenlab.tasks import generate

    if data.file is None:
        tasks = [data.task] if data.task is not None else list(data.tasks)
        examples = []
        for i in range(data.n):
            task, round_ = tasks[i % len(tasks)], i // len(tasks)
            instance = generate(task, MERGE_DATA_SEED_OFFSET + data.seed * 1_000_000 + round_, data.difficulty)
            question = [{"role": "user", "content": instance.prompt}]
            examples.append((tokenizer.apply_chat_template(question, add_generation_prompt=True),
                             tokenizer.apply_chat_template(
                                 question + [{"role": "assistant", "content": instance.expected}],
                                 add_generation_prompt=False)))
        return examples
    records = _file_examples(Path(data.file), tokenizer, where)
    return [records[i % len(records)] for i in range(data.n)]


def _file_examples(path: Path, tokenizer, where: str) -> list[tuple[str, str]]:
    from qwenlab.eval.jsonl import jsonl_records

    if not path.is_file():
        raise QwenlabError(f"{where}.file: {path} not found")
    examples = []
    for number, record in jsonl_records(path):
        messages = record.get("messages") if isinstance(record, dict) else None
        text = record.get("text") if isinstance(record, dict) else None
        if isinstance(messages, list) and messages and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                           for m in messages):
            prompt = (tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
                      if messages[-1].get("role") == "assistant" else "")
            examples.append((prompt, tokenizer.apply_chat_template(messages, add_generation_prompt=False)))
        elif isinstance(text, str) and text.strip():
            examples.append(("", text))
        else:
            raise QwenlabError(f"{path}:{number}: expected 'messages' (a list of {{role, content}}) or 'text'")
    if not examples:
        raise QwenlabError(f"{path}: no records")
    return examples


def empty_model(config, dtype: torch.dtype = torch.float32):
    """The model core for `config`, its weights allocated but not initialised (they are copied in next)."""
    from qwenlab.model.qwen2 import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    model.rotary = type(model.rotary)(config.head_dim, config.rope_theta)  # its buffers were left on meta
    return model


def runnable_model(source):
    """The model core with the source's tensors (BASE+ADAPTER sources give W + s·B·A)."""
    config = source.config
    model = empty_model(config)
    names = set(source.tensor_names())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name not in names:
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    continue
                raise QwenlabError(f"{source.path}: tensor '{name}' is missing")
            tensor.copy_(source.get(name).to(torch.float32))
    return model.eval().requires_grad_(False)


def token_batches(token_rows: list[list[int]], pad_id: int, batch: int = BATCH) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens [B, T], real-token mask [B, T]) per batch, right-padded: causal attention never sees the pads."""
    batches = []
    for start in range(0, len(token_rows), batch):
        rows = token_rows[start:start + batch]
        length = max(map(len, rows))
        tokens = torch.full((len(rows), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for row, ids in enumerate(rows):
            tokens[row, :len(ids)], mask[row, :len(ids)] = torch.tensor(ids), True
        batches.append((tokens, mask))
    return batches


def data_token_rows(source, data, where: str) -> tuple[list[list[int]], int, list[int]]:
    """The model's data as token rows (cut to its context), its tokenizer's pad id, and where each row's answer
    starts (the first token that its prompt does not share; 0 where the whole row is the answer)."""
    from qwenlab.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(source.path)
    max_length = source.config.max_position_embeddings
    rows, starts = [], []
    for prompt, text in data_examples(data, tokenizer, where):
        ids = tokenizer.encode(text)[:max_length]
        if not ids:
            continue
        start = shared_prefix_length([ids, tokenizer.encode(prompt) if prompt else []])
        rows.append(ids)
        starts.append(start)
    if not rows:
        raise QwenlabError(f"{where}: the data gives no tokens")
    return rows, tokenizer.pad_id, starts


def shared_prefix_length(rows: list[list[int]]) -> int:
    """How many leading tokens every row has in common."""
    shortest = min(map(len, rows))
    for position in range(shortest):
        if any(row[position] != rows[0][position] for row in rows):
            return position
    return shortest


def source_label(source) -> str:
    """'nano' or 'nano+sft-repeat': how progress bars name a merge input."""
    adapter = getattr(source, "adapter_path", None)
    return f"{Path(source.path).name}+{Path(adapter).name}" if adapter else Path(source.path).name


def linear_input_grams(model, token_rows: list[list[int]], pad_id: int, progress: bool = False,
                       label: str = "a model") -> dict[str, torch.Tensor]:
    """{weight name: Σ xᵀx over real tokens} for every linear in the decoder layers (float32, [in, in])."""
    grams: dict[str, torch.Tensor] = {}
    valid = {"mask": None}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            def hook(_, inputs, __, key=f"{name}.weight"):
                rows = inputs[0].reshape(-1, inputs[0].shape[-1])[valid["mask"]].to(torch.float64)
                gram = rows.T @ rows  # float64: sums over many tokens, then a solve
                grams[key] = grams[key] + gram if key in grams else gram
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for tokens, mask in tqdm(token_batches(token_rows, pad_id), desc=f"regmean: layer inputs of {label}",
                                     unit="batch", disable=not progress, file=sys.stderr):
                valid["mask"] = mask.reshape(-1)
                model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return {k: v.to(torch.float32) for k, v in grams.items()}


def input_key(source, data) -> tuple:
    """What identifies a merge input's measurements: model, adapter, data (and the data file's version)."""
    stamp = None
    if data.file is not None and Path(data.file).is_file():  # an edited file is measured again
        stat = Path(data.file).stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
    return str(source.path), str(getattr(source, "adapter_path", None)), data.model_dump_json(), stamp


def model_grams(source, data, where: str, progress: bool = False) -> dict[str, torch.Tensor]:
    """linear_input_grams of a merge input on its data, cached per (model, adapter, data)."""
    key = input_key(source, data)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    rows, pad_id, _ = data_token_rows(source, data, where)
    grams = linear_input_grams(runnable_model(source), rows, pad_id, progress, source_label(source))
    _CACHE[key] = grams
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return grams
