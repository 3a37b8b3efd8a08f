"""jsonl:PATH and jsonl:PATH@verifier.py:FN: the user's own question/answer rows.

Each line of PATH is a JSON object with "question" and "answer" (other fields are kept and passed
to a custom verifier). GSM8K's files work as they are: an answer ending "#### 1,234" is scored
against 1234. The instance seed indexes the rows modulo their number, so peers with the same file
rebuild the same instance; the file's SHA-256 is part of the identity, so peers with another file
under the same name never mix rollouts.

Scoring: without a verifier, math-verify compares the completion's answer (its last <answer> block,
else the whole text) with the gold answer, within a time budget (math_answers.py). With
`@verifier.py:FN`, FN(completion, item) -> float in [0, 1] is called with the row as a dict; a
verifier that raises scores that completion 0 and is reported (TaskSource.safe_score).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Callable

from qwenlab.errors import QwenlabError
from qwenlab.tasks.base import TaskInstance, TaskSource, file_sha256
from qwenlab.tasks.math_answers import MathVerifier, gold_answer

MAX_ROWS = 10_000_000


def read_rows(path: Path) -> list[dict]:
    if path.is_dir():
        raise QwenlabError(f"{path}: expected a JSONL file, found a folder")
    if not path.is_file():
        raise QwenlabError(f"{path}: no such JSONL file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise QwenlabError(f"{path}:{number}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("question"), str) or "answer" not in row:
                raise QwenlabError(f"{path}:{number}: expected an object with a \"question\" string and an \"answer\"")
            rows.append(row)
            if len(rows) > MAX_ROWS:
                raise QwenlabError(f"{path}: more than {MAX_ROWS} rows")
    if not rows:
        raise QwenlabError(f"{path}: no rows")
    return rows


def load_verifier(path: Path, function: str) -> Callable[[str, dict], float]:
    """FN from a Python file; errors in finding it are one line (errors inside it, later, score 0)."""
    if not path.is_file():
        raise QwenlabError(f"{path}: no such verifier file")
    spec = importlib.util.spec_from_file_location(f"qwenlab_verifier_{file_sha256(path)[:12]}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's module: show what went wrong, in one line
        raise QwenlabError(f"{path}: importing the verifier failed ({type(e).__name__}: {e})") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise QwenlabError(f"{path}: no function '{function}' (expected {function}(completion, item) -> float)")
    return fn


class JsonlTask(TaskSource):
    def __init__(self, path: Path, verifier: tuple[Path, str] | None = None):
        super().__init__()
        self.rows = read_rows(path)
        self.size = len(self.rows)
        self.identity = {"source": "jsonl", "name": path.name, "data_sha256": file_sha256(path)}
        self.verifier = None
        self.math = MathVerifier()
        if verifier is not None:
            verifier_path, function = verifier
            self.verifier = load_verifier(verifier_path, function)
            self.identity["verifier"] = {"name": verifier_path.name, "function": function,
                                         "sha256": file_sha256(verifier_path)}
        else:
            self.identity["verifier"] = "math-verify"

    def generate(self, seed: int, difficulty: int | None) -> TaskInstance:
        difficulty = self.check_difficulty(seed, difficulty)
        if seed < 0:
            raise QwenlabError(f"task '{self.NAME}': seed must be >= 0, got {seed}")
        row = self.rows[seed % self.size]
        return TaskInstance.create(self.NAME, seed, difficulty, row["question"], gold_answer(str(row["answer"])),
                                   item=dict(row))

    def score_instance(self, completion: str, instance: TaskInstance) -> float:
        if self.verifier is not None:
            item = instance.item if instance.item is not None else dict(self.rows[instance.seed % self.size])
            return self.verifier(completion, item)
        return self.score(completion, instance.expected)

    def score(self, completion: str, expected: str) -> float:
        if self.verifier is not None:
            return super().score(completion, expected)
        return 1.0 if self.math.equal(expected, completion) else 0.0


def open_source(argument: str, base_dir: Path) -> JsonlTask:
    """`PATH` or `PATH@verifier.py:FN` (paths relative to base_dir)."""
    data, at, verifier = argument.rpartition("@") if "@" in argument else (argument, "", "")
    if not data:
        raise QwenlabError("jsonl: expected jsonl:PATH or jsonl:PATH@verifier.py:FN")
    if at:
        file, colon, function = verifier.rpartition(":")
        if not colon or not file or not function.isidentifier():
            raise QwenlabError(f"jsonl:{argument}: the verifier must be spelled FILE.py:FUNCTION, got '{verifier}'")
        return JsonlTask(base_dir / data, (base_dir / file, function))
    return JsonlTask(base_dir / data)
