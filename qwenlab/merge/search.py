"""`qwenlab merge-search`: tune merge parameters against task accuracy with Optuna, without writing models.

A search file names a mergekit config, the parameters to tune and the objective:

    merge:                       # any config `qwenlab merge` accepts
      merge_method: slerp
      base_model: models/a
      models: [{model: models/a}, {model: models/b}]
      parameters: {t: 0.5}
      dtype: float32
    search:                      # a path into `merge`, its range; optional groups, step, filter
      - {path: parameters.t, low: 0.0, high: 1.0, groups: 3}   # 3 values: a gradient across layers
      - {path: "models[1].parameters.density", low: 0.1, high: 1.0}
    objective: {tasks: [arithmetic, reverse], n: 20, seed: 0}
    trials: 20
    sampler: tpe                 # tpe (default) or random
    seed: 0

`objective.reference: {arithmetic: 0.52, reverse: 0.91}` (each task's accuracy in the model the merge
should keep it from, e.g. its specialist) maximises the worst kept share instead: min over tasks of
accuracy / reference, so a merge that keeps 90% of both skills beats one that keeps 100% of one and none
of the other, which the mean would prefer when one task scores lower.

Each trial merges every tensor in memory with the merge library's own per-tensor function (the
same plan and arithmetic as `qwenlab merge`), copies the result into one model core instance
allocated once, and measures greedy task accuracy. Optuna's sampler maximises the mean accuracy;
the Pareto front is taken over the per-task accuracies (and the mean density, lower is better,
when densities are searched), so trade-offs between tasks are visible, not averaged away.
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from qwenlab.errors import QwenlabError
from qwenlab.yaml_file import read_yaml

_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


@dataclass
class SearchSpace:
    path: str
    low: float
    high: float
    groups: int = 1
    step: float | None = None
    filter: str | None = None

    def names(self) -> list[str]:
        base = self.path + (f"[{self.filter}]" if self.filter else "")
        return [base] if self.groups == 1 else [f"{base}#{g}" for g in range(self.groups)]


@dataclass
class SearchConfig:
    merge: dict
    space: list[SearchSpace]
    tasks: list[str]
    n: int = 20
    seed: int = 0
    difficulty: int | None = None
    reference: dict[str, float] | None = None  # per task: the accuracy to keep (objective: worst kept share)
    trials: int = 20
    sampler: str = "tpe"
    dtype: str = "fp32"
    source: str = "search config"


@dataclass
class Trial:
    trial: int
    params: dict[str, float]
    tasks: dict[str, float] = field(default_factory=dict)
    objective: float | None = None
    mean_density: float | None = None
    seconds: float = 0.0
    mean_accuracy: float | None = None

    def as_dict(self) -> dict:
        return {"trial": self.trial, "params": self.params, "tasks": self.tasks, "objective": self.objective,
                "mean_accuracy": self.mean_accuracy, "mean_density": self.mean_density, "seconds": round(self.seconds, 2)}


# ---- the search file ----------------------------------------------------------------------


def load_search_config(path: str | Path | dict, **overrides) -> SearchConfig:
    source = str(path) if not isinstance(path, dict) else "search config"
    if isinstance(path, dict):
        data = path
    else:
        data = read_yaml(path, "search config file")
    if not isinstance(data, dict) or not isinstance(data.get("merge"), dict):
        raise QwenlabError(f"{source}: expected a mapping with 'merge' (a merge config), 'search' and 'objective'")
    unknown = set(data) - {"merge", "search", "objective", "trials", "sampler", "seed", "dtype"}
    if unknown:
        raise QwenlabError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")
    entries = data.get("search")
    if not isinstance(entries, list) or not entries:
        raise QwenlabError(f"{source}: 'search' must list at least one {{path, low, high}} entry")
    space = []
    for i, entry in enumerate(entries):
        where = f"{source}: search[{i}]"
        if not isinstance(entry, dict) or set(entry) - {"path", "low", "high", "groups", "step", "filter"}:
            raise QwenlabError(f"{where}: expected {{path, low, high}} with optional groups, step, filter")
        for key in ("path", "low", "high"):
            if key not in entry:
                raise QwenlabError(f"{where}.{key}: required key is missing")
        if not _finite(entry["low"]) or not _finite(entry["high"]) or entry["low"] >= entry["high"]:
            raise QwenlabError(f"{where}: need numbers low < high, got {entry['low']!r}, {entry['high']!r}")
        step = entry.get("step")
        if step is not None and (not _finite(step) or not 0 < step <= entry["high"] - entry["low"]):
            raise QwenlabError(f"{where}.step: expected a number in (0, high - low], got {step!r}")
        if entry.get("filter") is not None and not isinstance(entry["filter"], str):
            raise QwenlabError(f"{where}.filter: expected a tensor-name substring, got {entry['filter']!r}")
        groups = entry.get("groups", 1)
        if not isinstance(groups, int) or groups < 1:
            raise QwenlabError(f"{where}.groups: expected a positive integer, got {groups!r}")
        get_path(data["merge"], str(entry["path"]), where, create=True)  # the path must be reachable
        space.append(SearchSpace(str(entry["path"]), float(entry["low"]), float(entry["high"]), groups,
                                 entry.get("step"), entry.get("filter")))
    objective = data.get("objective") or {}
    if not isinstance(objective, dict):
        raise QwenlabError(f"{source}: 'objective' must be a mapping (tasks, n, seed, difficulty, reference)")
    unknown = set(objective) - {"tasks", "n", "seed", "difficulty", "reference"}
    if unknown:
        raise QwenlabError(f"{source}: objective: unknown key(s) {', '.join(sorted(unknown))} "
                           "(tasks, n, seed, difficulty, reference)")
    tasks = objective.get("tasks") or []
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise QwenlabError(f"{source}: objective.tasks: expected a list of task names, got {tasks!r}")
    config = SearchConfig(merge=data["merge"], space=space, tasks=list(tasks),
                          n=_integer(objective.get("n", 20), f"{source}: objective.n"),
                          seed=_integer(data.get("seed", objective.get("seed", 0)), f"{source}: seed"),
                          difficulty=objective.get("difficulty"),
                          reference=_reference(objective.get("reference"), f"{source}: objective.reference"),
                          trials=_integer(data.get("trials", 20), f"{source}: trials"),
                          sampler=str(data.get("sampler", "tpe")), dtype=str(data.get("dtype", "fp32")), source=source)
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    if not config.tasks:
        from qwenlab.tasks import TASKS

        config.tasks = list(TASKS)
    if config.sampler not in ("tpe", "random"):
        raise QwenlabError(f"{source}: sampler must be tpe or random, got {config.sampler!r}")
    if config.trials < 1 or config.n < 1:
        raise QwenlabError(f"{source}: trials and n must be positive")
    if config.seed < 0:
        raise QwenlabError(f"{source}: seed must be >= 0, got {config.seed}")
    if config.reference is not None and set(config.reference) != set(config.tasks):
        raise QwenlabError(f"{source}: objective.reference must give one accuracy per objective task "
                           f"({', '.join(config.tasks)}), got {', '.join(config.reference) or 'none'}")
    _check_objective(config)
    return config


def _reference(value, where: str) -> dict[str, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise QwenlabError(f"{where}: expected a mapping of task name to the accuracy to keep, got {value!r}")
    for task, accuracy in value.items():
        if not _finite(accuracy) or not 0 < accuracy <= 1:
            raise QwenlabError(f"{where}.{task}: expected an accuracy in (0, 1] (a task its model never solves "
                               f"has nothing to keep), got {accuracy!r}")
    return {str(k): float(v) for k, v in value.items()}


def score_trial(tasks: dict[str, float], reference: dict[str, float] | None) -> float:
    """The objective: mean accuracy, or with a reference the worst kept share (accuracy / reference)."""
    if reference is None:
        return sum(tasks.values()) / len(tasks)
    return min(tasks[t] / reference[t] for t in reference)


def describe_objective(config: SearchConfig) -> str:
    where = f"(n={config.n}, seed={config.seed})"
    if config.reference is None:
        return f"mean greedy accuracy over {', '.join(config.tasks)} {where}"
    kept = ", ".join(f"{t} / {config.reference[t]:.3f}" for t in config.tasks)
    return f"worst kept share of greedy accuracy, min({kept}) {where}"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _storage_errors() -> tuple[type[Exception], ...]:
    try:
        from sqlalchemy.exc import SQLAlchemyError  # Optuna's RDB storage
    except ImportError:
        return (ValueError,)
    return (ValueError, SQLAlchemyError)


def _integer(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise QwenlabError(f"{where}: expected an integer, got {value!r}")
    return value


def _check_objective(config: SearchConfig) -> None:
    """Unknown tasks or difficulties fail here, before the first trial (Optuna would log each failure)."""
    from qwenlab.tasks import generate

    for task in config.tasks:
        generate(task, 0, config.difficulty)  # raises naming the task or the difficulty


def _parts(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for name, index in _PART.findall(path):
        parts.append(int(index) if index else name)
    return parts


def get_path(data: dict, path: str, where: str = "", create: bool = False):
    """The value at `path` (e.g. models[1].parameters.weight); with create, missing mappings are made."""
    node = data
    parts = _parts(path)
    for depth, part in enumerate(parts[:-1]):
        try:
            nxt = node[part]
        except (KeyError, IndexError, TypeError):
            if create and isinstance(part, str) and isinstance(node, dict):
                nxt = node[part] = {}
            else:
                raise QwenlabError(f"{where or 'search'}: path '{path}' does not exist in the merge config "
                                   f"(no '{part}' at {'.'.join(map(str, parts[:depth])) or 'the top'})") from None
        if nxt is None and create:
            nxt = node[part] = {}
        node = nxt
    return node, parts[-1]


def set_path(data: dict, path: str, value, filter_name: str | None = None) -> None:
    node, last = get_path(data, path, create=True)
    if filter_name is None:
        node[last] = value
        return
    current = node.get(last) if isinstance(node, dict) else None
    conditional = isinstance(current, list) and current and all(isinstance(e, dict) and "value" in e for e in current)
    entries = list(current) if conditional else ([{"value": current}] if current is not None else [])
    entries = [e for e in entries if e.get("filter") != filter_name]
    node[last] = [{"filter": filter_name, "value": value}] + entries  # filtered values before the fallback


def apply_params(merge: dict, space: list[SearchSpace], params: dict[str, float]) -> dict:
    """The merge config with the trial's values put in (groups become a gradient list)."""
    config = copy.deepcopy(merge)
    for item in space:
        values = [params[name] for name in item.names()]
        set_path(config, item.path, values[0] if item.groups == 1 else values, item.filter)
    return config


