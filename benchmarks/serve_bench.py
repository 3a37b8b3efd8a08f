"""Serving under load: throughput and TTFT of `qwenlab serve` with 1, 8 and 32 concurrent clients.

    python benchmarks/serve_bench.py [--traffic adapters|constrained|scenarios] [--models nano,qwen2.5-0.5b] [--clients 1,8,32] [--max-tokens 32]
                                     [--prompt-tokens 64] [--rounds 2] [--repeats 3] [--threads 1] [--max-prefill-tokens N]
                                     [--bits 8|4] [--work-dir DIR] [--out rows.json]

For each model, two servers side by side (subprocesses of `qwenlab serve` on loopback), measured in
alternation (base, mixed, base, ... --repeats phases each; the median phase is reported):
  base    the base alone; every request asks for the base;
  mixed8  the base with 8 random LoRA adapters (r=8, alpha 16, all linear layers, PEFT format);
          client i asks for adapter i mod 8, so every batch mixes adapters.
Each client (a bare asyncio HTTP client by default, or --client openai for the official AsyncOpenAI;
both stream /v1/completions) sends `rounds` requests one after the other: a prompt of exactly
--prompt-tokens random token ids (ordinary tokens, no special ones; sent as an id list, so every
model's tokenizer sees the same length), --max-tokens new tokens (greedy, ignore_eos: every request generates exactly that).
  tokens/s  completion tokens of all requests / wall time of the phase (first send to last byte)
  TTFT      send -> first streamed text, per request; p50 and p95
  engine decode tok/s  decode tokens / seconds inside decode steps (from /metrics): the batching
            gain without HTTP and without the client's share of the CPU
  engine busy tok/s    all generated tokens / seconds the engine thread spent in rounds that did work
            (prefill and decode); the busy share is those seconds / the phase's wall time, and
            tokens/s over engine busy tok/s is the share of the engine's output rate that clients
            received (what HTTP, tokenization and the event loop left it; issue 25's >= 0.9)
The load generator shares the CPU with the server, as a co-located client would.

--traffic constrained (issue 22) measures grammar-constrained rows against free ones instead, on one
server per model (no adapters; `--models` takes 'nano', a preset, or a model folder, e.g. an int4 copy).
Every request is a streamed chat completion with the same short tools block in its prompt (so all have
one prompt length); a client's requests cycle through three kinds:
  free   tool_choice auto, unconstrained, ignore_eos: exactly --max-tokens tokens (those after a stop
         token decode to nothing and send no chunk: on nano ~57 chunks for 64 tokens);
  json   response_format json_schema (bounded strings and numbers), constrained by llguidance;
  tool   tool_choice required: a forced call whose arguments follow the function's schema.
Phases alternate 'free-only' (every request free) and 'mix' (the three kinds, interleaved in the same
batches), --repeats times each; per kind it reports a row's decode rate ((tokens - 1) / (last byte -
first token)) and TTFT, and the ratios the issue targets: constrained / free decode rate (>= 0.9) and
p95 TTFT (<= 1.2) inside the mix, and the mix's tokens/s against the free-only phase's.

--traffic scenarios (issue 25) replays three kinds of real traffic on /v1/completions (the chat turns
written out in Qwen2.5's format, so every server gets the same text), each client one conversation of
--turns requests, greedy, --max-tokens each (half that in the agent loop):
  chat    a short shared system prompt, then each client's own turns: every prompt re-sends the history;
  agent   a ~1,000-token system prompt with a tools block (shared by every client), a task, then short
          tool results: the long prefix comes back on every step;
  unique  ~250-token prompts of random words that share nothing, not even a first token.
It runs one server at a time: qwenlab with --prefix-cache-mb 0 and 512, llama.cpp's llama-server
--parallel N (continuous batching; built once into the qwenlab cache from the llama.cpp sources in
the llama-cpp-python 0.3.36 sdist with scripts/llama_cpp_cmake_args.sh's flags) and llama-cpp-python's
llama_cpp.server (--interrupt_requests False; its extras: pip install -e '.[bench]'), both on --gguf.
It reports tokens/s (completion tokens
/ wall time) and TTFT p50/p95 (send -> first text) per scenario and client count.

Models: 'nano' is the shipped nano when built, else a random model of nano's shape; a preset
(qwen2.5-0.5b) is written once with `qwenlab random PRESET DIR`, a folder is used as it is. `qwenlab
random` writes a byte-level tokenizer over the model's whole vocabulary, so every id decodes to text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ADAPTERS = 8


# ---- model folders ------------------------------------------------------------------------------
def prepare_model(name: str, work: Path) -> Path:
    from qwenlab.checkpoint import open_checkpoint

    if name == "nano":
        try:
            from qwenlab.nano import nano_path

            return nano_path()
        except Exception:
            folder = work / "nano-shape"
            if not (folder / "config.json").is_file():
                from qwenlab.checkpoint.random_model import write_random_model
                from qwenlab.nano.tokenizer_build import write_full_vocabulary_tokenizer
                from qwenlab.nano.train import nano_config

                write_random_model(nano_config(512), folder, progress=False)
                write_full_vocabulary_tokenizer(folder, open_checkpoint(folder).config.vocab_size)
        return folder
    folder = Path(name) if Path(name).is_dir() else work / name
    if not (folder / "config.json").is_file():  # `qwenlab random` writes a tokenizer over the whole vocabulary
        subprocess.run([sys.executable, "-m", "qwenlab", "random", name, str(folder)], check=True)
    return folder


def write_random_adapters(model: Path, work: Path, rank: int = 8) -> dict[str, Path]:
    """ADAPTERS PEFT adapters with random A and B (B non-zero, so each really changes the model)."""
    import torch

    from qwenlab.adapters import LoraAdapter, write_adapter
    from qwenlab.checkpoint import open_checkpoint

    config = open_checkpoint(model).config
    h, kv, inter = config.hidden_size, config.num_key_value_heads * config.head_dim, config.intermediate_size
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
              "mlp.down_proj": (h, inter)}
    out = {}
    for index in range(ADAPTERS):
        folder = work / f"{model.name}-lora{index}"
        if not (folder / "adapter_config.json").is_file():
            g = torch.Generator().manual_seed(index)
            modules = {f"model.layers.{layer}.{m}": (torch.randn(rank, i, generator=g) * 0.02,
                                                     torch.randn(o, rank, generator=g) * 0.02)
                       for layer in range(config.num_hidden_layers) for m, (o, i) in shapes.items()}
            write_adapter(LoraAdapter(modules=modules, alpha=2 * rank), folder, force=True)
        out[f"lora{index}"] = folder
    return out


# ---- one server --------------------------------------------------------------------------------------
def start_server(model: Path, adapters: dict[str, Path], port: int, threads: int | None,
                 prefill_tokens: int | None, lora_dtype: str = "auto") -> subprocess.Popen:
    command = [sys.executable, "-m", "qwenlab", "serve", str(model), "--served-model-name", "base", "--port", str(port),
               "--max-batch", "32", "--max-concurrency", "512"]
    command += [a for name, path in adapters.items() for a in ("--adapter", f"{name}={path}")]
    command += ["--threads", str(threads)] if threads else []
    command += ["--max-prefill-tokens", str(prefill_tokens)] if prefill_tokens else []
    command += ["--lora-dtype", lora_dtype] if adapters else []
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stderr.read()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("server did not start")


def request_body(model: str, prompt: list[int], max_tokens: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}


async def openai_request(client, port: int, body: dict) -> tuple[float, int]:
    """(TTFT in s, completion tokens) of one streamed completion, through the official client."""
    started = time.perf_counter()
    ttft, tokens = None, 0
    fields = {k: v for k, v in body.items() if k != "ignore_eos"}
    async for chunk in await client.completions.create(**fields, extra_body={"ignore_eos": True}):
        if ttft is None and chunk.choices and chunk.choices[0].text:
            ttft = time.perf_counter() - started
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return ttft if ttft is not None else float("nan"), tokens


async def raw_request(_client, port: int, body: dict) -> tuple[float, int]:
    """The same over a bare asyncio socket: a lighter client leaves the shared CPU to the server."""
    started = time.perf_counter()
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(payload), payload))
    ttft, tokens = None, 0
    async for line in reader:  # uvicorn sends each SSE event as one HTTP chunk, so lines arrive whole
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        if ttft is None and event["choices"] and event["choices"][0]["text"]:
            ttft = time.perf_counter() - started
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    writer.close()
    return ttft if ttft is not None else float("nan"), tokens


async def run_phase(port: int, clients: int, rounds: int, models: list[str], prompt_tokens: int, max_tokens: int,
                    token_ids: list[int], seed: int, client_kind: str) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=3600)
    send = openai_request if client_kind == "openai" else raw_request
    # Each client draws its prompts from its own generator, so client i sends the same prompts to every server
    # in a phase of this seed whatever order the requests finish in. The caller gives each phase a seed of its
    # own: prompts seen in an earlier phase would be prefix-cache hits for one server and not the other.
    generators = {index: random.Random(f"{seed}-{index}") for index in range(-1, clients)}

    def body(index: int, tokens: int = max_tokens) -> dict:
        prompt = [generators[index].choice(token_ids) for _ in range(prompt_tokens)]
        return request_body(models[index % len(models)], prompt, tokens)

    async def one_client(index: int) -> list[tuple[float, int]]:
        return [await send(client, port, body(index)) for _ in range(rounds)]

    await send(client, port, body(-1, 2))  # warm-up: first-call allocations
    before = engine_counters(port)
    hits_before = prefix_hit_tokens(port)
    started = time.perf_counter()
    results = [r for per_client in await asyncio.gather(*(one_client(i) for i in range(clients))) for r in per_client]
    wall = time.perf_counter() - started
    after = engine_counters(port)
    await client.close()
    ttfts = sorted(t for t, _ in results)
    tokens = sum(n for _, n in results)
    # Decode tokens (all but each request's first, which comes from its prefill) per second of decode steps:
    # the engine's batching gain, free of HTTP and of this client's share of the CPU.
    decode_tokens = (after[0] - before[0]) - len(results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "ttft_p50_s": round(statistics.median(ttfts), 3),
            "ttft_p95_s": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 3),
            "engine_decode_tokens_per_s": round(decode_tokens / max(after[1] - before[1], 1e-9), 1),
            # the engine's own rate while it works (prefill and decode), and the share of the wall time it
            # worked: clients get tokens_per_s = engine_busy_tokens_per_s * engine_busy_share
            "engine_busy_tokens_per_s": round((after[0] - before[0]) / max(after[2] - before[2], 1e-9), 1),
            "engine_busy_share": round((after[2] - before[2]) / wall, 3),
            # prompt tokens served from the prefix cache in this phase: 0 when no prompt repeats an earlier one
            "prefix_hit_tokens": prefix_hit_tokens(port) - hits_before}


def prefix_hit_tokens(port: int) -> float:
    """Prompt tokens taken from the prefix cache so far, all engines together, from /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith("qwenlab_prefix_cache_hit_tokens_total"))


