"""`qwenlab bench`: TTFT, prompt and decode tokens/s and peak memory, side by side with the peers (qwenlab.bench)."""

from __future__ import annotations

import json
import sys

from qwenlab.cli import types


def cmd_bench(args) -> int:
    from qwenlab.bench.speed import bench_speed, speed_table

    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr))
    report = bench_speed(args.model, dtypes=args.dtype, contexts=args.ctx, gen=args.gen, runs=args.runs,
                         threads=args.threads, vs=[v for group in args.vs for v in group.split(",")],
                         backend=args.kernel, record=not args.no_record, log=log)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(f"{report.model}: {report.threads} thread(s), prompt of CTX random tokens, {report.gen} tokens "
              f"decoded greedily, {report.runs} runs (median (min-max))\n")
        print(speed_table(report, markdown=args.markdown))
    return 0


def register(subparsers) -> None:
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
