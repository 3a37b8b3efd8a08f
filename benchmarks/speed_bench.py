"""qwenlab vs llama.cpp vs transformers on the Qwen2.5-0.5B and 1.5B shapes, in one run; writes Markdown.

    python benchmarks/speed_bench.py                       # both shapes, ctx 128,256, 2 threads
    python benchmarks/speed_bench.py --shapes qwen2.5-0.5b --ctx 128 --gen 32 --runs 3 --ablations

Each shape is a random-weight model with the exact Qwen2.5 shapes (same cost per token as the
real weights), written once into --workdir. Every engine runs in its own subprocess
(qwenlab.bench.speed), so peak RSS is per engine. --ablations adds what each speed trick buys,
on int4 at the first context: the native kernel vs PyTorch's int4 kernel, fused vs separate
q/k/v and gate/up projections, the embedding/LM head at bf16 / int8 / int4, and 1 vs N threads.
--quality adds the logit error of each quantized variant against fp32 (qwenlab.quant.quality), and
nano's task accuracy at fp32 / int8 / int4 when nano is built.
The machine may be shared: the load average before and after is written next to the figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from qwenlab.bench.speed import (SpeedReport, bench_speed, quantized_variant, speed_table, run_engine,
                                 _describe_quantized)
from qwenlab.checkpoint import open_checkpoint

TARGETS = """Targets (issue 6): int4 decode >= llama.cpp Q4_0; int8 decode >= llama.cpp Q8_0; TTFT at 128 tokens
<= 1.5x llama.cpp's; decode >= 3x transformers fp32 generate; 1.5B int4 peak RSS <= 1.3 GB."""


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def tokenizer_folder(workdir: Path) -> Path:
    """nano's tokenizer when built, else a small Qwen-style BPE (GGUF export needs one)."""
    try:
        from qwenlab.nano import nano_path

        return nano_path()
    except Exception:
        from qwenlab.nano.tokenizer_build import train_qwen_style_bpe, write_tokenizer_folder

        folder = workdir / "tokenizer"
        if not (folder / "tokenizer.json").is_file():
            corpus = ["What is 12 + 7? The answer is 19.", "Reverse the word: apple", "hello world"] * 50
            write_tokenizer_folder(train_qwen_style_bpe(corpus, 500), folder)
        return folder


def random_model(shape: str, workdir: Path) -> Path:
    from qwenlab.checkpoint.random_model import write_random_model
    from qwenlab.model import get_preset

    folder = workdir / shape
    if not (folder / "config.json").is_file():
        write_random_model(get_preset(shape), folder, tokenizer_from=tokenizer_folder(workdir), force=True)
    return folder


def targets(report: SpeedReport, shape: str) -> list[str]:
    by = {(r.engine, r.dtype): r for r in report.results}
    lines = []

    def ratio(mine, peer, ctx, metric):
        a, b = mine.summary(ctx, metric), peer.summary(ctx, metric)
        return a[0] / b[0] if a and b else None

    for dtype, kind in (("int4", "Q4_0"), ("int8", "Q8_0")):
        mine, peer = by.get(("qwenlab", dtype)), by.get(("llama.cpp", dtype))
        if mine and peer:
            for ctx in report.contexts:
                r = ratio(mine, peer, ctx, "decode_tokens_per_s")
                verdict = "met" if r >= 1 else "not met"
                lines.append(f"- {dtype} decode vs llama.cpp {kind} at {ctx}: {r:.2f}x ({verdict})")
            if 128 in report.contexts:
                r = ratio(mine, peer, 128, "ttft_s")
                verdict = "met" if r <= 1.5 else "not met"
                lines.append(f"- {dtype} TTFT at 128 vs llama.cpp {kind}: {r:.2f}x ({verdict}, target <= 1.5x)")
    hf = by.get(("hf", "fp32"))
    if hf:
        for dtype in ("int4", "int8", "fp32"):
            mine = by.get(("qwenlab", dtype))
            if mine:
                r = ratio(mine, hf, report.contexts[0], "decode_tokens_per_s")
                lines.append(f"- {dtype} decode vs transformers fp32 at {report.contexts[0]}: {r:.2f}x "
                             f"({'met' if r >= 3 else 'not met'}, target >= 3x)")
    int4 = by.get(("qwenlab", "int4"))
    if int4 and shape == "qwen2.5-1.5b":
        gb = int4.peak_rss_bytes / 1e9
        lines.append(f"- 1.5B int4 peak RSS: {gb:.2f} GB ({'met' if gb <= 1.3 else 'not met'}, target <= 1.3 GB)")
    return lines