def engine_counters(port: int) -> tuple[float, float, float]:
    """(tokens generated, seconds spent in decode steps, seconds the engine was busy) so far, from /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    tokens = seconds = busy = 0.0
    for line in text.splitlines():
        if line.startswith("qwenlab_generated_tokens_total{"):
            tokens += float(line.rpartition(" ")[2])
        elif line.startswith("qwenlab_decode_step_seconds_sum{"):
            seconds += float(line.rpartition(" ")[2])
        elif line.startswith("qwenlab_engine_busy_seconds_total{"):
            busy += float(line.rpartition(" ")[2])
    return tokens, seconds, busy


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ordinary_token_ids(folder: Path) -> list[int]:
    """The ids of the tokenizer's ordinary tokens (special and added tokens left out)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    special = set(tokenizer.get_added_tokens_decoder())  # {id: AddedToken}
    return [i for i in range(tokenizer.get_vocab_size(with_added_tokens=True)) if i not in special]


def bench_model(name: str, args, work: Path) -> list[dict]:
    folder = prepare_model(name, work)
    token_ids = ordinary_token_ids(folder)
    adapters = write_random_adapters(folder, work)  # LoRA shapes come from the float model
    if args.bits:  # serve a quantized copy of the base; the adapters run beside its weights
        from qwenlab.quant import quantize_model

        quantized = work / f"{folder.name}-int{args.bits}"
        if not (quantized / "config.json").is_file():
            quantize_model(folder, quantized, bits=args.bits, force=True, progress=False)
        folder, name = quantized, f"{name} int{args.bits}"
    # Both servers run side by side (an idle one waits on an event and costs no CPU) and each client
    # count alternates base, mixed, base, mixed, ... --repeats times: this VM's speed drifts by tens of
    # percent over a minute, and measuring one mode after the other put that drift into the ratio.
    modes = {"base": {}, f"mixed{ADAPTERS}": adapters}
    servers = {}
    try:
        for mode, served in modes.items():
            port = free_port()
            servers[mode] = (port, start_server(folder, served, port, args.threads, args.max_prefill_tokens,
                                                args.lora_dtype))
        rows = []
        for clients in args.clients:
            runs: dict[str, list[dict]] = {mode: [] for mode in modes}
            for repeat in range(args.repeats):
                for mode, served in modes.items():  # both modes get this repeat's prompts, new to both servers
                    asked = list(served) or ["base"]
                    runs[mode].append(asyncio.run(run_phase(servers[mode][0], clients, args.rounds, asked,
                                                            args.prompt_tokens, args.max_tokens, token_ids,
                                                            seed=1000 * clients + repeat, client_kind=args.client)))
            for mode, phases in runs.items():  # the median repeat by throughput stands for the mode
                median = sorted(phases, key=lambda r: r["tokens_per_s"])[len(phases) // 2]
                rows.append({"model": name, "mode": mode, **median,
                             "tokens_per_s_repeats": [r["tokens_per_s"] for r in phases]})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        for _, server in servers.values():
            server.terminate()
            server.wait(timeout=60)
    return rows


# ---- constrained traffic (issue 22) -----------------------------------------------------------------
BENCH_TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"key": {"type": "string", "maxLength": 8},
                                     "count": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["key", "count"], "additionalProperties": False}}}
