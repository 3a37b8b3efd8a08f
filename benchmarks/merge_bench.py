"""qwenlab merge vs mergekit on random models with the exact Qwen2.5 shapes: time, peak memory, tensors.

    python benchmarks/merge_bench.py --preset qwen2.5-0.5b --workdir /tmp/merge-bench

Creates three bf16 random models (`qwenlab random PRESET DIR --seed N`), then for each method
runs the same YAML through `mergekit-yaml` (CPU, --lazy-unpickle, no model card) and
`qwenlab merge`, each as a child process measured with os.wait4 (wall time, user+sys CPU time,
peak RSS of that child), and compares the output tensors. Both tools run back to back per
method so that load from other processes on the machine hits them alike; the load average is
printed, and CPU time is the figure least disturbed by it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open


def configs(models: list[Path]) -> dict[str, dict]:
    """The YAML each tool gets (identical for both): the three methods of the issue, and TIES in float32."""
    a, b, c = (str(m) for m in models)
    return {
        "linear": {"merge_method": "linear", "dtype": "bfloat16",
                   "models": [{"model": a, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.3}},
                              {"model": c, "parameters": {"weight": 0.2}}]},
        "slerp": {"merge_method": "slerp", "base_model": a, "dtype": "bfloat16",
                  "models": [{"model": a}, {"model": b}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1, 0.5, 0]},
                                       {"filter": "mlp", "value": [1, 0.5, 0, 0.5, 1]}, {"value": 0.5}]}},
        "ties": {"merge_method": "ties", "base_model": a, "dtype": "bfloat16",
                 "models": [{"model": b, "parameters": {"weight": 0.6, "density": 0.5}},
                            {"model": c, "parameters": {"weight": 0.4, "density": 0.7}}],
                 "parameters": {"normalize": True}},
        # The same TIES merge computed in float32 by both tools and stored as bf16: the like-for-like
        # arithmetic, where the outputs must agree (mergekit's bf16 run above rounds every step).
        "ties_fp32": {"merge_method": "ties", "base_model": a, "dtype": "float32", "out_dtype": "bfloat16",
                      "models": [{"model": b, "parameters": {"weight": 0.6, "density": 0.5}},
                                 {"model": c, "parameters": {"weight": 0.4, "density": 0.7}}],
                      "parameters": {"normalize": True}},
    }


NOTES = """max |diff| and differing: over all output tensors (differing = fraction of entries not bit-equal).
slerp: both tools compute in float32 and round once to bf16; the whole-tensor dot product is summed
  in a different order, so a few entries land one bf16 step apart.
ties: mergekit 0.1.5 runs the TIES arithmetic in the inputs' dtype (bf16 here), qwenlab in float32;
  against mergekit run with dtype: float32 the outputs agree except where magnitudes tie exactly at
  the trim threshold (tests/merge/test_mergekit_parity.py, bf16 test)."""


@dataclass
class Run:
    wall_s: float
    cpu_s: float
    peak_rss_bytes: int


def measure(command: list[str], log: Path) -> Run:
    """Run one child process; its own rusage (os.wait4), not the sum over all children."""
    start = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1"})
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(command)} failed; see {log}")
    return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024)


def tensor_files(folder: Path) -> dict[str, Path]:
    where = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            where.update({name: file for name in f.keys()})
    return where


def compare(ours: Path, theirs: Path) -> tuple[bool, float, float]:
    """(same tensor names, max |difference|, fraction of differing elements), one tensor at a time."""
    mine, other = tensor_files(ours), tensor_files(theirs)
    if set(mine) != set(other):
        return False, float("nan"), float("nan")
    worst, differing, total = 0.0, 0, 0
    for name in mine:
        with safe_open(str(mine[name]), "pt") as f, safe_open(str(other[name]), "pt") as g:
            x, y = f.get_tensor(name), g.get_tensor(name)
        difference = (x.float() - y.float()).abs()
        worst = max(worst, float(difference.max()))
        differing += int(torch.count_nonzero(difference))
        total += difference.numel()
    return True, worst, differing / total


def make_models(preset: str, workdir: Path) -> list[Path]:
    models = []
    for seed in (1, 2, 3):
        folder = workdir / f"{preset}-seed{seed}"
        if not (folder / "config.json").is_file():
            made = subprocess.run([sys.executable, "-m", "qwenlab", "random", preset, str(folder), "--seed", str(seed),
                                   "--dtype", "bf16", "--force"], capture_output=True, text=True)
            if made.returncode != 0:
                sys.exit(made.stderr)
        models.append(folder)
    return models


def warm_page_cache(models: list[Path]) -> None:
    """Read the inputs once so neither tool pays for the first read from disk."""
    for model in models:
        for file in model.glob("*.safetensors"):
            with open(file, "rb") as f:
                while f.read(1 << 26):
                    pass


def bench_method(method: str, config: dict, workdir: Path) -> list[str]:
    config_path = workdir / f"{method}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    out_mergekit, out_qwenlab = workdir / f"out-{method}-mergekit", workdir / f"out-{method}-qwenlab"
    for folder in (out_mergekit, out_qwenlab):
        shutil.rmtree(folder, ignore_errors=True)
    mergekit_yaml = str(Path(sys.executable).parent / "mergekit-yaml")
    theirs = measure([mergekit_yaml, str(config_path), str(out_mergekit), "--lazy-unpickle",
                      "--no-write-model-card", "--quiet"], workdir / f"{method}-mergekit.log")
    ours = measure([sys.executable, "-m", "qwenlab", "merge", str(config_path), str(out_qwenlab)],
                   workdir / f"{method}-qwenlab.log")
    same_names, worst, fraction = compare(out_qwenlab, out_mergekit)
    shutil.rmtree(out_mergekit, ignore_errors=True)
    shutil.rmtree(out_qwenlab, ignore_errors=True)
    gib = 1024**3
    return [method, f"{theirs.wall_s:.1f}", f"{ours.wall_s:.1f}", f"{ours.wall_s / theirs.wall_s:.2f}",
            f"{theirs.cpu_s:.1f}", f"{ours.cpu_s:.1f}", f"{ours.cpu_s / theirs.cpu_s:.2f}",
            f"{theirs.peak_rss_bytes / gib:.2f}", f"{ours.peak_rss_bytes / gib:.2f}",
            f"{ours.peak_rss_bytes / theirs.peak_rss_bytes:.2f}",
            "yes" if same_names else "NO", f"{worst:.2e}", f"{fraction:.2e}"]


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen2.5-1.5b", help="qwen2.5-1.5b (default) or qwen2.5-0.5b (quick)")
    parser.add_argument("--workdir", default="qwenlab-runs/merge-bench", help="models and outputs go here")
    parser.add_argument("--methods", default="linear,slerp,ties,ties_fp32")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    models = make_models(args.preset, workdir)
    warm_page_cache(models)
    print(f"preset {args.preset}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
    header = ["method", "mk wall s", "ql wall s", "wall ratio", "mk cpu s", "ql cpu s", "cpu ratio",
              "mk RSS GiB", "ql RSS GiB", "RSS ratio", "same names", "max |diff|", "differing"]
    rows = [header]
    all_configs = configs(models)
    for method in args.methods.split(","):
        rows.append(bench_method(method, all_configs[method], workdir))
        print(" | ".join(f"{h}: {v}" for h, v in zip(header, rows[-1])), flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.1f} (mk = mergekit, ql = qwenlab; ratio = ql / mk)\n")
    print_table(rows)
    print("\n" + NOTES)


if __name__ == "__main__":
    main()
