"""Decode at the memory-bandwidth bound: qwenlab before/after a change, and llama.cpp, in alternating rounds.

    python benchmarks/decode_bound_bench.py /tmp/q05 /tmp/q15 --before /tmp/base --dtypes bf16,fp32 --rounds 3
    python benchmarks/decode_bound_bench.py /tmp/q05 --dtypes int4,int8 --rounds 3

MODEL folders are float checkpoints (e.g. `qwenlab random 0.5b /tmp/q05 --dtype bf16`). --before is a
checkout of the starting commit (`git worktree add /tmp/base <commit>`), run with PYTHONPATH pointing at it.
Each round, for each model and dtype, runs one STREAM-like read (the bound's bandwidth, or the engine's own
read after its runs where that is faster), then every engine
once, each in a fresh subprocess (qwenlab.bench.speed's worker), in an order that alternates between
rounds, so that a busy spell on a shared machine falls on all of them alike. Every round is printed; the
summary gives medians over rounds of tok/s, of the share of that round's bound, and of the same-round
ratios against llama.cpp (F16 for bf16 and fp32: llama-cpp-python reads no F32 export of ours; Q8_0/Q4_0
for int8/int4) and against the before checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from qwenlab.bench.speed import (GGUF_FOR_DTYPE, EngineResult, gguf_head_for, gguf_variant, measure_bandwidth,
                                 quantized_variant, _describe_quantized)
from qwenlab.checkpoint import open_checkpoint


def engine(spec: dict, pythonpath: str | None = None) -> EngineResult | None:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run([sys.executable, "-m", "qwenlab.bench.speed", json.dumps(spec)], capture_output=True,
                          text=True, env=env, cwd=pythonpath or None, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        print(f"  {spec['engine']} {spec['dtype']} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        return None
    data = json.loads(lines[-1])
    data["runs"] = {int(k): v for k, v in data["runs"].items()}
    data["bytes_per_token"] = {int(k): v for k, v in data.get("bytes_per_token", {}).items()}
    return EngineResult(**data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--before", type=Path, help="a checkout of the starting commit (its own qwenlab)")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--gen", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-llama", action="store_true")
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    base = dict(threads=args.threads, contexts=[args.ctx], gen=args.gen, runs=1, seed=0)
    jobs = []  # (model, dtype, label, spec, pythonpath)
    for model in args.models:
        for dtype in dtypes:
            path, weights, section = model, dtype, None
            if dtype.startswith("int"):
                path = quantized_variant(model, int(dtype[3:]), progress=False)
                section = open_checkpoint(path, validate=False).config.extra["quantization"]
                weights = _describe_quantized(section)
            spec = {**base, "engine": "qwenlab", "dtype": dtype, "path": str(path), "weights": weights}
            jobs.append((model.name, dtype, "after", spec, None))
            if args.before:
                jobs.append((model.name, dtype, "before", spec, str(args.before)))
            if not args.no_llama:
                kind = GGUF_FOR_DTYPE[dtype]
                head = gguf_head_for(section, kind)
                gguf = gguf_variant(model, kind, head)
                jobs.append((model.name, dtype, "llama.cpp", {**base, "engine": "llama.cpp", "dtype": dtype,
                                                               "path": str(gguf), "weights": f"gguf {kind}"}, None))
    table: dict[tuple, list[dict]] = {}
    print(f"machine: {os.cpu_count()} cores, shared; load average at start {os.getloadavg()}")
    for r in range(args.rounds):
        bandwidth = measure_bandwidth(args.threads)
        print(f"round {r + 1}: read bandwidth {bandwidth / 1e9:.1f} GB/s, load average {os.getloadavg()[0]:.1f}")
        order = jobs if r % 2 == 0 else jobs[::-1]
        for model, dtype, label, spec, pythonpath in order:
            result = engine(spec, pythonpath)
            if result is None:
                continue
            decode = result.runs[args.ctx][0]["decode_tokens_per_s"]
            per_token = result.bytes_per_token.get(args.ctx)
            if per_token is None and label == "before":  # the before checkout does not count bytes: same weights
                per_token = next((row["bytes"] for key, rows in table.items() for row in rows
                                  if key[:2] == (model, dtype) and key[2] == "after"), None)
            # the bound's bandwidth: the faster of this round's read and the engine's own read after its runs
            reads = [b for b in (bandwidth, result.bandwidth_bytes_per_s) if b]
            share = decode * per_token / max(reads) if per_token and reads else None
            busy = result.runs[args.ctx][0].get("other_cpu_cores")
            table.setdefault((model, dtype, label), []).append(
                {"round": r + 1, "tok_s": decode, "share": share, "bytes": per_token, "kernel": result.kernel,
                 "ttft_s": result.runs[args.ctx][0]["ttft_s"]})
            print(f"  {model} {dtype:4} {label:9} {result.kernel or '-':16} decode {decode:6.2f} tok/s  "
                  f"TTFT {result.runs[args.ctx][0]['ttft_s'] * 1000:6.0f} ms  "
                  f"{'' if share is None else f'{share:.0%} of bound'}"
                  f"{'' if busy is None else f'  (others used {busy:.2f} cores)'}", flush=True)
    print("\nsummary: medians over rounds; ratios are same-round ratios, then their median")
    print("| model | dtype | engine | kernel | decode tok/s (each round) | of bound | vs llama.cpp | vs before |")
    print("|---|---|---|---|---|---|---|---|")
    for (model, dtype, label), rows in table.items():
        def ratio(peer: str):
            if label == peer or label == "llama.cpp" or (peer == "before" and label != "after"):
                return "-"
            peers = {row["round"]: row["tok_s"] for row in table.get((model, dtype, peer), [])}
            values = [row["tok_s"] / peers[row["round"]] for row in rows if row["round"] in peers]
            return f"{statistics.median(values):.2f}x" if values else "-"

        shares = [row["share"] for row in rows if row["share"] is not None]
        each = ", ".join(f"{row['tok_s']:.2f}" for row in rows)
        print(f"| {model} | {dtype} | {label} | {rows[0]['kernel'] or '-'} | "
              f"{statistics.median(row['tok_s'] for row in rows):.2f} ({each}) | "
              f"{f'{statistics.median(shares):.0%}' if shares else '-'} | {ratio('llama.cpp')} | {ratio('before')} |")


if __name__ == "__main__":
    main()