BENCH_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
                "properties": {"name": {"type": "string", "maxLength": 12},
                               "age": {"type": "integer", "minimum": 0, "maximum": 120},
                               "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4}}}
KINDS = ("free", "json", "tool")


def constrained_body(kind: str, words: str, max_tokens: int, tools: bool) -> dict:
    body = {"model": "base", "messages": [{"role": "user", "content": words}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if tools:
        body.update(tools=[BENCH_TOOL], tool_choice="auto")
    if kind == "free":
        body["ignore_eos"] = True
    elif kind == "json":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "person", "schema": BENCH_SCHEMA}}
    else:
        body["tool_choice"], body["parallel_tool_calls"] = "required", False
    return body


async def raw_chat_request(port: int, body: dict) -> tuple[float, int, float]:
    """(TTFT s, completion tokens, wall s) of one streamed chat completion over a bare asyncio socket."""
    started = time.perf_counter()
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(payload), payload))
    ttft, tokens = None, 0
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"{status.decode().strip()}: {(await reader.read()).decode()[-300:]}")
    async for line in reader:
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        if event.get("error"):
            raise RuntimeError(event["error"])
        delta = event["choices"][0]["delta"] if event.get("choices") else {}
        if ttft is None and (delta.get("content") or delta.get("tool_calls")):
            ttft = time.perf_counter() - started
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    writer.close()
    return ttft if ttft is not None else float("nan"), tokens, time.perf_counter() - started


