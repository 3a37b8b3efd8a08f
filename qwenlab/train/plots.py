"""The loss curve of a training run as a PNG: train loss per logged step, eval loss at each eval."""

from __future__ import annotations

from pathlib import Path


def loss_points(log_history: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, eval) as (step, loss) pairs from a transformers Trainer log history."""
    train = [(int(e["step"]), float(e["loss"])) for e in log_history if "loss" in e and "step" in e]
    evals = [(int(e["step"]), float(e["eval_loss"])) for e in log_history if "eval_loss" in e and "step" in e]
    return train, evals


def plot_loss_curve(log_history: list[dict], out: str | Path, title: str = "loss") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display: render straight to the file
    import matplotlib.pyplot as plt

    train, evals = loss_points(log_history)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.4)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", color="tab:orange", marker="o", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)
