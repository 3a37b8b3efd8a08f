"""`qwenlab quantize` and `qwenlab export gguf`: the verbs of qwenlab.quant."""

from __future__ import annotations

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


def register(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="int8/int4 weight-only, group-wise quantization to a new folder")
    p.add_argument("model", help="a float model folder (or 'nano')")
    types.add_output(p, "the quantized model folder to write")
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
    types.add_output(p, "the .gguf file to write")
    p.add_argument("--type", default="q8_0", help="f16, q8_0 or q4_0")
    p.add_argument("--head-type", default=None, help="type of the embedding / LM head (default: --type)")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_export_gguf)