async def constrained_phase(port: int, clients: int, rounds: int, mix: bool, max_tokens: int, seed: int,
                            kinds: tuple[str, ...]) -> dict:
    """kinds: the request kinds of a mix; the tools block goes in every prompt when 'tool' is one of them."""
    rng = random.Random(seed)
    words = lambda: " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "red", "blue"]) for _ in range(12))

    async def one_client(index: int) -> list[tuple[str, float, int, float]]:
        out = []
        for r in range(rounds):
            kind = kinds[(index + r) % len(kinds)] if mix else "free"
            out.append((kind, *await raw_chat_request(port, constrained_body(kind, words(), max_tokens, tools))))
        return out

    tools = "tool" in kinds
    await raw_chat_request(port, constrained_body("json", words(), 8, tools))  # warm-up: grammar tokenizer
    started = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(one_client(i) for i in range(clients))) for r in rs]
    wall = time.perf_counter() - started
    row = {"clients": clients, "phase": "mix" if mix else "free-only", "wall_s": round(wall, 2),
           "tokens_per_s": round(sum(r[2] for r in results) / wall, 1)}
    for kind in KINDS:
        mine = [r for r in results if r[0] == kind]
        if not mine:
            continue
        ttfts = sorted(r[1] for r in mine)
        rates = [(n - 1) / (w - t) for _, t, n, w in mine if n > 1 and w > t]
        row[kind] = {"requests": len(mine), "tokens": sum(r[2] for r in mine),
                     "decode_tok_s_per_row": round(statistics.median(rates), 1) if rates else float("nan"),
                     "ttft_p50_s": round(statistics.median(ttfts), 3),
                     "ttft_p95_s": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 3)}
    return row


def constrained_model_folder(name: str, args, work: Path) -> tuple[Path, str]:
    """A folder with a byte-level tokenizer (grammars need one): nano, a folder as given, or a preset."""
    if name == "nano":
        from qwenlab.nano import nano_path

        folder = nano_path()
    elif Path(name).is_dir():
        folder, name = Path(name), Path(name).name
    else:
        folder = work / f"{name}-bpe"
        if not (folder / "config.json").is_file():
            subprocess.run([sys.executable, "-m", "qwenlab", "random", name, str(folder)], check=True)
    if args.bits and not name.endswith(f"int{args.bits}"):
        from qwenlab.quant import quantize_model

        quantized = work / f"{folder.name}-int{args.bits}"
        if not (quantized / "config.json").is_file():
            quantize_model(folder, quantized, bits=args.bits, force=True, progress=False)
        folder, name = quantized, f"{name} int{args.bits}"
    return folder, name


