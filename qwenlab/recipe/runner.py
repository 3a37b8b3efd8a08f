"""`qwenlab run [RECIPE.yaml]`: run a YAML list of stages over named models, write report.md.

A recipe:
    name: my-run
    models: {base: nano}          # names for folders; stages may add more (e.g. a merge output)
    stages:
      - info: {model: base}
      - eval: {models: [base], tasks: [arithmetic, reverse], n: 100}

Names (the keys of `models`, a stage's `as` and `label`) become folder names inside the run, so
they are checked here, before anything runs: one plain name each, never a path.

The run folder (--out, or ./qwenlab-runs/<timestamp>) holds a file INCOMPLETE from the start until
the last stage has finished: a run that failed or was interrupted keeps what it measured, marked.
docs/recipes.md has the details.
"""

from __future__ import annotations

import time
from pathlib import Path


from qwenlab.errors import QwenlabError
from qwenlab.variants.listing import INCOMPLETE_MARKER
from qwenlab.yaml_file import read_yaml
from qwenlab.recipe.context import RunContext, check_name
from qwenlab.recipe.stages import STAGES
from qwenlab.recipe.stages.params import validate_params

BUILTIN_RECIPE = Path(__file__).parent / "builtin" / "nano.yaml"
INCOMPLETE = INCOMPLETE_MARKER
NAME_FIELDS = ("as", "label")  # stage parameters that name a folder in the run


def load_recipe(path: str | Path | None) -> dict:
    """The recipe, every stage's parameters validated (its Params) and every model name it uses known."""
    path = Path(path) if path else BUILTIN_RECIPE
    recipe = read_yaml(path, "recipe file")
    if not isinstance(recipe, dict) or not isinstance(recipe.get("stages"), list) or not recipe["stages"]:
        raise QwenlabError(f"{path}: expected a mapping with a non-empty 'stages' list")
    if not isinstance(recipe.get("models") or {}, dict):
        raise QwenlabError(f"{path}: 'models' must map names to folders")
    for name in recipe.get("models") or {}:
        check_name(name, f"{path}: models")
    known = {"nano", *(recipe.get("models") or {})}
    stages = []
    for i, stage in enumerate(recipe["stages"]):
        if not isinstance(stage, dict) or len(stage) != 1:
            raise QwenlabError(f"{path}: stages[{i}] must be a mapping with one stage name, e.g. '- eval: {{...}}'")
        (kind, raw), = stage.items()
        where = f"{path}: stages[{i}].{kind}"
        if kind not in STAGES:
            raise QwenlabError(f"{path}: stages[{i}]: unknown stage '{kind}'; known: {', '.join(STAGES)}")
        for name_field in NAME_FIELDS:  # first: these name folders, whatever else is wrong
            if isinstance(raw, dict) and name_field in raw:
                check_name(raw[name_field], f"{where}.{name_field}")
        params = validate_params(STAGES[kind].Params, raw, where)
        for name in params.model_names():
            if name not in known and not Path(name).is_dir():
                raise QwenlabError(f"{where}: unknown model '{name}'; known: {', '.join(sorted(known))} "
                                   "(or give a model folder)")
        known.update(params.outputs())
        stages.append((kind, params))
    return {**recipe, "stages": stages}


def new_run_dir(out: str | Path | None) -> Path:
    """The run folder, created empty: --out (absent or an empty folder), else a new ./qwenlab-runs/<timestamp>.

    Two runs never share a folder: an explicit --out holding anything is refused, and a second run
    started in the same second gets <timestamp>-2.
    """
    if out:
        run_dir = Path(out)
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise QwenlabError(f"{run_dir}: the run folder exists and is not empty; choose another --out")
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 1000):
        run_dir = Path("qwenlab-runs") / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            run_dir.mkdir(parents=True)  # not exist_ok: whoever creates it owns it
            return run_dir
        except FileExistsError:
            continue
    raise QwenlabError(f"qwenlab-runs/{stamp}: too many runs started this second; use --out")


def run_recipe(path: str | Path | None = None, out: str | Path | None = None) -> RunContext:
    recipe = load_recipe(path)
    run_dir = new_run_dir(out)
    marker = run_dir / INCOMPLETE
    marker.write_text("This run has not finished: it is running, failed or was interrupted.\n"
                      "report.md and figures.json hold the stages that completed.\n")
    ctx = RunContext(run_dir=run_dir, models={k: str(v) for k, v in (recipe.get("models") or {}).items()})
    name = recipe.get("name", Path(path).stem if path else "nano")
    ctx.sections.append(f"# qwenlab run: {name}\n\nStarted {time.strftime('%Y-%m-%d %H:%M:%S')}.")
    started = time.time()
    stages = recipe["stages"]
    for index, stage in enumerate(stages, start=1):
        kind, params = stage
        label = params.label or kind
        print(f"\n[{index}/{len(stages)}] {label}", flush=True)
        stage_started = time.time()
        try:
            figures, section = STAGES[kind].run(ctx, params)
        except BaseException as e:  # also Ctrl-C: say in the report where the run stopped
            _mark_stopped(ctx, f"[{index}/{len(stages)}] {label}", e)
            raise
        figures = {"stage": kind, "seconds": round(time.time() - stage_started, 1), **figures}
        ctx.record(f"{index:02d}-{label}", figures, section)
    ctx.sections.append(f"---\nTotal time: {time.time() - started:.0f} s.")
    ctx.save()
    marker.unlink()
    print(f"\nreport: {run_dir / 'report.md'}")
    return ctx


def _mark_stopped(ctx: RunContext, stage: str, error: BaseException) -> None:
    reason = "interrupted (Ctrl-C)" if isinstance(error, KeyboardInterrupt) else \
        f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    ctx.sections.append(f"---\n**Incomplete run**: stage {stage} {reason}. The stages above completed.")
    try:
        ctx.save()
        (ctx.run_dir / INCOMPLETE).write_text(f"Stopped at stage {stage}: {reason}\n"
                                               "report.md and figures.json hold the stages that completed.\n")
    except OSError:
        pass  # the report is best effort here; the original error matters more
    print(f"\nincomplete run kept in {ctx.run_dir} (marked by {INCOMPLETE}); report: {ctx.run_dir / 'report.md'}",
          flush=True)