def ablations(folder: Path, ctx: int, gen: int, runs: int, threads: int, log) -> list[list[str]]:
    """Decode and TTFT of int4 variants that each drop one trick."""
    variants = []
    for head_bits in (8, 16, 4):
        out = folder.parent / f"{folder.name}-int4-head{head_bits}"
        if not (out / "config.json").is_file():
            from qwenlab.quant.quantize import quantize_model

            quantize_model(folder, out, bits=4, head_bits=head_bits, force=True)
        variants.append((f"head {('bf16' if head_bits == 16 else f'int{head_bits}')}", out, {}))
    default = variants[0][1]
    variants += [("PyTorch int4 kernel (aten)", default, {"backend": "aten"}),
                 ("no q/k/v, gate/up fusion", default, {"fuse": False})]
    if threads > 1:
        variants.append(("1 thread", default, {"threads": 1}))
    rows = []
    for label, path, extra in variants:
        log(f"[ablation] {label}")
        spec = {"engine": "qwenlab", "dtype": "int4", "path": str(path), "threads": threads, "contexts": [ctx],
                "gen": gen, "runs": runs, "seed": 0,
                "weights": _describe_quantized(open_checkpoint(path, validate=False).config.extra["quantization"])}
        spec.update(extra)
        result = run_engine(spec)
        ttft, decode = result.summary(ctx, "ttft_s"), result.summary(ctx, "decode_tokens_per_s")
        rows.append([label, result.weights, str(spec["threads"]),
                     f"{ttft[0] * 1000:.0f} ({ttft[1] * 1000:.0f}-{ttft[2] * 1000:.0f})",
                     f"{decode[0]:.1f} ({decode[1]:.1f}-{decode[2]:.1f})", f"{result.peak_rss_bytes / 2**20:.0f}"])
    return rows


def quality_variants(folder: Path) -> list[tuple[str, Path]]:
    from qwenlab.quant.quantize import quantize_model

    made = []
    for label, kw in [("int8 g32", dict(bits=8, group_size=32)), ("int4 g64 rtn", dict(bits=4)),
                      ("int4 g64 hqq", dict(bits=4, method="hqq")), ("int4 g32 rtn", dict(bits=4, group_size=32)),
                      ("int4 g128 rtn", dict(bits=4, group_size=128)),
                      ("int4 g64 rtn, head bf16", dict(bits=4, head_bits=16)),
                      ("int4 g64 rtn, head int4", dict(bits=4, head_bits=4))]:
        out = folder.parent / f"{folder.name}-q-{label.replace(' ', '_').replace(',', '')}"
        if not (out / "config.json").is_file():
            quantize_model(folder, out, force=True, progress=False, **kw)
        made.append((label, out))
    return made


def quality(folder: Path, log) -> list[str]:
    """Logit error of each variant against fp32 on 8 random 64-token sequences."""
    from qwenlab.model import load_model
    from qwenlab.quant.load import load_quantized_model
    from qwenlab.quant.quality import compare_logits, random_sequences, reference_logits

    model = load_model(folder, "fp32")
    sequences = random_sequences(model.config.vocab_size)
    reference = reference_logits(model, sequences)
    del model
    rows = []
    for label, path in [("bf16", None)] + quality_variants(folder):
        log(f"[quality] {label}")
        model = load_model(folder, "bf16") if path is None else \
            load_quantized_model(open_checkpoint(path, validate=False))
        m = compare_logits(reference, model, sequences)
        rows.append(f"| {label} | {m['rel_rms_error']:.4f} | {m['max_abs_error']:.3f} | {m['top1_agreement']:.3f} "
                    f"| {m['kl']:.5f} |")
        del model
    return ["| variant | rel. RMS logit error | max abs error | top-1 agreement | KL(fp32 ‖ q) nats |",
            "|---|---:|---:|---:|---:|", *rows]


