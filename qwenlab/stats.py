"""The statistics behind every accuracy claim: Wilson intervals and paired tests on the same prompts.

Pure functions over lists of per-instance rewards (1/0 for exact-match tasks, a fraction for tasks
that give partial credit). Two variants evaluated with the same task, difficulty and seed saw the
same prompts in the same order (qwenlab.tasks.sample_instances), so their rewards pair up index by index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054  # the two-sided 95% normal quantile


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion: honest at 0/n and n/n, unlike mean ± 1.96·SE."""
    if n <= 0:
        return (0.0, 1.0)
    p = min(1.0, max(0.0, successes / n))
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def _binomial_two_sided(k: int, n: int) -> float:
    """P(|X - n/2| >= |k - n/2|) for X ~ Binomial(n, 1/2): the exact sign / McNemar test."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class PairedComparison:
    """b against a on the same instances: the mean difference, its 95% interval and the sign test's p-value."""

    n: int
    mean_a: float
    mean_b: float
    difference: float  # mean_b - mean_a
    low: float
    high: float
    b_better: int  # instances where b scored higher
    a_better: int
    p_value: float  # exact two-sided sign test on the instances that differ (McNemar's test for 0/1 rewards)

    def significant(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha

    def describe(self, name_a: str = "a", name_b: str = "b") -> str:
        return (f"{name_b} - {name_a} = {self.difference:+.3f} (95% CI {self.low:+.3f} to {self.high:+.3f}) on "
                f"the same {self.n} prompts; {name_b} better on {self.b_better}, {name_a} on {self.a_better}, "
                f"sign test p = {self.p_value:.3g}")


def paired_comparison(a: list[float], b: list[float]) -> PairedComparison:
    """Compare per-instance rewards of two variants on the same prompts (a[i] and b[i] are one prompt)."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same instances: {len(a)} vs {len(b)} rewards")
    n = len(a)
    if n == 0:
        raise ValueError("paired comparison of no instances")
    differences = [y - x for x, y in zip(a, b)]
    mean = sum(differences) / n
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1) if n > 1 else 0.0
    half = Z95 * math.sqrt(variance / n)
    b_better = sum(d > 0 for d in differences)
    a_better = sum(d < 0 for d in differences)
    return PairedComparison(n, sum(a) / n, sum(b) / n, mean, mean - half, mean + half, b_better, a_better,
                            _binomial_two_sided(b_better, b_better + a_better))


def format_accuracy(accuracy: float, n: int) -> str:
    """'0.393 [0.35, 0.44]': an accuracy on n instances with its 95% Wilson interval."""
    low, high = wilson_interval(accuracy * n, n)
    return f"{accuracy:.3f} [{low:.2f}, {high:.2f}]"


def format_change(base: list[float], other: list[float]) -> str:
    """'+0.169*' against the base on the same instances; * when the paired sign test gives p < 0.05."""
    test = paired_comparison(base, other)
    return f"{test.difference:+.3f}{'*' if test.significant() else ''}"


PAIRED_NOTE = ("Brackets: 95% Wilson interval. Changes are against the base on the same prompts; * marks a "
               "change whose paired sign test (McNemar's, for right/wrong answers) gives p < 0.05.")
