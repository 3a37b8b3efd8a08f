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


def _setting(params: Params) -> dict:
    return {"seed": params.seed, **({"difficulty": params.difficulty} if params.difficulty else {})}


def run(ctx, params: Params) -> tuple[dict, str]:
    from qwenlab.report.compare import comparison_markdown, main_table, write_comparison
    from qwenlab.report.measure import measure_missing

    variants = run_variants(ctx, params)
    measured = measure_missing(variants, params.tasks, n=params.n, seed=params.seed, difficulty=params.difficulty,
                               dtype=params.dtype, perplexity_file=params.perplexity)
    title = params.title
    folder = params.label or "compare"  # two compare stages write two folders
    comparison, _ = write_comparison(list(variants.values()), ctx.run_dir / folder, title=title,
                                     names={path: name for name, path in variants.items()},
                                     # only figures measured as this stage measures them (not other cache entries)
                                     accuracy_where=_setting(params) if params.tasks else None)
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
