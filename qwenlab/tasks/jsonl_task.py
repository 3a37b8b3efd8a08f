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

A user's verifier has a time budget (VERIFIER_BUDGET_S per call): it runs in one long-lived child
process of its own (spawned; it imports the verifier file itself), and the caller waits at most the
budget. A call that overruns scores 0 with a one-line warning; the child is killed and replaced (a
thread cannot be stopped, so a verifier stuck in a loop would keep a core busy for ever). The file is
also imported once in this process when the task opens, so a missing function or an import error is
one line before anything runs.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import threading
from pathlib import Path
from typing import Callable

from qwenlab.errors import QwenlabError
from qwenlab.tasks.base import TaskInstance, TaskSource, file_sha256
from qwenlab.tasks.math_answers import MathVerifier, gold_answer

MAX_ROWS = 10_000_000
VERIFIER_BUDGET_S = 5.0  # wall seconds per call of a user's verifier
VERIFIER_STARTUP_S = 60.0  # a fresh child first imports Python, qwenlab's task module and the verifier


class VerifierFailed(Exception):
    """The user's verifier raised (in its child process), or overran its budget; `kind` names what."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


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


def _serve_verifier(connection, path: str, function: str) -> None:
    """The child's loop: (completion, item) in, ("ok", value) or ("error", kind, message) out."""
    try:
        fn = load_verifier(Path(path), function)
    except Exception as e:
        fn, failure = None, ("error", type(e).__name__, str(e))
    while True:
        try:
            completion, item = connection.recv()
        except (EOFError, OSError):
            return
        if fn is None:
            reply = failure
        else:
            try:
                value = fn(completion, item)
                reply = ("ok", value if isinstance(value, (int, float)) else repr(value)[:80])
            except BaseException as e:  # anything the user's code raises is that completion's 0
                reply = ("error", type(e).__name__, str(e).splitlines()[0][:160] if str(e) else "")
        connection.send(reply)


class VerifierChild:
    """A user's verifier in its own spawned process, called with a time budget; killed and replaced
    when a call overruns. One call at a time (a lock), from any thread."""

    def __init__(self, path: Path, function: str, budget_s: float = VERIFIER_BUDGET_S):
        self.path, self.function, self.budget_s = str(path), function, budget_s
        self._lock = threading.Lock()
        self._process = self._connection = None

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        self._process = context.Process(target=_serve_verifier, args=(theirs, self.path, self.function),
                                        daemon=True, name="qwenlab-verifier")
        self._process.start()
        theirs.close()
        self._connection = ours

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join(5)
            self._connection.close()
        self._process = self._connection = None

    def __call__(self, completion: str, item: dict):
        with self._lock:
            fresh = self._process is None or not self._process.is_alive()
            if fresh:
                self.stop()
                self._start()
            try:
                self._connection.send((completion, item))
                # the start of a fresh child (imports) is not the call's budget
                answered = self._connection.poll(self.budget_s + (VERIFIER_STARTUP_S if fresh else 0.0))
                reply = self._connection.recv() if answered else None
            except (EOFError, OSError, BrokenPipeError):  # the child died (the verifier exited it)
                self.stop()
                raise VerifierFailed("died", f"{Path(self.path).name}:{self.function}: the verifier's process "
                                             "ended during the call") from None
            if reply is None:
                self.stop()
                raise VerifierFailed("timeout", f"{Path(self.path).name}:{self.function} ran past its "
                                                f"{self.budget_s:g} s budget")
        if reply[0] == "error":
            raise VerifierFailed(reply[1], reply[2])
        return reply[1]


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
            load_verifier(verifier_path, function)  # a bad file or name is one line now, before anything runs
            self.verifier = VerifierChild(verifier_path.resolve(), function)
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
