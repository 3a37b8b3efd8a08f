"""Stage `compare`: every variant of the run in one table, plots and a recommendation.

    - compare: {models: [nano, sft-math, merged, merged-int4], tasks: [arithmetic, reverse], n: 50}

models: names known to the run (default: all of them). With `tasks`, accuracy is measured and
recorded for each variant that has no figure for that task at this n and seed (figures already
recorded, e.g. by `qwenlab eval`, are reused). Optional: seed, difficulty, dtype, perplexity
(a text/JSONL file measured the same way), title. Speed comes from `qwenlab bench` records.
Writes variants.json (so `qwenlab compare RUN` finds the same models) and compare/ (or LABEL/) in the run
folder: compare.md, compare.html, compare.json and the plots.
"""

from __future__ import annotations

import json
from pathlib import Path

from typing import Literal

from pydantic import NonNegativeInt, PositiveInt

from qwenlab.errors import QwenlabError
from qwenlab.recipe.stages.params import StageParams


class Params(StageParams):
    MODEL_FIELDS = ("models",)
    models: list[str] | None = None  # default: every model of the run
    tasks: list[str] = []
    n: PositiveInt = 50
    seed: NonNegativeInt = 0
    difficulty: PositiveInt | None = None
    dtype: Literal["fp32", "bf16"] = "fp32"
    perplexity: str | None = None  # a text/JSONL file measured the same way
    title: str = "All variants: quality, speed, size"


def run_variants(ctx, params: Params) -> dict[str, str]:
    """name -> folder for the stage's `models` (default: every model of the run), saved as variants.json."""
    from qwenlab.checkpoint.reader import resolve_model_path
    from qwenlab.checkpoint.writer import write_text_atomic

    names = params.models or list(ctx.models)
    if not names:
        raise QwenlabError("compare stage: no models to compare (give 'models' or define some in the recipe)")
    variants = {name: str(resolve_model_path(ctx.model_path(name)).resolve()) for name in names}
    path = ctx.run_dir / "variants.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    write_text_atomic(path, json.dumps({**known, **variants}, indent=2) + "\n")  # never half-written
    return variants


def measure_missing(variants: dict[str, str], params: Params) -> list[str]:
    """Measure and record accuracy (and perplexity) where no matching figure is recorded; returns what ran."""
    from qwenlab.variants.listing import load_variant
    from qwenlab.variants.results import latest, record_accuracy, record_measurement
    from qwenlab.eval.task_eval import evaluate_tasks

    tasks, n, seed, dtype, perplexity_file = params.tasks, params.n, params.seed, params.dtype, params.perplexity
    measured = []
    for name, folder in variants.items():
        accuracy = latest(folder, "accuracy")
        missing = [t for t in tasks if t not in accuracy or accuracy[t].values.get("n") != n
                   or accuracy[t].values.get("seed") != seed]
        need_ppl = perplexity_file and Path(perplexity_file).name not in latest(folder, "perplexity")
        if not missing and not need_ppl:
            continue
        model, tokenizer, _ = load_variant(folder, dtype)
        if missing:
            results = evaluate_tasks(model, tokenizer, missing, n=n, seed=seed, difficulty=params.difficulty,
                                     progress=False)
            record_accuracy(folder, results, seed=seed, difficulty=params.difficulty, dtype=dtype)
            measured.append(f"{name}: accuracy on {', '.join(missing)}")
        if need_ppl:
            from qwenlab.eval.perplexity import evaluate_perplexity, read_documents

            result = evaluate_perplexity(model, tokenizer, read_documents(perplexity_file), progress=False,
                                         source=str(perplexity_file))
            figures = result.as_dict()
            record_measurement(folder, "perplexity", {Path(perplexity_file).name: {
                k: figures[k] for k in ("perplexity", "bits_per_byte", "word_perplexity", "tokens", "max_length",
                                        "stride")}}, setup={"dtype": dtype, "file": str(perplexity_file)})
            measured.append(f"{name}: perplexity on {Path(perplexity_file).name}")
    return measured


def run(ctx, params: Params) -> tuple[dict, str]:
    from qwenlab.report.compare import comparison_markdown, main_table, write_comparison

    variants = run_variants(ctx, params)
    measured = measure_missing(variants, params)
    title = params.title
    folder = params.label or "compare"  # two compare stages write two folders
    comparison, _ = write_comparison(list(variants.values()), ctx.run_dir / folder, title=title,
                                     names={path: name for name, path in variants.items()})
    print(main_table(comparison, markdown=False))
    print(comparison.recommendation.replace("**", ""))
    section = comparison_markdown(comparison, comparison.plots, title, heading="##", image_prefix=f"{folder}/")
    if measured:
        section += ("\nMeasured in this stage (recorded in each variant's measurements.jsonl): "
                    + "; ".join(measured) + ".")
    section += f"\nSelf-contained page: [{folder}/compare.html]({folder}/compare.html)."
    figures = {"variants": variants, "recommendation": comparison.recommendation, "measured": measured,
               "rows": [{k: r[k] for k in ("name", "kind", "size_bytes", "parameters", "dtype", "tasks",
                                           "mean_accuracy", "decode_tokens_per_s", "ttft_s", "speed_context")}
                        for r in comparison.rows]}
    return figures, section