def bench_constrained(name: str, args, work: Path) -> list[dict]:
    from qwenlab.checkpoint import open_checkpoint

    folder, name = constrained_model_folder(name, args, work)
    # Qwen2.5's tools block is ~600 tokens in nano's 400-token vocabulary, over nano's 512-token context:
    # there, the mix is free and json rows only (and no prompt carries tools).
    kinds = KINDS if open_checkpoint(folder).config.max_position_embeddings >= 1024 else ("free", "json")
    port = free_port()
    server = start_server(folder, {}, port, args.threads, args.max_prefill_tokens)
    rows = []
    try:
        for clients in args.clients:
            runs = {"free-only": [], "mix": []}
            for _ in range(args.repeats):
                for mix in (False, True):
                    phase = asyncio.run(constrained_phase(port, clients, max(args.rounds, 3), mix, args.max_tokens,
                                                          seed=clients, kinds=kinds))
                    runs[phase["phase"]].append(phase)
            for phases in runs.values():
                median = sorted(phases, key=lambda r: r["tokens_per_s"])[len(phases) // 2]
                rows.append({"model": name, **median})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    return rows


def constrained_table(rows: list[dict]) -> str:
    lines = ["| model | clients | phase | tokens/s | kind | requests | tokens | decode tok/s per row (median) "
             "| TTFT p50 s | TTFT p95 s |", "|---|---:|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        for kind in KINDS:
            if kind in r:
                k = r[kind]
                lines.append(f"| {r['model']} | {r['clients']} | {r['phase']} | {r['tokens_per_s']} | {kind} "
                             f"| {k['requests']} | {k['tokens']} | {k['decode_tok_s_per_row']} | {k['ttft_p50_s']} "
                             f"| {k['ttft_p95_s']} |")
    lines.append("")
    for r in rows:
        if r["phase"] != "mix":
            continue
        free = r["free"]
        only = next(o for o in rows if o["model"] == r["model"] and o["clients"] == r["clients"]
                    and o["phase"] == "free-only")
        for kind in ("json", "tool"):
            if kind not in r:
                continue
            c = r[kind]
            lines.append(f"- {r['model']}, {r['clients']} clients, {kind} / free rows in the mix: decode rate "
                         f"{c['decode_tok_s_per_row'] / free['decode_tok_s_per_row']:.2f} (target >= 0.9), p95 TTFT "
                         f"{c['ttft_p95_s'] / free['ttft_p95_s']:.2f} (target <= 1.2)")
        lines.append(f"- {r['model']}, {r['clients']} clients: mix / free-only tokens/s = "
                     f"{r['tokens_per_s'] / only['tokens_per_s']:.2f}")
    return "\n".join(lines)


# ---- real traffic (issue 25): multi-turn chat, agent loop, unique prompts, against llama.cpp ----------
WORDS = ("alpha beta gamma delta river stone cloud paper window garden orange silver market engine planet "
         "letter bridge forest signal copper harbor lantern meadow pocket rocket saddle timber velvet").split()
SCENARIOS = ("chat", "agent", "unique")


def chatml(messages: list[tuple[str, str]], open_turn: bool = True) -> str:
    """Qwen2.5's chat format, written out: every server gets the same prompt text on /v1/completions."""
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    return text + ("<|im_start|>assistant\n" if open_turn else "")


def agent_system_prompt(tokenizer, target_tokens: int = 1000) -> str:
    """A system prompt with a tools block (Qwen2.5's <tools> layout) padded with tool descriptions to
    about `target_tokens` tokens of the served tokenizer."""
    rng = random.Random(25)
    tools, text = [], ""
    while True:
        name = f"tool_{len(tools)}"
        tools.append(json.dumps({"type": "function", "function": {
            "name": name, "description": " ".join(rng.choice(WORDS) for _ in range(12)),
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
                           "required": ["query"]}}}))
        candidate = ("You are an agent. Call tools to finish the task.\n\n# Tools\n\n<tools>\n" + "\n".join(tools)
                     + "\n</tools>\n\nFor each call, return a json object within <tool_call></tool_call> tags.")
        if len(tokenizer.encode(candidate)) > target_tokens:
            return text or candidate
        text = candidate


class Streamed:
    """One streamed /v1/completions answer over a bare asyncio socket, chunked transfer decoded."""

    @staticmethod
    async def post(port: int, body: dict) -> tuple[str, float, int, float]:
        """(text, TTFT s, completion tokens, wall s)."""
        started = time.perf_counter()
        payload = json.dumps(body).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(payload), payload))
        status = await reader.readline()
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode().partition(":")
            headers[key.strip().lower()] = value.strip().lower()
        if b" 200 " not in status:
            raise RuntimeError(f"{status.decode().strip()}: {(await reader.read()).decode()[-300:]}")
        chunked = headers.get("transfer-encoding") == "chunked"
        buffer, text, ttft, tokens, chunks, finish = b"", [], None, None, 0, None
        while True:
            if chunked:
                size = int((await reader.readline()).strip() or b"0", 16)
                if size == 0:
                    break
                data = await reader.readexactly(size + 2)
                buffer += data[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    break
                buffer += data
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if not line.startswith(b"data: {"):
                        continue
                    parsed = json.loads(line[6:])
                    if parsed.get("error"):
                        raise RuntimeError(parsed["error"])
                    for choice in parsed.get("choices") or []:
                        if choice.get("text"):
                            ttft = ttft if ttft is not None else time.perf_counter() - started
                            text.append(choice["text"])
                            chunks += 1
                        finish = choice.get("finish_reason") or finish
                    if parsed.get("usage"):
                        tokens = parsed["usage"]["completion_tokens"]
        writer.close()
        if tokens is None:  # llama-cpp-python's server sends no usage when streaming: one token per chunk
            tokens = body["max_tokens"] if finish == "length" else chunks
        return "".join(text), ttft if ttft is not None else float("nan"), tokens, time.perf_counter() - started


def scenario_body(prompt: str, max_tokens: int) -> dict:
    return {"model": "base", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}


async def scenario_phase(port: int, scenario: str, clients: int, turns: int, max_tokens: int, system: str,
                         seed: int) -> dict:
    """Every client runs one conversation of `turns` requests, each prompt re-sending the whole history."""
    rng = random.Random(seed)
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))

    async def one_client(index: int) -> list[tuple[str, float, int, float]]:
        if scenario == "chat":  # a short shared system prompt, the client's own conversation after it
            messages, asks = [("system", "You are a helpful assistant.")], lambda: ("user", words(20))
        elif scenario == "agent":  # the 1,000-token tools prompt, then a task and short tool results
            messages, asks = [("system", system), ("user", "Task: " + words(12))], None
        else:  # unique: nothing shared, not even the first token
            messages, asks = [], None
        out = []
        for turn in range(turns):
            if scenario == "unique":
                prompt = f"{index}-{turn}-{seed} " + words(80)
            else:
                if asks is not None:
                    messages.append(asks())
                elif turn:
                    messages.append(("user", "<tool_response>\n" + words(8) + "\n</tool_response>"))
                prompt = chatml(messages)
            text, ttft, tokens, wall = await Streamed.post(port, scenario_body(prompt, max_tokens))
            if scenario != "unique":
                messages.append(("assistant", text))
            out.append((text, ttft, tokens, wall))
        return out

    started = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(one_client(i) for i in range(clients))) for r in rs]
    wall = time.perf_counter() - started
    ttfts = sorted(r[1] for r in results)
    return {"scenario": scenario, "clients": clients, "requests": len(results), "tokens": sum(r[2] for r in results),
            "wall_s": round(wall, 2), "tokens_per_s": round(sum(r[2] for r in results) / wall, 1),
            "ttft_p50_s": round(statistics.median(ttfts), 3),
            "ttft_p95_s": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 3)}