def mean_density(space: list[SearchSpace], params: dict[str, float]) -> float | None:
    values = [params[n] for s in space if s.path.split(".")[-1] == "density" for n in s.names()]
    return sum(values) / len(values) if values else None


# ---- evaluation in memory -----------------------------------------------------------------


class InMemoryMerger:
    """Merge tensors with the merge library into one preallocated model core (no folder is written)."""

    def __init__(self, merge_config: dict, dtype: str = "fp32"):
        from qwenlab.merge import plan_merge
        from qwenlab.model.load import parse_dtype
        from qwenlab.merge.activations import empty_model
        from qwenlab.model.tokenizer import load_tokenizer

        plan, self.sources = plan_merge(merge_config)
        self.dtype = parse_dtype(dtype)
        self.model = empty_model(plan.output_config, self.dtype).eval().requires_grad_(False)
        self.state = self.model.state_dict()
        donor = plan.config.base_model or plan.config.model_paths()[0]
        tokenizer_source = plan.config.tokenizer_source
        if tokenizer_source and tokenizer_source not in ("base", "union"):
            donor = tokenizer_source
        self.tokenizer = load_tokenizer(self.sources[donor].path)
        self._open_sources = lambda path: self.sources[path]

    @torch.no_grad()
    def load(self, merge_config: dict, seed: int = 0) -> None:
        # The executor's own per-tensor step (not yet exported by qwenlab.merge; see docs/measure.md).
        from qwenlab.merge import executor, plan_merge

        plan, _ = plan_merge(merge_config, open_model=self._open_sources)
        load_dtype = executor.parse_dtype(plan.config.dtype, "dtype")
        written = set()
        for planned in plan.tensors:
            if planned.name not in self.state:
                continue  # e.g. a tied lm_head stored anyway
            merged = executor.merge_tensor(plan, planned, self.sources, load_dtype=load_dtype, out_dtype=self.dtype,
                                           seed=seed)
            getattr(executor, "release_inputs", lambda sources: None)(self.sources)
            target = self.state[planned.name]
            if tuple(merged.shape) != tuple(target.shape):
                raise QwenlabError(f"merge search: tensor '{planned.name}' changed shape between trials; "
                                   "search parameters, not the layer structure")
            target.copy_(merged.to(target.dtype))
            written.add(planned.name)
        missing = set(self.state) - written
        if missing:
            raise QwenlabError(f"merge search: the merge plan does not produce {sorted(missing)[0]}")

    def close(self) -> None:
        for source in self.sources.values():
            getattr(source, "close", lambda: None)()


