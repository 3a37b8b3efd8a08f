"""GSM8K-style accuracy from a local JSONL file: {"question": ..., "answer": "... #### 42"} per line.

The reference is the number after the last "####" of `answer`. The model's answer is the number
after its last "####" if it wrote one, else the last number in its completion (lm-evaluation-harness'
"flexible-extract"). Numbers compare as decimals: "1,234", "$1234" and "1234.00" are all 1234.
Greedy decoding. With few-shot, the first K records are the examples and are not scored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

from tqdm import tqdm

from qwenlab.eval.jsonl import jsonl_records
from qwenlab.errors import QwenlabError

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_MARK = "####"
PLAIN_STOP = ("\n\nQuestion:", "Question:")


@dataclass
class GSM8KResult:
    source: str
    n: int = 0
    correct: int = 0
    fewshot: int = 0
    examples: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def as_dict(self) -> dict:
        return {"source": self.source, "n": self.n, "correct": self.correct, "fewshot": self.fewshot,
                "accuracy": round(self.accuracy, 4), "examples": self.examples}


def parse_number(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace("$", "").replace(",", "").rstrip("."))
    except InvalidOperation:
        return None


def extract_answer(text: str) -> Decimal | None:
    """The number after the last '####', else the last number in `text`."""
    if _MARK in text:
        found = _NUMBER.search(text.rsplit(_MARK, 1)[1])
        if found:
            return parse_number(found.group())
    numbers = _NUMBER.findall(text)
    return parse_number(numbers[-1]) if numbers else None


def read_gsm8k(path: str | Path, limit: int | None = None) -> list[dict]:
    """Records with 'question', 'answer' and the parsed 'expected' number (first `limit` only)."""
    path = Path(path)
    records = []
    for number, record in jsonl_records(path):
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("question", "answer")):
            raise QwenlabError(f"{path}:{number}: expected an object with string fields 'question' and 'answer'")
        if _MARK not in record["answer"]:
            raise QwenlabError(f"{path}:{number}: the answer has no '#### N' final answer")
        expected = extract_answer(record["answer"].rsplit(_MARK, 1)[1])
        if expected is None:
            raise QwenlabError(f"{path}:{number}: no number after '####' in the answer")
        records.append({"question": record["question"], "answer": record["answer"], "expected": expected})
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise QwenlabError(f"{path}: no records")
    return records


def build_prompt(tokenizer, question: str, shots: list[dict], chat: bool) -> str:
    if chat:
        messages = []
        for shot in shots:
            messages += [{"role": "user", "content": shot["question"]},
                         {"role": "assistant", "content": shot["answer"]}]
        return tokenizer.apply_chat_template(messages + [{"role": "user", "content": question}])
    parts = [f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots]
    return "".join(parts) + f"Question: {question}\nAnswer:"


def evaluate_gsm8k(model, tokenizer, records: list[dict], *, fewshot: int = 0, chat: bool | None = None,
                   max_new_tokens: int = 256, batch_size: int = 8, keep_examples: int = 3, source: str = "",
                   progress: bool = True) -> GSM8KResult:
    from qwenlab.model.generate import GenerationConfig, generate

    if fewshot >= len(records):
        raise QwenlabError(f"--fewshot {fewshot} leaves no record to score ({len(records)} records)")
    chat = bool(tokenizer.chat_template) if chat is None else chat
    shots, scored = records[:fewshot], records[fewshot:]
    config = GenerationConfig(max_new_tokens=max_new_tokens, stop=() if chat else PLAIN_STOP)
    result = GSM8KResult(source, fewshot=fewshot)
    for start in tqdm(range(0, len(scored), batch_size), desc="gsm8k", unit="batch", disable=not progress):
        chunk = scored[start:start + batch_size]
        prompts = [build_prompt(tokenizer, r["question"], shots, chat) for r in chunk]
        for record, completion in zip(chunk, generate(model, tokenizer, prompts, config)):
            found = extract_answer(completion.text)
            ok = found is not None and found == record["expected"]
            result.n += 1
            result.correct += int(ok)
            if len(result.examples) < keep_examples:
                result.examples.append({"question": record["question"], "expected": str(record["expected"]),
                                        "completion": completion.text, "extracted": str(found), "correct": ok})
    return result
