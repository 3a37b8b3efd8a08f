"""`qwenlab serve`: an OpenAI-compatible server over one base, its adapters and variants."""

from __future__ import annotations

import os


def cmd_serve(args) -> int:
    from qwenlab.serve import ServeConfig, ServeLimits, serve
    from qwenlab.serve.server import parse_named_paths

    limits = ServeLimits(max_body_bytes=body_size(args.max_body_size), max_tokens=args.max_tokens,
                         default_max_tokens=min(args.default_max_tokens, args.max_tokens),
                         max_concurrency=args.max_concurrency, request_timeout_s=args.request_timeout,
                         api_key=args.api_key or os.environ.get("QWENLAB_API_KEY") or None,
                         allow_adapter_dir=args.allow_adapter_dir, max_adapters=args.max_adapters)
    config = ServeConfig(base=args.base, adapters=parse_named_paths(args.adapter, "--adapter"),
                         variants=parse_named_paths(args.variant, "--variant"),
                         served_model_name=args.served_model_name, host=args.host, port=args.port, dtype=args.dtype,
                         max_batch=args.max_batch, max_context=args.max_context,
                         max_prefill_tokens=args.max_prefill_tokens, threads=args.threads,
                         prefix_cache_mb=args.prefix_cache_mb, lora_dtype=args.lora_dtype,
                         limits=limits)
    serve(config)  # checks every setting (ServeConfig.check) before loading anything
    return 0


def body_size(text: str) -> int:
    from qwenlab.checkpoint import parse_size
    from qwenlab.errors import QwenlabError

    try:
        return parse_size(text)
    except (QwenlabError, ValueError, OverflowError):  # 'infMB' overflows in parse_size
        raise QwenlabError(f"--max-body-size must be a size such as 1MB, 512KiB or a byte count, got '{text}'") \
            from None


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible server: one base, many adapters and variants")
    p.add_argument("base", help="the base model folder (or 'nano'); int8/int4 folders work too")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="a PEFT LoRA adapter over the base, served as model NAME (repeatable)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=PATH",
                   help="another model folder served as model NAME, e.g. a merge or a quantized copy (repeatable)")
    p.add_argument("--served-model-name", default=None, help="the base's model id (default: its folder name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set QWENLAB_API_KEY)")
    p.add_argument("--allow-adapter-dir", default=None, metavar="DIR",
                   help="let POST /v1/load_lora_adapter load folders under DIR (symlinks resolved); off without it")
    p.add_argument("--max-adapters", type=int, default=16, help="adapters attached at once, start-up ones included")
    p.add_argument("--dtype", default="fp32", help="fp32 or bf16 (quantized folders keep their own format)")
    p.add_argument("--max-batch", type=int, default=32, help="rows decoded together per model")
    p.add_argument("--max-prefill-tokens", type=int, default=1024,
                   help="prompt tokens prefilled per step; smaller keeps running streams flowing")
    p.add_argument("--prefix-cache-mb", type=int, default=512,
                   help="memory for the KV of prompt prefixes reused across requests (0: off)")
    p.add_argument("--lora-dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="the adapters' weights in mixed batches (auto: bf16 over a bf16 or quantized base, else fp32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--max-context", type=int, default=None, help="prompt + completion tokens per request")
    p.add_argument("--max-tokens", type=int, default=4096, help="the most max_tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=int, default=1024, help="for chat requests that do not say")
    p.add_argument("--max-concurrency", type=int, default=64, help="requests in flight; more get HTTP 429")
    p.add_argument("--max-body-size", default="1MB", help="larger request bodies get HTTP 413")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds; longer generations are cancelled")
    p.set_defaults(func=cmd_serve)
