"""`qwenlab eval`: task accuracy, perplexity, GSM8K-style accuracy and lm-evaluation-harness tasks.

    qwenlab eval MODEL                                  accuracy on every verifiable task
    qwenlab eval MODEL --perplexity data.txt --stride 256
    qwenlab eval MODEL --gsm8k gsm8k.jsonl --fewshot 2 --limit 100
    qwenlab eval MODEL --lm-eval my_task --include-path tasks/ --adapter runs/math

MODEL is a model folder, 'nano', a quantized folder or an adapter folder (over its base). The
figures are recorded in the variant's measurements.jsonl (see qwenlab.variants.results) unless
--no-record, so `qwenlab ls`, `compare` and `card` find them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qwenlab.tasks.registry import TASKS


def _task_list(text: str | None) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


def cmd_eval(args) -> int:
    from qwenlab.variants.listing import load_variant
    from qwenlab.tasks import generate

    file_modes = bool(args.perplexity or args.gsm8k or args.lm_eval)
    tasks = _task_list(args.tasks) if args.tasks else ([] if file_modes else list(TASKS))
    for task in tasks:
        generate(task, 0, args.difficulty)  # an unknown name or difficulty fails before the model loads
    model, tokenizer, variant = load_variant(args.model, args.dtype, adapters=args.adapter)
    report: dict = {"model": str(variant.path), "seed": args.seed}
    texts: list[str] = []
    records: list[tuple[str, dict, dict]] = []  # (kind, figures, setup)
    if tasks:
        _eval_tasks(args, model, tokenizer, variant, tasks, report, texts, records)
    for path in args.perplexity:
        _eval_perplexity(args, model, tokenizer, Path(path), report, texts, records)
    if args.gsm8k:
        _eval_gsm8k(args, model, tokenizer, Path(args.gsm8k), report, texts, records)
    if args.lm_eval:
        _eval_lm_eval(args, model, tokenizer, variant, report, texts, records)
    if args.record and len(args.adapter) > 1:
        print("note: figures of several stacked adapters are not recorded (no one folder is that variant)",
              file=sys.stderr)
    elif args.record:
        from qwenlab.variants.results import record_measurement

        # A quantized folder runs in its own format whatever --dtype says.
        dtype = variant.dtype if variant.kind == "quantized" else args.dtype
        setup_common = {"dtype": dtype, **({"adapter": str(args.adapter[0])} if args.adapter else {})}
        for kind, figures, setup in records:
            written = record_measurement(variant.path, kind, figures, setup={**setup_common, **setup})
        if records:
            print(f"recorded in {written}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print("\n\n".join(texts))
    return 0


def _eval_tasks(args, model, tokenizer, variant, tasks, report, texts, records) -> None:
    from qwenlab.eval.task_eval import evaluate_tasks, format_accuracy_table

    results = evaluate_tasks(model, tokenizer, tasks, n=args.n, seed=args.seed, difficulty=args.difficulty,
                             batch_size=args.batch_size, progress=not args.json)
    report["tasks"] = {k: v.as_dict() for k, v in results.items()}
    texts.append(format_accuracy_table(results, title=f"{variant.path} (seed {args.seed}, greedy)"))
    from qwenlab.tasks.registry import DEFAULT_DIFFICULTY
    from qwenlab.variants.results import accuracy_values

    # The difficulty is recorded as run (the task's default resolved), so figures match on what was measured.
    records.append(("accuracy", {t: accuracy_values(r, seed=args.seed, difficulty=args.difficulty or
                                                    DEFAULT_DIFFICULTY.get(t)) for t, r in results.items()},
                    {"seed": args.seed, "difficulty": args.difficulty, "decoding": "greedy"}))


def _eval_perplexity(args, model, tokenizer, path, report, texts, records) -> None:
    from qwenlab.eval.perplexity import evaluate_perplexity, read_documents

    documents = read_documents(path, field=args.field, limit=args.limit)
    result = evaluate_perplexity(model, tokenizer, documents, max_length=args.max_length, stride=args.stride,
                                 source=str(path), progress=not args.json)
    figures = result.as_dict()
    report.setdefault("perplexity", {})[path.name] = figures
    texts.append(f"{path}: perplexity {result.perplexity:.4f}, {result.bits_per_byte:.4f} bits/byte, word "
                 f"perplexity {result.word_perplexity:.4f} ({result.tokens} tokens in {result.documents} document(s); "
                 f"window {result.max_length}, stride {result.stride})")
    records.append(("perplexity", {path.name: {k: figures[k] for k in (
        "perplexity", "bits_per_byte", "word_perplexity", "tokens", "documents", "max_length", "stride")}},
        {"file": str(path)}))


def _eval_gsm8k(args, model, tokenizer, path, report, texts, records) -> None:
    from qwenlab.eval.gsm8k import evaluate_gsm8k, read_gsm8k

    limit = args.limit + args.fewshot if args.limit else None
    result = evaluate_gsm8k(model, tokenizer, read_gsm8k(path, limit=limit), fewshot=args.fewshot,
                            max_new_tokens=args.max_new_tokens or 256, batch_size=args.batch_size,
                            source=str(path), progress=not args.json)
    report["gsm8k"] = result.as_dict()
    texts.append(f"{path} (GSM8K-style, {args.fewshot}-shot, greedy): accuracy {result.accuracy:.3f} "
                 f"({result.correct}/{result.n})")
    records.append(("accuracy", {f"gsm8k:{path.stem}": {"accuracy": round(result.accuracy, 4), "n": result.n,
                                                        "fewshot": args.fewshot}}, {"file": str(path)}))


def _eval_lm_eval(args, model, tokenizer, variant, report, texts, records) -> None:
    from qwenlab.eval.lm_eval_bridge import QwenlabLM, main_metric, run_lm_eval
    from qwenlab.text_table import format_table

    lm = QwenlabLM(pretrained=str(variant.path), model=model, tokenizer=tokenizer, batch_size=args.batch_size)
    output = run_lm_eval(str(variant.path), _task_list(args.lm_eval), include_path=args.include_path,
                         limit=args.limit, num_fewshot=args.num_fewshot, apply_chat_template=args.chat, seed=args.seed,
                         only_include_path=args.only_include_path, lm=lm)
    results = output["results"]
    report["lm_eval"] = results
    rows, accuracy, perplexity = [], {}, {}
    for task, metrics in results.items():
        main = main_metric(metrics)
        samples = (output.get("n-samples") or {}).get(task, {}).get("effective")
        if main is None:
            continue
        key, value = main
        rows.append([task, key, f"{value:.4f}", samples if samples is not None else "-"])
        entry = {"metric": key, "n": samples, "fewshot": args.num_fewshot}
        if "perplexity" in key:
            perplexity[f"lm_eval:{task}"] = {"perplexity": value, **entry}
        else:
            accuracy[f"lm_eval:{task}"] = {"accuracy": value, **entry}
    texts.append("lm-evaluation-harness (model qwenlab)\n\n" + format_table(["task", "metric", "value", "n"], rows,
                                                                           markdown=True, align="llrr"))
    setup = {"lm_eval": output.get("config", {}).get("lm_eval_version") or _version("lm_eval"),
             "include_path": args.include_path}
    if accuracy:
        records.append(("accuracy", accuracy, setup))
    if perplexity:
        records.append(("perplexity", perplexity, setup))


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def register(subparsers) -> None:
    import argparse

    from qwenlab.cli import types

    p = subparsers.add_parser("eval", help="accuracy on verifiable tasks, perplexity, GSM8K-style files, lm_eval tasks")
    p.add_argument("model", help="a model folder, 'nano', a quantized folder or an adapter folder")
    p.add_argument("--adapter", action="append", default=[], metavar="PATH",
                   help="a LoRA adapter folder or hub id over MODEL: one runs unmerged and is the variant measured; "
                        "repeat to stack several (merged in order)")
    p.add_argument("--tasks", default=None, help=f"comma-separated tasks: {', '.join(TASKS)}, reasoning_gym:NAME"
                                                 "[@config.yaml], jsonl:PATH[@verifier.py:FN], mix:spec.yaml (default: "
                                                 "all built-in ones, unless a file evaluation below is asked for)")
    p.add_argument("--n", type=types.positive_int, default=200, help="instances per task")
    p.add_argument("--seed", type=types.seed, default=0)
    p.add_argument("--difficulty", type=types.positive_int, default=None,
                   help="default: each task's default difficulty")
    p.add_argument("--batch-size", type=types.positive_int, default=32)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--perplexity", action="append", default=[], metavar="FILE",
                   help="perplexity of a text file (one document) or JSONL (one per line); repeatable")
    p.add_argument("--field", default="text", help="the JSONL field holding the text (default: text)")
    p.add_argument("--max-length", type=types.positive_int, default=None, help="perplexity window in tokens (default: "
                                                                "min(context, 1024))")
    p.add_argument("--stride", type=types.positive_int, default=None, help="new tokens per window (default: half the window)")
    p.add_argument("--gsm8k", default=None, metavar="FILE", help='JSONL of {"question", "answer": "... #### N"}')
    p.add_argument("--fewshot", type=types.nonnegative_int, default=0, help="GSM8K: the first K records become examples")
    p.add_argument("--max-new-tokens", type=types.positive_int, default=None, help="GSM8K: tokens per answer (default 256)")
    p.add_argument("--limit", type=types.positive_int, default=None, help="at most this many documents / records / lm_eval "
                                                           "samples per task")
    p.add_argument("--lm-eval", default=None, metavar="TASKS", help="comma-separated lm-evaluation-harness tasks")
    p.add_argument("--include-path", default=None, help="lm_eval: a folder of custom task YAML files")
    p.add_argument("--only-include-path", action="store_true",
                   help="lm_eval: load tasks from --include-path only (skips indexing the built-in tasks)")
    p.add_argument("--num-fewshot", type=types.nonnegative_int, default=None, help="lm_eval: few-shot examples per task")
    p.add_argument("--chat", action="store_true", help="lm_eval: apply the chat template to prompts")
    p.add_argument("--record", action=argparse.BooleanOptionalAction, default=True,
                   help="record the figures in the variant's measurements.jsonl (default: on)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)
