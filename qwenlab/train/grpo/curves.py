"""Training curves: one JSON object per line (append-only, crash-safe) and a PNG drawn from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


class JsonlLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash ends the log
        return rows

    def keep(self, predicate: Callable[[dict], bool]) -> None:
        """Drop rows a resume will write again (those after the checkpoint)."""
        rows = [r for r in self.rows() if predicate(r)]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def plot_curves(rows: list[dict], png: str | Path, x: str, series: dict[str, str], title: str,
                ylabel: str = "reward", cumulative: bool = False) -> Path | None:
    """A line per series {label: key}; rows without a key are skipped. None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, key in series.items():
        points = [(r[x], r[key]) for r in rows if r.get(key) is not None]
        if not points:
            continue
        xs, ys = zip(*points)
        if cumulative:
            total, acc = 0.0, []
            for y in ys:
                total += y
                acc.append(total)
            ys = acc
        ax.plot(xs, ys, label=label, marker="." if len(xs) < 40 else None)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)