def evaluate_trial(merger: InMemoryMerger, config: SearchConfig, merge_config: dict) -> dict[str, float]:
    from qwenlab.eval.task_eval import evaluate_tasks

    merger.load(merge_config, seed=config.seed)
    results = evaluate_tasks(merger.model, merger.tokenizer, config.tasks, n=config.n, seed=config.seed,
                             difficulty=config.difficulty, progress=False)
    return {task: round(r.accuracy, 4) for task, r in results.items()}


# ---- the search ---------------------------------------------------------------------------


def pareto_front(trials: list[Trial], tasks: list[str]) -> list[Trial]:
    """Trials no other trial beats on every axis (each task's accuracy up; mean density down)."""
    done = [t for t in trials if t.objective is not None]

    def axes(t: Trial) -> list[float]:
        values = [t.tasks[k] for k in tasks]
        return values + ([-t.mean_density] if t.mean_density is not None else [])

    front = []
    for t in done:
        a = axes(t)
        dominated = any(all(x >= y for x, y in zip(axes(o), a)) and any(x > y for x, y in zip(axes(o), a))
                        for o in done if o is not t)
        if not dominated:
            front.append(t)
    unique: dict[tuple, Trial] = {}
    for t in front:  # equal figures: keep the first trial that reached them
        unique.setdefault(tuple(axes(t)), t)
    return sorted(unique.values(), key=lambda t: -(t.objective or 0))


