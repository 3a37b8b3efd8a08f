"""Numbers and expressions compared by math-verify (PyPI `math-verify`), within a time budget, on any thread.

math-verify bounds its sympy work with signal.alarm, which Python allows only on the main thread; on
any other thread its timeouts raise ValueError. So:
  - on the main thread, parse/verify run here with their own alarm set to the budget (whole seconds,
    at least 1: that is signal.alarm's unit);
  - on another thread (a server's worker, a data loader), the comparison runs in one long-lived child
    process (its main thread, so the alarm works there too) and the caller waits at most the budget;
    a child that overruns is killed and replaced, and that comparison scores False.
Gold answers in GSM8K style ("... #### 1,234") are cut to the text after the last "####", commas out.
A completion's last <answer>...</answer> block, when it has one, is what is compared.
"""

from __future__ import annotations

import math
import multiprocessing
import re
import threading

_ANSWER_TAG = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)
DEFAULT_BUDGET_S = 2.0


def gold_answer(answer: str) -> str:
    """The reference answer: after the last '####' (GSM8K), thousands commas removed there; else as given."""
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip().replace(",", "")
    return answer.strip()


def answer_text(completion: str) -> str:
    """The last <answer> block's text if there is one, else the whole completion."""
    found = _ANSWER_TAG.findall(completion)
    return found[-1].strip() if found else completion


def _verify(gold: str, prediction: str, seconds: int | None) -> bool:
    from math_verify import parse, verify

    gold_parsed = parse(gold, parsing_timeout=seconds)
    if not gold_parsed:  # a plain-text gold math-verify cannot read: exact text comparison
        return gold.strip() == prediction.strip()
    predicted = parse(prediction, parsing_timeout=seconds)
    return bool(predicted) and bool(verify(gold_parsed, predicted, timeout_seconds=seconds))


def _serve(connection) -> None:
    """The child's loop: (gold, prediction, seconds) in, bool out, until the pipe closes."""
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    while True:
        try:
            gold, prediction, seconds = connection.recv()
        except EOFError:
            return
        try:
            result = _verify(gold, prediction, seconds)
        except Exception:
            result = False
        connection.send(result)


class _Child:
    """One spawned process answering comparisons; killed and replaced when it overruns."""

    def __init__(self):
        self._lock = threading.Lock()
        self._process = None
        self._connection = None

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        self._process = context.Process(target=_serve, args=(theirs,), daemon=True, name="qwenlab-math-verify")
        self._process.start()
        theirs.close()
        self._connection = ours

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join(5)
        self._process = self._connection = None

    def compare(self, gold: str, prediction: str, budget_s: float, startup_s: float = 30.0) -> bool | None:
        """The comparison's result, or None when it ran past the budget (the child is then replaced)."""
        with self._lock:
            fresh = self._process is None or not self._process.is_alive()
            if fresh:
                self._stop()
                self._start()
            self._connection.send((gold, prediction, max(1, math.ceil(budget_s))))
            # A fresh child first imports sympy (seconds): that start is not the comparison's budget.
            if self._connection.poll(budget_s + (startup_s if fresh else 0.0)):
                return bool(self._connection.recv())
            self._stop()
            return None


_CHILD = _Child()


class MathVerifier:
    """Compares a completion's answer with a gold answer; counts comparisons cut by the budget."""

    def __init__(self, budget_s: float = DEFAULT_BUDGET_S):
        self.budget_s = budget_s
        self.timeouts = 0

    def equal(self, gold: str, completion: str) -> bool:
        gold, prediction = gold_answer(gold), answer_text(completion)
        if not prediction.strip():
            return False
        if threading.current_thread() is threading.main_thread():
            from math_verify.errors import TimeoutException

            try:
                return _verify(gold, prediction, max(1, math.ceil(self.budget_s)))
            except TimeoutException:
                self.timeouts += 1
                return False
        result = _CHILD.compare(gold, prediction, self.budget_s)
        if result is None:
            self.timeouts += 1
            return False
        return result
