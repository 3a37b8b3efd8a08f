"""Stage `merge`: merge two specialists (adapters over a base, or full models) with several methods.

    - merge: {base: nano, models: [sft-arithmetic, sft-reverse], methods: [linear, ties, slerp, task_arithmetic],
              tasks: [arithmetic, reverse], n: 50}

Adapters enter the merge as `BASE+ADAPTER` references, applied tensor by tensor (no full model
is written for them). Each method's output is registered
as `merge-<method>`. The report shows every merge's accuracy on each specialist's task and the
fraction of the specialist's accuracy it keeps.

`keep_tasks` adds tasks neither specialist was trained on, so forgetting shows beside the kept skills.
`search: {method: task_arithmetic, trials: 16, n: 50, seed: 1}` also tunes that method's weights (and
densities, or SLERP's t; `layer_groups: 4` gives each a curve across the layers) with merge-search on
validation instances drawn with another seed than the report's. The objective (`objective: kept`, the
default) is the worst kept share: min over the specialists' tasks of accuracy / the specialist's, and
over keep_tasks of accuracy / the base's, all measured on the validation instances, since the point of
a merge is to keep every skill; `objective: mean` maximises the mean accuracy instead. The defaults are
the first trials, and the default-parameter merges of every method are scored on validation too: the
best of all is written and registered as `merge-tuned`, reported beside the default merges.
"""

from __future__ import annotations

from pathlib import Path

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator

from qwenlab.errors import QwenlabError
from qwenlab.recipe.stages.params import StageParams
from qwenlab.stats import format_accuracy

METHODS = ("linear", "slerp", "task_arithmetic", "ties", "regmean", "regmean_sequential")
REGMEAN_DATA_N = 512  # examples per model for regmean's fits (256 kept ~2-4 points less of each skill on nano)
# regmean_sequential's share of the base (measured on keep_tasks) against 1 for each specialist: it only has to
# hold the skills neither specialist touched. 0.05-0.15 kept them at 94-96% of nano's (docs/merge.md).
SEQUENTIAL_BASE_WEIGHT = 0.05