def run_search(config: SearchConfig, out: str | Path | None = None, *, progress: bool = True,
               storage: str | None = None, study_name: str | None = None,
               first_trials: list[dict[str, float]] = ()) -> dict:
    """Run the Optuna study; returns (and writes into `out`) merge_search.json's content.

    first_trials: parameter sets tried before the sampler's own (e.g. the method's defaults, so the
    best found is never worse than them on the objective's instances)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    midpoints = {n: (s.low + s.high) / 2 for s in config.space for n in s.names()}
    merger = InMemoryMerger(apply_params(config.merge, config.space, midpoints), config.dtype)
    sampler = optuna.samplers.TPESampler(seed=config.seed) if config.sampler == "tpe" else \
        optuna.samplers.RandomSampler(seed=config.seed)
    try:
        study = optuna.create_study(direction="maximize", sampler=sampler, storage=storage, study_name=study_name,
                                    load_if_exists=bool(storage))
    except _storage_errors() as e:  # a bad URL, a database that cannot be opened
        raise QwenlabError(f"--storage {storage}: cannot open the study ({str(e).splitlines()[0]})") from None
    trials: list[Trial] = []
    for params in first_trials:
        study.enqueue_trial(params)

    def objective(trial: optuna.Trial) -> float:
        started = time.time()
        params = {}
        for item in config.space:
            for name in item.names():
                params[name] = trial.suggest_float(name, item.low, item.high, step=item.step)
        tasks = evaluate_trial(merger, config, apply_params(config.merge, config.space, params))
        record = Trial(trial.number, params, tasks, score_trial(tasks, config.reference),
                       mean_density(config.space, params), time.time() - started,
                       mean_accuracy=sum(tasks.values()) / len(tasks))
        trials.append(record)
        trial.set_user_attr("tasks", tasks)
        if progress:
            shown = ", ".join(f"{k}={v:.3f}" for k, v in params.items())
            what = "mean accuracy" if config.reference is None else "worst kept share"
            print(f"  trial {trial.number:3d}: {what} {record.objective:.3f}  ({shown})", flush=True)
        return record.objective

    try:
        study.optimize(objective, n_trials=config.trials)
    finally:
        merger.close()
    best = max(trials, key=lambda t: (t.objective, t.mean_accuracy, -(t.mean_density or 0), -t.trial))
    front = pareto_front(trials, config.tasks)
    result = {
        "method": config.merge.get("merge_method"), "source": config.source,
        "objective": describe_objective(config), "reference": config.reference,
        "sampler": f"optuna {optuna.__version__} {config.sampler} (seed {config.seed})", "tasks": config.tasks,
        "n": config.n, "seed": config.seed, "space": [vars(s) for s in config.space],
        "trials": [t.as_dict() for t in trials],
        "best": {**best.as_dict(), "config": apply_params(config.merge, config.space, best.params)},
        "pareto": [{"trial": t.trial, "params": t.params,
                    "objectives": {**{f"acc:{k}": t.tasks[k] for k in config.tasks}, "mean acc": t.mean_accuracy,
                                   **({"worst kept": t.objective} if config.reference is not None else {}),
                                   **({"mean density": t.mean_density} if t.mean_density is not None else {})}}
                   for t in front],
    }
    if out is not None:
        write_search_outputs(result, Path(out))
    return result


def write_search_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "merge_search.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "best.yaml").write_text(yaml.safe_dump(result["best"]["config"], sort_keys=False))
    (out / "report.md").write_text(search_report(result))


def search_report(result: dict) -> str:
    from qwenlab.report.compare import search_summary, search_table

    best = result["best"]
    tasks = ", ".join(f"{k} {v:.3f}" for k, v in best["tasks"].items())
    return "\n\n".join([
        f"# Merge search: {result['method']}", search_summary(result),
        f"Best trial {best['trial']}: {'mean accuracy' if result.get('reference') is None else 'worst kept share'} "
        f"{best['objective']:.3f} ({tasks}). Config (best.yaml):",
        "```yaml\n" + yaml.safe_dump(best["config"], sort_keys=False).strip() + "\n```",
        "## Pareto front", "Trials that no other trial beats on every task" +
        (" and on mean density" if any("mean density" in p["objectives"] for p in result["pareto"]) else "") + ".",
        search_table(result), "Accuracy is measured on the same seeded instances for every trial; with n="
        f"{result['n']} per task, one standard error is up to {math.sqrt(0.25 / result['n']):.3f}.",
    ]) + "\n"


def write_best(result: dict, out: str | Path, *, force: bool = False, dtype: str = "fp32") -> Path:
    """Write the best config as a real model folder, then measure and record its accuracy there."""
    from qwenlab.variants.listing import load_variant
    from qwenlab.variants.results import record_accuracy
    from qwenlab.eval.task_eval import evaluate_tasks
    from qwenlab.merge import merge

    folder = merge(result["best"]["config"], out, force=force, progress=False, seed=result["seed"])
    model, tokenizer, _ = load_variant(folder, dtype)
    results = evaluate_tasks(model, tokenizer, result["tasks"], n=result["n"], seed=result["seed"], progress=False)
    record_accuracy(folder, results, seed=result["seed"], dtype=dtype)
    return Path(folder)
