"""`qwenlab run [RECIPE.yaml]`: run a YAML list of stages over named models, write report.md.

A recipe:
    name: my-run
    models: {base: nano}          # names for folders; stages may add more (e.g. a merge output)
    stages:
      - info: {model: base}
      - eval: {models: [base], tasks: [arithmetic, reverse], n: 100}
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from qwenlab.errors import QwenlabError
from qwenlab.recipe.context import RunContext
from qwenlab.recipe.stages import STAGES

BUILTIN_RECIPE = Path(__file__).parent / "builtin" / "nano.yaml"


def load_recipe(path: str | Path | None) -> dict:
    path = Path(path) if path else BUILTIN_RECIPE
    if not path.is_file():
        raise QwenlabError(f"{path}: recipe file not found")
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise QwenlabError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("stages"), list) or not recipe["stages"]:
        raise QwenlabError(f"{path}: expected a mapping with a non-empty 'stages' list")
    for i, stage in enumerate(recipe["stages"]):
        if not isinstance(stage, dict) or len(stage) != 1:
            raise QwenlabError(f"{path}: stages[{i}] must be a mapping with one stage name, e.g. '- eval: {{...}}'")
        (kind, params), = stage.items()
        if kind not in STAGES:
            raise QwenlabError(f"{path}: stages[{i}]: unknown stage '{kind}'; known: {', '.join(STAGES)}")
        if params is not None and not isinstance(params, dict):
            raise QwenlabError(f"{path}: stages[{i}].{kind}: expected a mapping of parameters")
    if not isinstance(recipe.get("models", {}), dict):
        raise QwenlabError(f"{path}: 'models' must map names to folders")
    return recipe


def run_recipe(path: str | Path | None = None, out: str | Path | None = None) -> RunContext:
    recipe = load_recipe(path)
    run_dir = Path(out) if out else Path("qwenlab-runs") / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(run_dir=run_dir, models={k: str(v) for k, v in (recipe.get("models") or {}).items()})
    name = recipe.get("name", Path(path).stem if path else "nano")
    ctx.sections.append(f"# qwenlab run: {name}\n\nStarted {time.strftime('%Y-%m-%d %H:%M:%S')}.")
    started = time.time()
    stages = recipe["stages"]
    for index, stage in enumerate(stages, start=1):
        (kind, params), = stage.items()
        params = params or {}
        label = params.get("label", kind)
        print(f"\n[{index}/{len(stages)}] {label}", flush=True)
        stage_started = time.time()
        figures, section = STAGES[kind](ctx, params)
        figures = {"stage": kind, "seconds": round(time.time() - stage_started, 1), **figures}
        ctx.record(f"{index:02d}-{label}", figures, section)
    ctx.sections.append(f"---\nTotal time: {time.time() - started:.0f} s.")
    ctx.save()
    print(f"\nreport: {run_dir / 'report.md'}")
    return ctx