def nano_accuracy(log) -> list[str]:
    from qwenlab.eval.task_eval import evaluate_tasks
    from qwenlab.model import load_model, load_tokenizer
    from qwenlab.nano import nano_path
    from qwenlab.quant.load import load_quantized_model
    from qwenlab.quant.quantize import quantize_model
    from qwenlab.tasks import TASKS

    folder = nano_path()
    tokenizer, tasks = load_tokenizer(folder), sorted(TASKS)
    rows, base = [], None
    for label, kw in [("fp32", None), ("int8 g32", dict(bits=8, group_size=32)), ("int4 g64 rtn", dict(bits=4)),
                      ("int4 g32 hqq", dict(bits=4, group_size=32, method="hqq"))]:
        log(f"[nano] {label}")
        if kw is None:
            model = load_model(folder, "fp32")
        else:
            out = Path("/tmp") / f"qwenlab-nano-{label.replace(' ', '_')}"
            quantize_model(folder, out, force=True, progress=False, **kw)
            model = load_quantized_model(open_checkpoint(out, validate=False))
        results = evaluate_tasks(model, tokenizer, tasks, n=200, progress=False)
        accuracy = {t: r.accuracy for t, r in results.items()}
        mean = sum(accuracy.values()) / len(accuracy)
        base = base if base is not None else mean
        cells = " | ".join(f"{accuracy[t]:.3f}" for t in tasks)
        rows.append(f"| {label} | {cells} | {mean:.3f} | {mean - base:+.3f} |")
    return ["| nano | " + " | ".join(tasks) + " | mean | delta vs fp32 |", "|---|" + "---:|" * (len(tasks) + 2), *rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b")
    parser.add_argument("--dtype", default="fp32,int8,int4")
    parser.add_argument("--ctx", default="128,256")
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vs", default="llama.cpp,hf")
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument("--quality", action="store_true", help="logit error vs fp32; nano task accuracy if built")
    parser.add_argument("--skip-speed", action="store_true", help="with --quality: only the quality tables")
    parser.add_argument("--workdir", default="/tmp/qwenlab-speed-bench")
    parser.add_argument("--out", default="benchmarks/results/speed.md")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    sections = [f"# qwenlab speed vs peers\n", f"`{command}`\n",
                f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs, {args.threads} thread(s) per engine; "
                f"Python {platform.python_version()}. {TARGETS}\n"]
    def flush() -> None:  # after every section: a long run that is cut short keeps what it measured
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(sections) + "\n")

    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        folder = random_model(shape, workdir)
        before, start = load_average(), time.time()
        log(f"== {shape} ==")
        if args.quality:
            sections += [f"### Logit error against fp32 ({shape}, random weights, 8 x 64 random tokens)\n",
                         *quality(folder, log), ""]
            flush()
        if args.skip_speed:
            continue
        for dtype in ("int8", "int4"):
            if dtype in args.dtype:
                quantized_variant(folder, int(dtype[3:]))
        report = bench_speed(folder, dtypes=args.dtype, contexts=args.ctx, gen=args.gen, runs=args.runs,
                             threads=args.threads, vs=args.vs, record=False, log=log)
        sections += [f"## {shape} (random weights, exact shapes)\n",
                     f"Load average before / after: {before} / {load_average()}; {time.time() - start:.0f} s.\n",
                     speed_table(report, markdown=True), "", *targets(report, shape), ""]
        flush()
        if args.ablations:
            ctx = report.contexts[0]
            rows = ablations(folder, ctx, args.gen, args.runs, args.threads, log)
            header = ["int4 variant", "weights", "threads", f"TTFT ms @{ctx}", "decode tok/s", "peak RSS MB"]
            sections += [f"### What each trick buys ({shape}, int4, ctx {ctx})\n",
                         "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                         *["| " + " | ".join(r) + " |" for r in rows], ""]
            flush()
    if args.quality:
        try:
            sections += ["## nano task accuracy (greedy, 200 instances per task)\n", *nano_accuracy(log), ""]
        except Exception as e:  # nano not built yet
            sections += [f"nano task accuracy: not measured ({e}).", ""]
    flush()
    print("\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
