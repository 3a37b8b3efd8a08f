"""Verbs of the model core: info, generate, chat, random, nano path."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from qwenlab.cli import types
from qwenlab.errors import QwenlabError


def add_generation_flags(p) -> None:
    p.add_argument("--max-new-tokens", type=types.nonnegative_int, default=128)
    p.add_argument("--temperature", type=types.nonnegative_float, default=0.0, help="0 means greedy (default)")
    p.add_argument("--top-k", type=types.nonnegative_int, default=0, help="0: no top-k cut (default)")
    p.add_argument("--top-p", type=types.fraction, default=1.0)
    p.add_argument("--repetition-penalty", type=types.positive_float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--seed", type=types.seed, default=None)
    p.add_argument("--max-context", type=types.positive_int, default=None,
                   help="context window (default: the model's)")
    p.add_argument("--truncate", action="store_true", help="drop the oldest prompt tokens when it does not fit")
    p.add_argument("--dtype", default="fp32", help="fp32 or bf16")
    p.add_argument("--adapter", action="append", default=[], metavar="PATH",
                   help="a LoRA adapter folder (PEFT format) to apply; repeat to stack several")


def generation_config(args):
    from qwenlab.model import GenerationConfig

    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=tuple(args.stop),
                            seed=args.seed, max_context=args.max_context, truncate_prompt=args.truncate).validate()


def cmd_info(args) -> int:
    from qwenlab.checkpoint.config import get_preset, preset_key
    from qwenlab.model.info import describe, format_description

    if preset_key(args.model) and not Path(args.model).exists():  # info 0.5b, as random takes it
        config, title = get_preset(args.model), f"{args.model} (preset)"
    else:
        from qwenlab.checkpoint import open_checkpoint

        checkpoint = open_checkpoint(args.model)
        config, title = checkpoint.config, str(checkpoint.path)
    info = describe(config)
    print(json.dumps(info, indent=2) if args.json else format_description(info, title))
    return 0


def cmd_generate(args) -> int:
    from qwenlab.loading import load
    from qwenlab.model.generate import stream_generate

    prompt = prompt_text(args)  # before loading: a missing prompt fails at once
    config = generation_config(args)
    model, tokenizer, checkpoint = load(args.model, args.dtype, args.adapter or ())
    if args.chat or args.system:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompt = tokenizer.apply_chat_template([*system, {"role": "user", "content": prompt}])
    stop_ids = tokenizer.stop_ids(checkpoint.generation_config)
    prompt_ids, results = tokenizer.encode(prompt), []
    started, first = time.perf_counter(), None
    for event in stream_generate(model, tokenizer, [prompt_ids], config, stop_ids, results):
        if first is None:
            first = time.perf_counter()
        sys.stdout.write(event.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose:  # as `ollama run --verbose` and llama.cpp print after a reply
        print(speed_summary(len(prompt_ids), len(results[0].token_ids), started, first, time.perf_counter()),
              file=sys.stderr)
    return 0


def prompt_text(args) -> str:
    """The prompt: positional or --prompt (one of them), '-' reading standard input."""
    if (args.prompt is None) == (args.prompt_text is None):
        raise QwenlabError("generate: give the prompt once, as PROMPT or --prompt (use '-' to read standard input)")
    text = args.prompt if args.prompt is not None else args.prompt_text
    return sys.stdin.read() if text == "-" else text


def speed_summary(prompt_tokens: int, new_tokens: int, started: float, first: float | None, ended: float) -> str:
    ttft = (first or ended) - started
    decode = (new_tokens - 1) / (ended - first) if first is not None and new_tokens > 1 and ended > first else 0.0
    return (f"prompt {prompt_tokens} tokens, time to first token {ttft * 1000:.0f} ms; "
            f"{new_tokens} tokens generated, decode {decode:.1f} tokens/s")


def cmd_chat(args) -> int:
    from qwenlab.loading import load
    from qwenlab.model.generate import stream_generate

    model, tokenizer, checkpoint = load(args.model, args.dtype, args.adapter or ())
    config = generation_config(args)
    stop_ids = tokenizer.stop_ids(checkpoint.generation_config)
    tokenizer.apply_chat_template([{"role": "user", "content": "check"}])  # fail early without a template
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("qwenlab chat: /reset clears the conversation, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            return 0
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages))
        reply = []
        for event in stream_generate(model, tokenizer, [ids], config, stop_ids):
            reply.append(event.text)
            sys.stdout.write(event.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_random(args) -> int:
    from qwenlab.checkpoint import parse_size
    from qwenlab.checkpoint.random_model import write_random_model
    from qwenlab.model import get_preset, parse_dtype

    from qwenlab.nano.tokenizer_build import write_full_vocabulary_tokenizer

    config = get_preset(args.preset)
    # A tokenizer with one token per embedding row, so every id a random model samples decodes to text.
    out = write_random_model(config, args.out, seed=args.seed, dtype=parse_dtype(args.dtype),
                             max_shard_bytes=parse_size(args.max_shard_size), force=args.force,
                             write_tokenizer=lambda folder: write_full_vocabulary_tokenizer(folder, config.vocab_size))
    print(out)
    return 0


def cmd_nano(args) -> int:
    from qwenlab.nano import nano_path

    print(nano_path())
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="architecture, parameter counts and memory of a model or preset")
    p.add_argument("model", help="a model folder, 'nano', or a preset name such as qwen2.5-1.5b")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = subparsers.add_parser("generate", help="stream a completion of a prompt")
    p.add_argument("model", help="a model or adapter folder, 'nano', or a hub id org/name[@rev]")
    p.add_argument("prompt_text", nargs="?", metavar="PROMPT", help="the prompt ('-': read standard input)")
    p.add_argument("--prompt", default=None, help="the prompt, as a flag ('-': read standard input)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the chat template")
    p.add_argument("--system", default=None, help="a system message (implies --chat)")
    p.add_argument("--verbose", action="store_true", help="print prompt size, time to first token and tokens/s")
    add_generation_flags(p)
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("chat", help="multi-turn chat (/reset, /exit)")
    p.add_argument("model")
    p.add_argument("--system", default=None, help="a system message")
    add_generation_flags(p)
    p.set_defaults(func=cmd_chat, max_new_tokens=256)

    p = subparsers.add_parser("random", help="write a random-weight model with a preset's exact shapes")
    p.add_argument("preset", help="qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-3b or qwen2.5-7b")
    types.add_output(p, "the model folder to write")
    p.add_argument("--seed", type=types.seed, default=0)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--max-shard-size", type=types.size, default="5GB")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_random)

    p = subparsers.add_parser("nano", help="the shipped nano model")
    p.add_argument("action", choices=["path"])
    p.set_defaults(func=cmd_nano)