def llama_server_binary() -> Path:
    """llama.cpp's llama-server, built once into the qwenlab cache from the llama.cpp sources vendored in
    the llama-cpp-python 0.3.36 sdist, with scripts/llama_cpp_cmake_args.sh's portable flags (never
    GGML_NATIVE: llama.cpp's AMX path dies with SIGILL on this kind of host)."""
    from qwenlab.home import qwenlab_home

    root = qwenlab_home() / "llama-server-src"
    binary = root / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    root.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(pip + ["download", "--no-binary", ":all:", "--no-deps", "llama-cpp-python==0.3.36", "-d", str(root)],
                   check=True)
    subprocess.run(["tar", "xzf", "llama_cpp_python-0.3.36.tar.gz"], cwd=root, check=True)
    flags = subprocess.run(["bash", str(Path(__file__).parents[1] / "scripts" / "llama_cpp_cmake_args.sh")],
                           check=True, capture_output=True, text=True).stdout.split()
    subprocess.run(["cmake", "-S", "llama_cpp_python-0.3.36/vendor/llama.cpp", "-B", "build", *flags,
                    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DBUILD_SHARED_LIBS=OFF"],
                   cwd=root, check=True)
    subprocess.run(["cmake", "--build", "build", "--target", "llama-server", "-j2"], cwd=root, check=True)
    return binary


def wait_ready(process: subprocess.Popen, port: int, path: str = "/health", log: Path | None = None) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log is not None and log.is_file() else ""
            raise RuntimeError(f"server exited with {process.returncode}: {tail}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("server did not start")


def start_peer(kind: str, folder: Path, gguf: Path, port: int, clients: int, threads: int | None,
               prefix_cache_mb: int = 512) -> subprocess.Popen:
    threads = threads or 2
    if kind == "qwenlab":
        command = [sys.executable, "-m", "qwenlab", "serve", str(folder), "--served-model-name", "base", "--port",
                   str(port), "--max-batch", "32", "--max-concurrency", "512", "--prefix-cache-mb", str(prefix_cache_mb)]
        path = "/health"
    elif kind == "llama-server":
        command = [str(llama_server_binary()), "-m", str(gguf), "--alias", "base", "--port", str(port), "--host",
                   "127.0.0.1", "--parallel", str(clients), "-c", str(4096 * clients), "-t", str(threads)]
        path = "/health"
    else:
        import importlib.util

        if importlib.util.find_spec("sse_starlette") is None:
            raise SystemExit("llama-cpp-python's server needs its extras: pip install -e '.[bench]' (or --peers llama-server)")
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "base", "--port",
                   str(port), "--n_ctx", "4096", "--n_threads", str(threads), "--interrupt_requests", "False"]
        path = "/v1/models"
    log = Path(tempfile_dir()) / f"serve-bench-{kind}-{port}.log"  # a file, not a pipe: a chatty server never blocks
    with open(log, "w") as sink:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=sink)
    wait_ready(process, port, path, log)
    return process


