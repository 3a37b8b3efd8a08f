"""Measuring what a comparison lacks: task accuracy (and perplexity) of variants with no matching figure,
recorded in each variant's measurements.jsonl (`qwenlab compare --measure`, the recipe's compare stage)."""

from __future__ import annotations

from pathlib import Path


def measure_missing(variants: dict[str, str], tasks: list[str], *, n: int = 50, seed: int = 0,
                    difficulty: int | None = None, dtype: str = "fp32", perplexity_file: str | None = None) -> list[str]:
    """Measure and record accuracy (and perplexity) of each variant (name -> folder) where no figure for
    these tasks at this n and seed is recorded yet; returns what was measured."""
    from qwenlab.variants.listing import load_variant
    from qwenlab.variants.results import accuracy_figures, accuracy_setting, latest, record_accuracy, \
        record_measurement, rewards_of
    from qwenlab.eval.task_eval import evaluate_tasks
    from qwenlab.tasks.registry import DEFAULT_DIFFICULTY

    # Figures match on the difficulty as run, so the default is resolved per task.
    difficulties = {t: difficulty or DEFAULT_DIFFICULTY.get(t) for t in tasks}
    measured = []
    for name, folder in variants.items():
        accuracy = accuracy_figures(folder)
        # Present: a figure at this setting on at least n instances (its first n are these n: a stable prefix),
        # with its per-instance rewards (older records lack them, and the verdict's paired tests need them).
        missing = [t for t in tasks if not any(accuracy_setting(f) == (difficulties[t], seed) and
                                               (f.values.get("n") or 0) >= n and rewards_of(f) is not None
                                               for f in accuracy.get(t, []))]
        need_ppl = perplexity_file and Path(perplexity_file).name not in latest(folder, "perplexity")
        if not missing and not need_ppl:
            continue
        model, tokenizer, _ = load_variant(folder, dtype)
        if missing:
            results = evaluate_tasks(model, tokenizer, missing, n=n, seed=seed, difficulty=difficulty,
                                     progress=False)
            record_accuracy(folder, results, seed=seed, difficulty=difficulties, dtype=dtype)
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
