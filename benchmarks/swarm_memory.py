"""Memory of swarm peers over many short rounds (issue 20: "memory stays flat over 1000 rounds").

    python benchmarks/swarm_memory.py [--rounds 1000] [--model nano] [--out benchmarks/results/swarm]

Two peers on loopback (`qwenlab swarm bootstrap` and `qwenlab swarm join`, each its own process with
its own hivemind DHT process and p2pd daemon), tiny rounds (1 local + 1 external group of 2
completions, <= 4 new tokens), so every round publishes, fetches, verifies, re-scores and trains on
the other peer's record. Every `--every-s` seconds it samples the resident set size (RSS) of each
peer's whole process tree (the peer, its DHT process, p2pd) and the round the peer has reached.
Writes OUT/memory_<rounds>_rounds.json (the series, start/end RSS, slope by least squares over the
second half, after allocators and caches have warmed up) and OUT/memory_<rounds>_rounds.png. Each peer
also records, per round in its rounds.jsonl, its RSS, glibc's live heap and Python's live blocks after
its end-of-round malloc_trim: a leak shows as live bytes growing, allocator retention as RSS alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

FLAGS = ["--host", "127.0.0.1", "--port", "0", "--swarm", "memory", "--num-generations", "2", "--max-new-tokens",
         "4", "--local", "1", "--external", "1", "--threads", "1", "--save-every", "100", "--quiet",
         "--no-stable-address", "--dht-timeout-s", "5", "--wait-for-peers", "1", "--wait-timeout-s", "120",
         "--external-selection", "uniform"]  # uniform: the other's records are trained on even when all-equal


def tree_rss(process: psutil.Process) -> tuple[int, int]:
    """(RSS of the process, RSS of it and all its descendants) in bytes; gone processes count 0."""
    try:
        own = process.memory_info().rss
        children = process.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    total = own
    for child in children:
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return own, total


def rounds_done(out: Path) -> int:
    path = out / "rounds.jsonl"
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    if n < 2:
        return 0.0
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--model", default="nano")
    parser.add_argument("--every-s", type=float, default=2.0)
    parser.add_argument("--out", default="benchmarks/results/swarm")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="swarm-memory-"))
    base = [sys.executable, "-m", "qwenlab", "swarm"]
    logs, peers = [], []
    a_out = work / "a"
    logs.append(open(work / "a.log", "w"))
    peers.append(("a", a_out, subprocess.Popen(base + ["bootstrap", "--out", str(a_out), "--model", args.model,
                                                       "--rounds", str(args.rounds), *FLAGS],
                                               stdout=logs[-1], stderr=subprocess.STDOUT)))
    while not (a_out / "address.txt").is_file():
        if peers[0][2].poll() is not None:
            raise SystemExit(f"error: the bootstrap peer exited; see {work / 'a.log'}")
        time.sleep(0.2)
    address = (a_out / "address.txt").read_text().split()[0]
    b_out = work / "b"
    logs.append(open(work / "b.log", "w"))
    # b runs a few rounds more, so a has a partner until its last round
    peers.append(("b", b_out, subprocess.Popen(base + ["join", "--peers", address, "--out", str(b_out), "--model",
                                                       args.model, "--rounds", str(args.rounds + 20), *FLAGS],
                                               stdout=logs[-1], stderr=subprocess.STDOUT)))
    started, samples = time.monotonic(), []
    handles = {name: psutil.Process(p.pid) for name, _, p in peers}
    while any(p.poll() is None for _, _, p in peers):
        row = {"t": round(time.monotonic() - started, 1)}
        for name, out, process in peers:
            if process.poll() is not None:
                continue  # finished: its last samples are the end of its series
            own, total = tree_rss(handles[name])
            row[name] = {"round": rounds_done(out), "rss_mib": round(own / 2**20, 2), "tree_mib": round(total / 2**20, 2)}
        samples.append(row)
        print(json.dumps(row), flush=True)
        time.sleep(args.every_s)
    for _, _, process in peers:
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.terminate()
            process.wait(60)
    summary = {}
    for name, out, _ in peers:
        series = [(s[name]["round"], s[name]["rss_mib"], s[name]["tree_mib"]) for s in samples
                  if name in s and s[name]["round"] > 0 and s[name]["rss_mib"] > 0]
        if not series:
            continue
        last_round = series[-1][0]
        late = [s for s in series if s[0] >= last_round / 2]
        rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
        summary[name] = {
            "rounds": len(rows), "start_round": series[0][0], "start_rss_mib": series[0][1],
            "start_tree_mib": series[0][2], "end_round": last_round, "end_rss_mib": series[-1][1],
            "end_tree_mib": series[-1][2], "peak_rss_mib": max(s[1] for s in series),
            "slope_rss_kib_per_round_second_half": round(1024 * slope([(r, m) for r, m, _ in late]), 3),
            "slope_tree_kib_per_round_second_half": round(1024 * slope([(r, t) for r, _, t in late]), 3),
            "external_used": sum(r["external_used"] for r in rows), "accepted": sum(r["accepted"] for r in rows),
            "rejected": sum(r["rejected"] for r in rows),
        }
        # The peer's own per-round figures (after its end-of-round trim): live heap vs RSS.
        heap = [(r["round"], r["heap_in_use_mib"], r["rss_mib"]) for r in rows if r.get("heap_in_use_mib")]
        if heap:
            late_heap = [h for h in heap if h[0] >= heap[-1][0] / 2]
            summary[name].update({
                "heap_in_use_mib_round_5": next((h[1] for h in heap if h[0] >= 5), None),
                "heap_in_use_mib_last": heap[-1][1], "rss_mib_round_5": next((h[2] for h in heap if h[0] >= 5), None),
                "rss_mib_last_round": heap[-1][2],
                "slope_heap_in_use_kib_per_round_second_half": round(1024 * slope([(r, m) for r, m, _ in late_heap]), 3),
                "slope_rss_kib_per_round_second_half_from_rounds": round(1024 * slope([(r, m) for r, _, m in late_heap]), 3),
                "python_blocks_round_5": next((r["python_blocks"] for r in rows if r["round"] >= 5), None),
                "python_blocks_last": rows[-1].get("python_blocks"),
            })
            (out / "heap.json").write_text(json.dumps(heap))
    result = {"command": " ".join(sys.argv), "model": args.model, "rounds": args.rounds, "flags": FLAGS,
              "seconds": round(time.monotonic() - started, 1), "summary": summary, "samples": samples,
              "exit_codes": [p.returncode for _, _, p in peers]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"memory_{args.rounds}_rounds.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    heaps = {name: json.loads((peer_out / "heap.json").read_text()) for name, peer_out, _ in peers
             if (peer_out / "heap.json").is_file()}
    plot(samples, [name for name, _, _ in peers], out / f"memory_{args.rounds}_rounds.png", heaps)


def plot(samples: list[dict], names: list[str], png: Path, heaps: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name in names:
        points = [(s[name]["round"], s[name]["rss_mib"], s[name]["tree_mib"]) for s in samples
                  if name in s and s[name]["round"] > 0 and s[name]["rss_mib"] > 0]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=f"peer {name}: peer process")
        ax.plot([p[0] for p in points], [p[2] for p in points], linestyle="--",
                label=f"peer {name}: with DHT process and p2pd")
        if heaps and name in heaps:
            ax.plot([h[0] for h in heaps[name]], [h[1] for h in heaps[name]], linestyle=":",
                    label=f"peer {name}: live heap (glibc in use)")
    ax.set_xlabel("round")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title("swarm peer memory over rounds (2 peers on loopback)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
