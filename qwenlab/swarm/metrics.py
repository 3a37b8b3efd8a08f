"""Per-round swarm metrics: rounds.jsonl (one row per round) and rounds.png (rewards; records in/out).

Row fields: round, time, local_reward (mean over this peer's own rollouts this round), external_reward
(mean of OUR scores of the external rollouts trained on), claimed_external_reward (what their senders
said), local_used, external_used, fallback_local (external slots filled locally), accepted,
rejected, rejected_by_reason, duplicates, claim_mismatches, peers_seen, dht_ok, dht_errors, loss,
kl, seconds_generate, seconds_exchange, seconds_train, and this process's memory after the round:
rss_mib, heap_in_use_mib (glibc's live heap), python_blocks (sys.getallocatedblocks()).
"""

from __future__ import annotations

from pathlib import Path

from qwenlab.train.grpo.curves import JsonlLog

ROUNDS_FILE = "rounds.jsonl"
PLOT_FILE = "rounds.png"
AUDIT_FILE = "records.jsonl"


def mean(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else None


def plot_swarm_rounds(rows: list[dict], png: str | Path, title: str = "swarm peer") -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 5.6), sharex=True)
    x = [r["round"] for r in rows]
    for key, label in (("local_reward", "local rollouts (own policy)"),
                       ("external_reward", "external rollouts (re-scored here)")):
        points = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            top.plot(*zip(*points), label=label, marker="." if len(points) < 40 else None)
    top.set_ylabel("mean reward")
    top.set_title(title)
    top.grid(alpha=0.3)
    top.legend(fontsize=8)
    bottom.plot(x, [r.get("accepted", 0) for r in rows], label="records accepted", color="tab:green")
    bottom.plot(x, [r.get("rejected", 0) for r in rows], label="records rejected", color="tab:red")
    bottom.plot(x, [r.get("fallback_local", 0) for r in rows], label="external slots filled locally",
                color="tab:gray", linestyle="--")
    bottom.set_xlabel("round")
    bottom.set_ylabel("count")
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)


class SwarmMetrics:
    def __init__(self, out: str | Path, audit: bool = False):
        self.out = Path(out)
        self.rounds = JsonlLog(self.out / ROUNDS_FILE)
        self.audit = JsonlLog(self.out / AUDIT_FILE) if audit else None

    def resume_at(self, round_index: int) -> None:
        """Forget rows after the checkpointed round (they will be run again)."""
        self.rounds.keep(lambda r: r["round"] <= round_index)
        if self.audit is not None:
            self.audit.keep(lambda r: r.get("at_round", 0) <= round_index)

    def log_round(self, row: dict) -> None:
        self.rounds.append(row)

    def log_audit(self, round_index: int, entries: list[dict]) -> None:
        if self.audit is not None:
            for entry in entries:
                self.audit.append({"at_round": round_index, **entry})

    def plot(self, title: str = "swarm peer") -> Path | None:
        return plot_swarm_rounds(self.rounds.rows(), self.out / PLOT_FILE, title)
