"""Stage `quantize`: int8/int4 variants of a model, their speed (qwenlab bench) and accuracy change.

    - quantize: {model: merge-ties, bits: [8, 4], tasks: [arithmetic, reverse], n: 50, ctx: 128, gen: 32, runs: 2}

`group_size` (default: qwenlab quantize's default per bit width) must divide every linear's input size.

Each variant is registered as `<model>-int<bits>`. Speed is measured for the float model and each
variant in fresh subprocesses (TTFT, decode tokens/s, peak RSS); accuracy on the same seeds.
"""

from __future__ import annotations

from pathlib import Path

from typing import Literal

from pydantic import NonNegativeInt, PositiveInt

from qwenlab.stats import format_accuracy
from qwenlab.recipe.stages.params import StageParams


class Params(StageParams):
    MODEL_FIELDS = ("model",)
    model: str
    bits: list[Literal[8, 4]] = [8, 4]
    tasks: list[str] = ["arithmetic"]
    n: PositiveInt = 50
    seed: NonNegativeInt = 0
    difficulty: PositiveInt | None = None
    ctx: PositiveInt = 128  # prompt tokens for the speed figures
    gen: PositiveInt = 32
    runs: PositiveInt = 2
    group_size: PositiveInt | None = None

    def outputs(self) -> list[str]:
        stem = Path(self.model.rstrip("/")).name
        return [f"{name}-int{bits}" for name in {self.model, stem} for bits in self.bits]


def run(ctx, params: Params) -> tuple[dict, str]:
    from qwenlab.bench.speed import bench_speed
    from qwenlab.eval.task_eval import evaluate_tasks
    from qwenlab.loading import load
    from qwenlab.quant import quantize_model

    name, bits_list, tasks, group_size = params.model, params.bits, params.tasks, params.group_size
    n, seed, ctx_len, gen, runs = params.n, params.seed, params.ctx, params.gen, params.runs
    source = ctx.model_path(name)
    variants = {name: source}
    # `model` may be a folder path rather than a run name: its variants are still named inside the run
    stem = name if name in ctx.models else Path(str(name).rstrip("/")).name
    for bits in bits_list:
        out = ctx.new_model_dir(f"{stem}-int{bits}", "quantize stage: model")
        quantize_model(source, out, bits=bits, group_size=group_size, force=True, progress=False)
        variants[f"{stem}-int{bits}"] = str(out)
    rows, figures = [], {}
    for label, path in variants.items():
        dtype = "fp32" if label == name else f"int{label.rsplit('int', 1)[1]}"
        report = bench_speed(path, dtypes=[dtype], contexts=[ctx_len], gen=gen, runs=runs, log=lambda *_: None)
        result = report.results[0]
        ttft = result.summary(ctx_len, "ttft_s")[0]
        decode = result.summary(ctx_len, "decode_tokens_per_s")[0]
        model, tokenizer, _ = load(path, "fp32")
        accs = {t: round(r.accuracy, 4) for t, r in
                evaluate_tasks(model, tokenizer, tasks, n=n, seed=seed, difficulty=params.difficulty, progress=False).items()}
        figures[label] = {"ttft_s": round(ttft, 4), "decode_tokens_per_s": round(decode, 1),
                          "peak_rss_bytes": result.peak_rss_bytes, "accuracy": accs, "weights": result.weights}
        rows.append(f"| {label} | {result.weights} | {ttft * 1000:.0f} | {decode:.1f} | "
                    f"{result.peak_rss_bytes / 2**20:.0f} | " + " | ".join(format_accuracy(accs[t], n) for t in tasks) + " |")
    header = ["| variant | weights | TTFT ms | decode tok/s | peak RSS MiB | " + " | ".join(tasks) + " |",
              "|---|---|---:|---:|---:|" + "---:|" * len(tasks)]
    table = "\n".join(header + rows)
    print(table)
    return figures, (f"## Quantized variants of {name}\n\nSpeed at a {ctx_len}-token prompt, {gen} new tokens, "
                     f"median of {runs} runs; accuracy greedy on {n} instances per task, seed {seed} (brackets: 95% Wilson "
                     f"interval).\n\n{table}")