class SearchParams(BaseModel):
    """The tuned merge: merge-search over one method's parameters, on validation instances."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: Literal[METHODS] = "task_arithmetic"
    trials: PositiveInt = 16
    n: PositiveInt = 50
    seed: NonNegativeInt = 1  # validation: other instances than the report's (seed 0 by default)
    sampler: Literal["tpe", "random"] = "tpe"
    objective: Literal["kept", "mean"] = "kept"
    layer_groups: PositiveInt = 1  # > 1: each weight (density, t) becomes a curve of this many points across layers
    # Method parameters set on the best trial's config for the merge that is written, e.g. {distill_steps: 200}:
    # a step too slow to run in every trial. The written merge is measured on validation again.
    refine: dict[str, float | int | bool] = {}

    @model_validator(mode="after")
    def _known_refinements(self):
        from qwenlab.merge.methods import get_method
        from qwenlab.merge.parameters import check_setting

        method = get_method(self.method)
        for name, value in self.refine.items():
            if method.parameter(name) is None:
                raise ValueError(f"refine.{name}: not a parameter of {self.method} "
                                 f"(expected one of: {', '.join(method.parameter_names())})")
            try:  # its type and range, before the search's minutes rather than after them
                check_setting(method.parameter(name), value, f"refine.{name}")
            except QwenlabError as error:
                raise ValueError(str(error)) from None
        return self


class Params(StageParams):
    MODEL_FIELDS = ("base", "models")
    base: str = "nano"
    models: list[str] = Field(min_length=2, max_length=2)  # the two specialists
    tasks: list[str] = Field(min_length=2, max_length=2)  # each specialist's task, in the same order
    keep_tasks: list[str] = []  # other skills the merge should not lose (reported, and in the search objective)
    methods: list[Literal[METHODS]] = ["linear", "ties", "slerp", "task_arithmetic"]
    n: PositiveInt = 50
    seed: NonNegativeInt = 0
    difficulty: PositiveInt | None = None
    search: SearchParams | None = None

    def outputs(self) -> list[str]:
        return [f"merge-{method}" for method in self.methods] + (["merge-tuned"] if self.search else [])


def search_space(method: str, layer_groups: int = 1, keeps: bool = False) -> list[dict]:
    """What merge-search tunes for each method (paths into method_config's config)."""
    groups = {"groups": layer_groups} if layer_groups > 1 else {}
    if method in ("task_arithmetic", "linear"):
        high = 1.5 if method == "task_arithmetic" else 1.0
        return [{"path": f"models[{i}].parameters.weight", "low": 0.0, "high": high, **groups} for i in (0, 1)]
    if method == "ties":
        return [{"path": f"models[{i}].parameters.{name}", "low": low, "high": high, **groups}
                for i in (0, 1) for name, low, high in (("weight", 0.2, 1.5), ("density", 0.1, 1.0))]
    if method == "slerp":  # a curve across the layers even by default
        return [{"path": "parameters.t", "low": 0.0, "high": 1.0, "groups": max(3, layer_groups)}]
    if method == "regmean":  # only the ratios of the weights matter; the base's (keep_tasks) is models[2]
        return [{"path": f"models[{i}].parameters.weight", "low": 0.25, "high": 4.0, **groups} for i in (0, 1)] + \
            ([{"path": "models[2].parameters.weight", "low": 0.0, "high": 1.0, **groups}] if keeps else [])
    if method == "regmean_sequential":  # ratios only: the first specialist's weight stays 1
        return [{"path": "models[1].parameters.weight", "low": 0.5, "high": 4.0, **groups}] + \
            ([{"path": "models[2].parameters.weight", "low": 0.0, "high": 0.3, **groups}] if keeps else [])
    raise QwenlabError(f"merge stage: search: unsupported method '{method}'")


def default_point(method: str, layer_groups: int = 1, keeps: bool = False) -> dict[str, float]:
    """method_config's own parameters, in search_space's names: the search's first trial."""
    from qwenlab.merge.search import get_path

    config = method_config(method, "base", "a", "b", ("a", "b"), ("keep",) if keeps else ())
    point = {}
    for entry in search_space(method, layer_groups, keeps):
        node, key = get_path(config, entry["path"])
        value = node[key]
        groups = entry.get("groups", 1)
        names = [entry["path"]] if groups == 1 else [f"{entry['path']}#{g}" for g in range(groups)]
        point.update({name: value for name in names})
    return point


def method_config(method: str, base: str, a: str, b: str, tasks: tuple = (), keep_tasks: tuple = (),
                  difficulty: int | None = None) -> dict:
    """A mergekit-style config for two specialists over one base (regmean: each measured on its own
    task, and the base, on keep_tasks, as a third input)."""
    if method == "linear":
        return {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 0.5}},
                                                     {"model": b, "parameters": {"weight": 0.5}}]}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": b}],
                "parameters": {"t": 0.5}}
    if method == "task_arithmetic":  # base + delta_a + delta_b: both task vectors at full strength
        return {"merge_method": "task_arithmetic", "base_model": base,
                "models": [{"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 1.0}}]}
    if method == "ties":
        return {"merge_method": "ties", "base_model": base, "parameters": {"normalize": False},
                "models": [{"model": a, "parameters": {"weight": 1.0, "density": 0.5}},
                           {"model": b, "parameters": {"weight": 1.0, "density": 0.5}}]}
    if method in ("regmean", "regmean_sequential"):
        level = {"n": REGMEAN_DATA_N, **({"difficulty": difficulty} if difficulty is not None else {})}
        models = [{"model": m, "parameters": {"weight": 1.0}, "data": {"task": t, **level}}
                  for m, t in zip((a, b), tasks)]
        if keep_tasks:
            weight = SEQUENTIAL_BASE_WEIGHT if method == "regmean_sequential" else 1.0
            models.append({"model": base, "parameters": {"weight": weight}, "data": {"tasks": list(keep_tasks), **level}})
        if method == "regmean":
            return {"merge_method": "regmean", "models": models, "parameters": {"alpha": 1.0}}
        return {"merge_method": "regmean_sequential", "models": models}
    raise QwenlabError(f"merge stage: unsupported method '{method}' ({', '.join(METHODS)})")


def merge_input(ctx, name: str, base_path: str) -> tuple[str, list[str]]:
    """(what the merge config names, adapters to load for evaluation) for a specialist."""
    path = Path(ctx.model_path(name)).resolve()
    if (path / "adapter_config.json").is_file():
        return f"{base_path}+{path}", [str(path)]
    return str(path), []


def _load(reference: str, adapters: list[str], base_path: str):
    from qwenlab.loading import load

    model, tokenizer, _ = load(base_path if adapters else reference, "fp32", adapters)
    return model, tokenizer


def run(ctx, params: Params) -> tuple[dict, str]:
    from qwenlab.eval.task_eval import evaluate_tasks
    from qwenlab.merge import merge

    base, names, tasks, methods = params.base, params.models, params.tasks, params.methods
    keeps = [t for t in params.keep_tasks if t not in tasks]
    n, seed = params.n, params.seed
    base_path = str(Path(ctx.model_path(base)).resolve()) if base != "nano" else str(_nano())
    (a, a_adapters), (b, b_adapters) = (merge_input(ctx, name, base_path) for name in names)
    outputs = {}
    for method in methods:
        config = method_config(method, base_path, a, b, tasks, keeps, params.difficulty)  # unknown: fails before any folder
        out = ctx.new_model_dir(f"merge-{method}", "merge stage: methods")
        merge(config, out, dtype="float32", force=True, progress=False)
        outputs[f"merge-{method}"] = str(out)
    search_text, search_figures = "", None
    if params.search:
        search_figures, search_text = _tuned_merge(ctx, params, base_path, (a, a_adapters), (b, b_adapters), outputs)
    all_tasks = tasks + [t for t in params.keep_tasks if t not in tasks]
    accuracy = {}
    inputs = {base: (base_path, []), names[0]: (a, a_adapters), names[1]: (b, b_adapters),
              **{k: (v, []) for k, v in outputs.items()}}
    for label, (path, adapters) in inputs.items():
        model, tokenizer = _load(path, adapters, base_path)
        results = evaluate_tasks(model, tokenizer, all_tasks, n=n, seed=seed, difficulty=params.difficulty,
                                 progress=False)
        accuracy[label] = {t: round(r.accuracy, 4) for t, r in results.items()}
    specialist = {tasks[0]: accuracy[names[0]][tasks[0]], tasks[1]: accuracy[names[1]][tasks[1]]}
    kept = {m: {t: (round(accuracy[m][t] / specialist[t], 3) if specialist[t] else None) for t in tasks}
            for m in outputs}
    others = [t for t in all_tasks if t not in tasks]
    lines = ["| model | " + " | ".join(all_tasks) + " | kept of specialist (" + ", ".join(tasks) + ")" +
             (f" | kept of {base} ({', '.join(others)})" if others else "") + " |",
             "|---|" + "---:|" * (len(all_tasks) + 1 + bool(others))]
    for label, accs in accuracy.items():
        keep = ", ".join("-" if kept.get(label, {}).get(t) is None else f"{kept[label][t]:.0%}" for t in tasks) \
            if label in kept else "(base)" if label == base else "(specialist)"
        row = f"| {label} | " + " | ".join(format_accuracy(accs[t], n) for t in all_tasks) + f" | {keep} |"
        if others:
            row += " " + ", ".join(f"{accs[t] / accuracy[base][t]:.0%}" if accuracy[base][t] else "-"
                                   for t in others) + " |"
        lines.append(row)
    table = "\n".join(lines)
    print(table)
    section = (f"## Merging the specialists\n\n{names[0]} ({tasks[0]}) and {names[1]} ({tasks[1]}) merged with "
               f"{', '.join(methods)}{' and a tuned ' + params.search.method if params.search else ''}; greedy, "
               f"{n} instances per task, seed {seed}; brackets: 95% Wilson interval.\n\n{table}{search_text}")
    return {"accuracy": accuracy, "kept": kept, "outputs": outputs, "search": search_figures}, section


def _tuned_merge(ctx, params: Params, base_path: str, a: tuple, b: tuple, outputs: dict) -> tuple[dict, str]:
    """merge-search on validation instances, then the best config (or default merge) written as merge-tuned."""
    import shutil

    from qwenlab.eval.task_eval import evaluate_tasks
    from qwenlab.merge import merge
    from qwenlab.merge.search import describe_objective, load_search_config, run_search, score_trial

    search = params.search
    if search.seed == params.seed:
        raise QwenlabError(f"merge stage: search.seed must differ from the report's seed ({params.seed}): "
                           "tuning on the instances that are then reported would overstate the merge")
    keeps = [t for t in params.keep_tasks if t not in params.tasks]
    tasks = params.tasks + keeps

    def validation(path: str, adapters: list[str]) -> dict[str, float]:
        model, tokenizer = _load(path, adapters, base_path)
        results = evaluate_tasks(model, tokenizer, tasks, n=search.n, seed=search.seed,
                                 difficulty=params.difficulty, progress=False)
        return {t: round(r.accuracy, 4) for t, r in results.items()}

    reference = None
    if search.objective == "kept":  # what each task's accuracy should be kept from, on the same instances
        base_scores, own = validation(base_path, []), [validation(*a), validation(*b)]
        reference = {t: own[params.tasks.index(t)][t] if t in params.tasks else base_scores[t] for t in tasks}
        reference = {t: v for t, v in reference.items() if v > 0} or None  # a skill at 0 has nothing to keep
    objective = list(reference) if reference else tasks
    config = load_search_config({
        "merge": {**method_config(search.method, base_path, a[0], b[0], params.tasks, keeps, params.difficulty),
                  "dtype": "float32"},
        "search": search_space(search.method, search.layer_groups, bool(keeps)),
        "objective": {"tasks": objective, "n": search.n, "difficulty": params.difficulty,
                      **({"reference": reference} if reference else {})},
        "trials": search.trials, "sampler": search.sampler, "seed": search.seed}, source="merge stage: search")
    # The method's defaults go first; every default merge is scored on validation too, so merge-tuned is
    # never worse on validation than any default-parameter merge.
    result = run_search(config, ctx.run_dir / "merge-search", progress=True,
                        first_trials=[default_point(search.method, search.layer_groups, bool(keeps))])
    best = result["best"]
    defaults = {}
    for label, path in outputs.items():
        scores = validation(path, [])
        defaults[label] = {"tasks": {t: scores[t] for t in objective},
                           "objective": round(score_trial({t: scores[t] for t in objective}, reference), 4)}
    out = ctx.new_model_dir("merge-tuned", "merge stage: search")
    chosen_config, score, refined = best["config"], best["objective"], None
    if search.refine:  # the best trial's config, with the refinement: written, then measured on validation again
        chosen_config = {**best["config"], "parameters": {**(best["config"].get("parameters") or {}), **search.refine}}
        merge(chosen_config, out, dtype="float32", force=True, progress=True, seed=search.seed)
        scores = validation(str(out), [])
        refined = {"tasks": {t: scores[t] for t in objective},
                   "objective": round(score_trial({t: scores[t] for t in objective}, reference), 4)}
        score = refined["objective"]
    winner = max(defaults, key=lambda k: defaults[k]["objective"], default=None)
    from_default = winner is not None and defaults[winner]["objective"] > score
    if from_default:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(outputs[winner], out)
        score = defaults[winner]["objective"]
    elif refined is None:
        merge(chosen_config, out, dtype="float32", force=True, progress=False, seed=search.seed)
    outputs["merge-tuned"] = str(out)
    shown = ", ".join(f"{k} = {v:.3f}" for k, v in best["params"].items())
    then = ", ".join(f"{k} = {v}" for k, v in search.refine.items())
    found = (f"{search.method} with {shown}, the best of {search.trials} trials of merge-search (Optuna "
             f"{search.sampler}, {best['objective']:.3f} there)" + (f", then {then}" if refined else ""))
    chosen = (f"{winner} (a default merge, which beat {found}, there)" if from_default else found)
    against = ", ".join(f"{k} {v['objective']:.3f}" for k, v in defaults.items())
    text = (f"\n\nmerge-tuned: {chosen}. Objective on validation instances (seed {search.seed}, n={search.n} per "
            f"task): {describe_objective(config)}: {score:.3f}, against the default merges' {against}. The table "
            f"above measures it on the report's instances (seed {params.seed}). Trials: "
            "[merge-search/report.md](merge-search/report.md).")
    return {"method": winner if from_default else search.method, "params": {} if from_default else best["params"],
            "refine": {} if from_default else dict(search.refine), "best_trial_objective": best["objective"],
            "refined_on_validation": refined, "validation_objective": score, "objective": search.objective,
            "reference": reference, "defaults_on_validation": defaults, "trials": search.trials, "seed": search.seed,
            "n": search.n}, text


def _nano() -> Path:
    from qwenlab.checkpoint.reader import resolve_model_path

    return resolve_model_path("nano")