def prefix_metrics(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    values = {}
    for line in text.splitlines():
        for name in ("qwenlab_prefix_cache_hit_rate", "qwenlab_prefix_cache_cached_tokens"):
            if line.startswith(name + " "):
                values[name.removeprefix("qwenlab_prefix_cache_")] = round(float(line.rpartition(" ")[2]), 3)
    return values


def bench_scenarios(name: str, args, work: Path) -> list[dict]:
    from qwenlab.model import load_tokenizer

    folder = Path(name)
    gguf = Path(args.gguf)
    system = agent_system_prompt(load_tokenizer(folder))
    servers = [("qwenlab, prefix cache off", "qwenlab", 0), ("qwenlab, prefix cache on", "qwenlab", 512),
               ("llama-server --parallel N", "llama-server", 0), ("llama-cpp-python server", "llama-cpp-python", 0)]
    servers = [s for s in servers if s[1] in args.peers.split(",") or s[1] == "qwenlab"]
    rows = []
    for label, kind, cache_mb in servers:  # one server at a time: they would share the 2 cores
        port = free_port()
        process = start_peer(kind, folder, gguf, port, max(args.clients), args.threads, cache_mb)
        try:
            asyncio.run(Streamed.post(port, scenario_body("warm up", 2)))
            for scenario in SCENARIOS:
                for clients in args.clients:
                    row = asyncio.run(scenario_phase(port, scenario, clients, args.turns,
                                                     args.max_tokens if scenario != "agent" else args.max_tokens // 2,
                                                     system, seed=clients))
                    row["server"] = label
                    if kind == "qwenlab":
                        row.update(prefix_metrics(port))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            process.terminate()
            process.wait(timeout=60)
    return rows


def scenarios_table(rows: list[dict]) -> str:
    lines = ["| scenario | clients | server | requests | tokens | wall s | tokens/s | TTFT p50 s | TTFT p95 s "
             "| prefix hit rate (cumulative) |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (SCENARIOS.index(r["scenario"]), r["clients"])):
        lines.append(f"| {r['scenario']} | {r['clients']} | {r['server']} | {r['requests']} | {r['tokens']} "
                     f"| {r['wall_s']} | {r['tokens_per_s']} | {r['ttft_p50_s']} | {r['ttft_p95_s']} "
                     f"| {r.get('hit_rate', '')} |")
    lines.append("")
    get = {(r["scenario"], r["clients"], r["server"]): r for r in rows}
    for scenario in SCENARIOS:
        for clients in sorted({r["clients"] for r in rows}):
            on = get.get((scenario, clients, "qwenlab, prefix cache on"))
            off = get.get((scenario, clients, "qwenlab, prefix cache off"))
            peer = get.get((scenario, clients, "llama-server --parallel N"))
            slow = get.get((scenario, clients, "llama-cpp-python server"))
            if not on:
                continue
            notes = []
            if off:
                notes.append(f"cache on/off tokens/s {on['tokens_per_s'] / off['tokens_per_s']:.2f}, "
                             f"TTFT p50 {on['ttft_p50_s']} vs {off['ttft_p50_s']} s")
            if peer:
                notes.append(f"vs llama-server: tokens/s {on['tokens_per_s'] / peer['tokens_per_s']:.2f}x, "
                             f"TTFT p50 {on['ttft_p50_s']} vs {peer['ttft_p50_s']} s")
            if slow:
                notes.append(f"vs llama-cpp-python: tokens/s {on['tokens_per_s'] / slow['tokens_per_s']:.2f}x, "
                             f"TTFT p50 {on['ttft_p50_s']} vs {slow['ttft_p50_s']} s")
            lines.append(f"- {scenario}, {clients} clients: " + "; ".join(notes))
    return "\n".join(lines)


def delivered(row: dict) -> str:
    """What clients received against what the engine makes while it works (issue 25: >= 0.9)."""
    rate = row.get("engine_busy_tokens_per_s")
    return f"{row['tokens_per_s'] / rate:.2f}" if rate else ""


def table(rows: list[dict]) -> str:
    lines = ["| model | mode | clients | requests | tokens | wall s | tokens/s (median) | tokens/s of each repeat "
             "| TTFT p50 s | TTFT p95 s | engine decode tok/s | engine busy tok/s | engine busy share | "
             "tokens/s / engine busy tok/s |", "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        repeats = ", ".join(str(v) for v in r.get("tokens_per_s_repeats", [r["tokens_per_s"]]))
        lines.append(f"| {r['model']} | {r['mode']} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall_s']} "
                     f"| {r['tokens_per_s']} | {repeats} | {r['ttft_p50_s']} | {r['ttft_p95_s']} "
                     f"| {r['engine_decode_tokens_per_s']} | {r.get('engine_busy_tokens_per_s', '')} "
                     f"| {r.get('engine_busy_share', '')} | {delivered(r)} |")
    rate = {(r["model"], r["mode"], r["clients"]): r["tokens_per_s"] for r in rows}
    lines.append("")
    for model in dict.fromkeys(r["model"] for r in rows):
        for clients in sorted({c for m, _, c in rate if m == model}):
            base, mixed = rate.get((model, "base", clients)), rate.get((model, f"mixed{ADAPTERS}", clients))
            if base and mixed:
                lines.append(f"- {model}, {clients} clients: mixed{ADAPTERS} / base throughput = {mixed / base:.2f} "
                             "(target >= 0.85 on the 0.5B shape at 8 clients)")
        for mode in ("base", f"mixed{ADAPTERS}"):
            one, eight = rate.get((model, mode, 1)), rate.get((model, mode, 8))
            if one and eight:
                lines.append(f"- {model}, {mode}: 8 clients / 1 client throughput = {eight / one:.2f} (target >= 3)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="nano,qwen2.5-0.5b")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client, one after the other")
    parser.add_argument("--repeats", type=int, default=3,
                        help="phases per mode and client count, base and mixed alternating; the median is reported")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    parser.add_argument("--max-prefill-tokens", type=int, default=None, help="the server's prefill budget per step")
    parser.add_argument("--lora-dtype", default="auto", choices=["auto", "fp32", "bf16"],
                        help="adapters: the mixed server's --lora-dtype")
    parser.add_argument("--work-dir", default=str(Path(tempfile_dir()) / "qwenlab-serve-bench"))
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    parser.add_argument("--bits", type=int, choices=[8, 4], default=None, help="serve an int8/int4 copy of the base")
    parser.add_argument("--turns", type=int, default=6, help="scenarios: requests per client, history growing")
    parser.add_argument("--gguf", default=None, help="scenarios: the GGUF the llama.cpp peers serve "
                        "(`qwenlab export gguf FLOAT_FOLDER --type q4_0`)")
    parser.add_argument("--peers", default="llama-server,llama-cpp-python", help="scenarios: peers to run")
    parser.add_argument("--traffic", choices=["adapters", "constrained", "scenarios"], default="adapters",
                        help="adapters: base vs 8 mixed adapters; constrained: json_schema and forced tool-call rows "
                             "vs free rows (issue 22); scenarios: chat, agent and unique prompts vs llama.cpp (issue 25)")
    parser.add_argument("--client", choices=["raw", "openai"], default="raw",
                        help="raw: a bare asyncio HTTP client (default; lighter on a shared CPU); openai: AsyncOpenAI")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    bench, render = {"constrained": (bench_constrained, constrained_table), "adapters": (bench_model, table),
                     "scenarios": (bench_scenarios, scenarios_table)}[args.traffic]
    rows = [row for name in args.models.split(",") for row in bench(name, args, work)]
    print()
    print(render(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


def tempfile_dir() -> str:
    import tempfile

    return tempfile.gettempdir()


if __name__ == "__main__":
    main()
