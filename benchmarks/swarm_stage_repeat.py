"""Run the built-in recipe's swarm stage several times on one starting adapter: is its gain reliable?

    python benchmarks/swarm_stage_repeat.py --adapter qwenlab-runs/<run>/models/sft-arithmetic --runs 3

The stage's parameters are read from the built-in recipe (qwenlab/recipe/builtin/nano.yaml), so this
measures exactly what `qwenlab run` does; each run gets its own folder under --out. Prints, per run,
the accuracy before/after (evaluation seed 0), the snapshot chosen and every snapshot's validation
accuracy (evaluation seed 1).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from qwenlab.recipe.context import RunContext
from qwenlab.recipe.stages import STAGES

RECIPE = Path(__file__).resolve().parents[1] / "qwenlab" / "recipe" / "builtin" / "nano.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="the starting adapter (the recipe's sft-arithmetic)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default="/tmp/qwenlab-swarm-stage-runs")
    args = parser.parse_args()
    stages = yaml.safe_load(RECIPE.read_text())["stages"]
    params = next(stage["swarm"] for stage in stages if "swarm" in stage)
    params = {**params, "adapter": str(Path(args.adapter).resolve())}
    results = []
    for run in range(args.runs):
        started = time.time()
        ctx = RunContext(run_dir=Path(args.out) / f"run{run}", models={})
        figures, _ = STAGES["swarm"](ctx, params)
        results.append(figures)
        print(json.dumps({"run": run, "seconds": round(time.time() - started),
                          **{k: figures[k] for k in ("accuracy_before", "accuracy_after", "chosen", "validation")}}),
              flush=True)
    gains = [f["accuracy_after"] - f["accuracy_before"] for f in results]
    print(f"gain per run: {', '.join(f'{g:+.3f}' for g in gains)}; improved in {sum(g > 0 for g in gains)} of {len(gains)}")


if __name__ == "__main__":  # the stage starts peer processes with multiprocessing's spawn
    main()
