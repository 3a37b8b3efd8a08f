"""Verbs of quantization and speed: quantize, export gguf, bench."""

from __future__ import annotations

import json
import sys

from qwenlab.cli import types


def cmd_quantize(args) -> int:
    from qwenlab.quant.quantize import quantize_model

    out = quantize_model(args.model, args.out, bits=args.bits, group_size=args.group_size, method=args.method,
                         head_bits=args.head_bits, force=args.force)
    print(out)
    return 0


def cmd_export_gguf(args) -> int:
    from qwenlab.quant.gguf_export import export_gguf

    summary = export_gguf(args.model, args.out, args.type, head_kind=args.head_type, force=args.force)
    kinds = ", ".join(f"{n} {k}" for k, n in summary["tensors_by_type"].items())
    print(f"{summary['path']}: {summary['bytes'] / 2**20:.1f} MiB ({kinds} tensors, {summary['vocab']} tokens)")
    return 0


def cmd_bench(args) -> int:
    from qwenlab.bench.speed import bench_speed, format_table

    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr))
    report = bench_speed(args.model, dtypes=args.dtype, contexts=args.ctx, gen=args.gen, runs=args.runs,
                         threads=args.threads, vs=[v for group in args.vs for v in group.split(",")],
                         backend=args.kernel, record=not args.no_record, log=log)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(f"{report.model}: {report.threads} thread(s), prompt of CTX random tokens, {report.gen} tokens "
              f"decoded greedily, {report.runs} runs (median (min-max))\n")
        print(format_table(report, markdown=args.markdown))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="int8/int4 weight-only, group-wise quantization to a new folder")
    p.add_argument("model", help="a float model folder (or 'nano')")
    p.add_argument("out")
    p.add_argument("--bits", type=int, default=4, choices=[8, 4])
    p.add_argument("--group-size", type=int, default=None, help="32, 64 or 128 (default: 32 for int8, 64 for int4)")
    p.add_argument("--method", default="rtn", help="rtn (round to nearest) or hqq (optimised zero points; int4)")
    p.add_argument("--head-bits", type=int, default=None,
                   help="the embedding / LM head: 8 (default), 4, or 16 to keep it bf16")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_quantize)

    export = subparsers.add_parser("export", help="export a model to another runtime's format")
    kinds = export.add_subparsers(dest="format", metavar="FORMAT", required=True)
    p = kinds.add_parser("gguf", help="a GGUF file for llama.cpp (tokenizer and chat template included)")
    p.add_argument("model", help="a float model folder (or 'nano')")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--type", default="q8_0", help="f16, q8_0 or q4_0")
    p.add_argument("--head-type", default=None, help="type of the embedding / LM head (default: --type)")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_export_gguf)

    p = subparsers.add_parser("bench", help="TTFT, prompt and decode tokens/s, peak RSS; optionally vs llama.cpp / HF")
    p.add_argument("model", help="a float or quantized model folder (or 'nano')")
    p.add_argument("--dtype", default="int4", help="comma list of fp32, bf16, int8, int4 (default int4)")
    p.add_argument("--ctx", default="128", help="comma list of prompt lengths (default 128)")
    p.add_argument("--gen", type=types.positive_int, default=128, help="tokens to decode per run (default 128)")
    p.add_argument("--runs", type=types.positive_int, default=5)
    p.add_argument("--threads", type=types.positive_int, default=None, help="threads for every engine (default: torch's)")
    p.add_argument("--vs", action="append", default=[], help="llama.cpp and/or hf (repeatable or comma list)")
    p.add_argument("--kernel", default=None, choices=["auto", "native", "aten", "reference"],
                   help="quantized kernels: auto (default), native, aten, reference")
    p.add_argument("--json", action="store_true", help="print the full results as JSON")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--no-record", action="store_true", help="do not store the figures in the model folder")
    p.set_defaults(func=cmd_bench)
