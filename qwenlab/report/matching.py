"""Which accuracy figures of several variants may stand side by side.

A comparison uses, per task, one setting (difficulty, seed) shared by as many variants as possible,
and compares them on the same instances: a task's instances are a stable prefix in n, so a figure on
400 instances is cut to the first 200 when another variant was measured on 200 (from its stored
per-instance rewards). A variant measured only at other settings shows "-" for that task, with a
note; it is never compared at a setting the others did not use. What else sits in the user's
measurement cache therefore never changes the figures of a run whose variants were measured alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwenlab.stats import wilson_interval
from qwenlab.variants.results import Figure, accuracy_setting, rewards_of


@dataclass
class MatchedAccuracy:
    """One variant's figure for one task at the comparison's setting."""

    accuracy: float
    n: int
    low: float  # 95% Wilson interval
    high: float
    rewards: list[float] | None  # per instance, cut to n (None when the record kept none)
    setting: tuple


def _setting_text(setting: tuple) -> str:
    difficulty, seed = setting
    return f"difficulty {difficulty if difficulty is not None else 'default'}, seed {seed}"


def match_accuracy(figures: dict[str, dict[str, list[Figure]]], where: dict | None = None
                   ) -> tuple[dict[str, dict[str, MatchedAccuracy]], list[str]]:
    """figures: variant -> task -> its accuracy figures (results.accuracy_figures). where: optional
    {"difficulty": d, "seed": s} the setting must have (a recipe's own). Returns variant -> task ->
    MatchedAccuracy, and notes on what was left out or cut."""
    notes: list[str] = []
    matched: dict[str, dict[str, MatchedAccuracy]] = {name: {} for name in figures}
    tasks = sorted({t for by_task in figures.values() for t in by_task})
    for task in tasks:
        holders: dict[tuple, dict[str, Figure]] = {}  # setting -> variant -> its largest-n figure there
        for name, by_task in figures.items():
            for figure in by_task.get(task, []):  # largest n first
                setting = accuracy_setting(figure)
                if where and any(dict(zip(("difficulty", "seed"), setting)).get(k) != v for k, v in where.items()):
                    continue
                holders.setdefault(setting, {}).setdefault(name, figure)
        if not holders:
            continue
        # The setting most variants share; then the one with most instances in common; then the newest.
        setting, chosen = max(holders.items(), key=lambda item: (
            len(item[1]), min(f.values.get("n") or 0 for f in item[1].values()),
            max(f.time for f in item[1].values())))
        common_n = min(f.values.get("n") or 0 for f in chosen.values())
        uneven = []
        for name, figure in chosen.items():
            n = figure.values.get("n") or 0
            rewards = rewards_of(figure)
            if n > common_n and rewards is not None:
                rewards = rewards[:common_n]
                n = common_n
                accuracy = sum(rewards) / n if n else 0.0
            else:
                accuracy = figure.values.get("accuracy")
                if n != common_n:
                    uneven.append(f"{name} (n={n})")
            if not isinstance(accuracy, (int, float)):
                continue
            low, high = wilson_interval(accuracy * n, n)
            matched[name][task] = MatchedAccuracy(float(accuracy), n, low, high, rewards, setting)
        others = [name for name, by_task in figures.items() if by_task.get(task) and name not in chosen]
        if others:
            notes.append(f"{task}: compared at {_setting_text(setting)}; not compared (measured only at other "
                         f"settings): {', '.join(others)} (`qwenlab compare --measure` measures them alike).")
        if uneven:
            notes.append(f"{task}: compared on the first {common_n} instances, except {', '.join(uneven)}, "
                         "whose record has no per-instance rewards to cut.")
    return matched, notes
