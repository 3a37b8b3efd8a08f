"""Speed bench: TTFT, prompt tokens/s, decode tokens/s and peak RSS, for qwenlab and its peers.

Each engine (qwenlab at one dtype, transformers, llama.cpp) is measured in a fresh Python
subprocess, so its peak RSS is its own and no engine warms another's caches or allocator.
A run feeds a fixed random prompt of `ctx` tokens and decodes `gen` tokens greedily (no stop
token): TTFT is the time to the first new token (prefill + first sample), prompt tokens/s is
ctx / TTFT, decode tokens/s is (gen - 1) / (time after the first token). One warm-up run is not
counted; figures are the median with min-max over `runs` runs.

Beside each figure: the kernel path that ran (e.g. bf16:avx512bf16, int4:vnni), the memory-bandwidth
bound of its decode (a STREAM-like read measured here, over the bytes a token reads) and the figure's
share of it, and a warning where the runs disagree or other processes kept the machine busy
(bench/machine.py); such a figure is recorded with its warnings.

Variants: fp32/bf16 run the float folder; int8/int4 run a quantized folder (MODEL itself when it
is one, else MODEL quantized once into the cache with qwenlab's defaults). llama.cpp runs this
package's GGUF export of the same float weights: f16 for fp32/bf16, q8_0 for int8, q4_0 for int4,
with the token embedding / LM head at the type that matches the variant's head (q8_0 for qwenlab's
default int8 head), so both engines read the same number of bytes per token.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qwenlab.bench.machine import BusyMeter, run_warnings
from qwenlab.errors import QwenlabError
from qwenlab.home import qwenlab_home
from qwenlab.text_table import format_table

DTYPES = ("fp32", "bf16", "int8", "int4")
PEERS = ("llama.cpp", "hf")
GGUF_FOR_DTYPE = {"fp32": "f16", "bf16": "f16", "int8": "q8_0", "int4": "q4_0"}
LLAMA_CPP_INSTALL = ("llama-cpp-python is not installed; install it with `pip install llama-cpp-python` "
                     "(it compiles llama.cpp, ~20 minutes on 2 cores) to use --vs llama.cpp")


@dataclass
class EngineResult:
    engine: str  # qwenlab | hf | llama.cpp
    dtype: str  # the variant compared (fp32, bf16, int8, int4)
    weights: str  # what actually ran: e.g. "int4 g64 rtn, head int8 (native)", "gguf q4_0", "fp32"
    threads: int
    load_s: float
    peak_rss_bytes: int
    runs: dict[int, list[dict]] = field(default_factory=dict)  # ctx -> [{ttft_s, prompt_tokens_per_s, decode_tokens_per_s}]
    kernel: str = ""  # the kernel path that ran: bf16:avx512bf16, int4:vnni, gguf q4_0, fp32:torch, ...
    bytes_per_token: dict[int, int] = field(default_factory=dict)  # ctx -> bytes a decode step reads (mid-run)
    # Its bound's bandwidth: the faster of two STREAM-like reads, just before its process started and in that
    # process after its runs. A shared host's read rate moves by 2x within minutes (its neighbours), so each
    # engine is held to what the machine gave around its own runs, not to a reading taken earlier.
    bandwidth_bytes_per_s: float | None = None

    def warnings(self, ctx: int) -> list[str]:
        return run_warnings(self.runs.get(ctx, []))

    def summary(self, ctx: int, metric: str) -> tuple[float, float, float] | None:
        values = [r[metric] for r in self.runs.get(ctx, [])]
        return (statistics.median(values), min(values), max(values)) if values else None


# ---- the worker: one engine, in its own process --------------------------------------------------
def _peak_rss_bytes() -> int:
    """This process's resident-memory high-water mark (VmHWM). Not ru_maxrss: on Linux that also
    counts the parent's pages the worker had before exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _prompt(ctx: int, vocab: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(0, vocab) for _ in range(ctx)]


def _time_stream(tokens_iter, gen: int) -> tuple[float, float]:
    """(seconds to the first item, seconds for the rest) of an iterator of new tokens."""
    start = time.perf_counter()
    first, count = None, 0
    for _ in tokens_iter:
        count += 1
        if first is None:
            first = time.perf_counter() - start
        if count == gen:
            break
    total = time.perf_counter() - start
    if count < gen:
        raise RuntimeError(f"the engine stopped after {count} of {gen} tokens")
    return first, total - first


def _run_qwenlab(spec: dict):
    import torch

    from qwenlab.loading import load
    from qwenlab.model.generate import GenerationConfig, generate_token_ids

    from qwenlab.bench.machine import kernel_path, model_bytes_per_token

    model = load(spec["path"], spec["dtype"], quant_backend=spec.get("backend"), fuse=spec.get("fuse", True),
                 float_backend=spec.get("float_backend")).model
    vocab = model.config.vocab_size

    def run(prompt: list[int], gen: int) -> tuple[float, float]:
        config = GenerationConfig(max_new_tokens=gen, max_context=len(prompt) + gen)
        return _time_stream(generate_token_ids(model, [prompt], config, set()), gen)

    return vocab, run, torch, kernel_path(model, spec["dtype"]), lambda ctx: model_bytes_per_token(model, ctx)


def _run_hf(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=dtype).eval()
    vocab = model.config.vocab_size
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # (tied: counted once)
    c = model.config
    kv_per_slot = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * dtype.itemsize

    class Stamps:  # transformers' streamer interface: put() gets the prompt, then each new token
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def run(prompt: list[int], gen: int) -> tuple[float, float]:
        stamps = Stamps()
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen, min_new_tokens=gen,
                           do_sample=False, streamer=stamps, pad_token_id=0)
        new = stamps.times[1:]  # the first put() is the prompt
        return new[0] - start, new[-1] - new[0]

    return vocab, run, torch, f"{spec['dtype']}:torch", lambda ctx: weights + kv_per_slot * ctx


def _run_llama_cpp(spec: dict):
    from llama_cpp import Llama

    threads = spec["threads"]
    n_ctx = max(spec["contexts"]) + spec["gen"] + 8
    llm = Llama(spec["path"], n_ctx=n_ctx, n_batch=max(512, max(spec["contexts"])), n_threads=threads,
                n_threads_batch=threads, verbose=False)

    def run(prompt: list[int], gen: int) -> tuple[float, float]:
        llm.reset()  # forget the previous run: the prompt must be evaluated again, not reused from the cache
        return _time_stream(llm.generate(prompt, temp=0.0, top_k=1, reset=True), gen)

    # A token reads the whole file (a tied table is also the output matrix) and its f16 KV cache.
    meta = llm.metadata
    layers, kv_heads = int(meta.get("qwen2.block_count", 0)), int(meta.get("qwen2.attention.head_count_kv", 0))
    head_dim = int(meta.get("qwen2.embedding_length", 0)) // max(1, int(meta.get("qwen2.attention.head_count", 1)))
    size = Path(spec["path"]).stat().st_size
    return llm.n_vocab(), run, None, spec["weights"], lambda ctx: size + 2 * layers * kv_heads * head_dim * 2 * ctx


def worker(spec: dict) -> dict:
    """Measure one engine; `spec` says which (see `_spec`). Returns EngineResult as a dict."""
    threads = spec["threads"]
    start = time.perf_counter()
    if spec["engine"] == "stream":  # the machine's read bandwidth, on the engines' thread count
        from qwenlab.bench.machine import read_bandwidth_bytes_per_s

        return {"bandwidth_bytes_per_s": read_bandwidth_bytes_per_s(threads)}
    if spec["engine"] == "llama.cpp":
        vocab, run, torch, kernel, bytes_per_token = _run_llama_cpp(spec)
    else:
        import torch

        torch.set_num_threads(threads)
        vocab, run, torch, kernel, bytes_per_token = (_run_qwenlab if spec["engine"] == "qwenlab" else _run_hf)(spec)
    load_s = time.perf_counter() - start
    result = EngineResult(spec["engine"], spec["dtype"], spec["weights"], threads, round(load_s, 3), 0, kernel=kernel)
    meter = BusyMeter()
    for ctx in spec["contexts"]:
        prompt = _prompt(ctx, vocab, spec["seed"])
        run(prompt, min(spec["gen"], 8))  # warm-up (allocator, kernel build, caches); not counted
        runs = []
        for _ in range(spec["runs"]):
            meter.start()
            ttft, rest = run(prompt, spec["gen"])
            runs.append({"ttft_s": ttft, "prompt_tokens_per_s": ctx / ttft,
                         "decode_tokens_per_s": (spec["gen"] - 1) / rest if rest > 0 else float("inf"),
                         "other_cpu_cores": meter.stop()})
        result.runs[ctx] = runs
        result.bytes_per_token[ctx] = int(bytes_per_token(ctx + spec["gen"] // 2))
    result.peak_rss_bytes = _peak_rss_bytes()  # before the read below, whose buffer is not the engine's
    from qwenlab.bench.machine import read_bandwidth_bytes_per_s

    result.bandwidth_bytes_per_s = read_bandwidth_bytes_per_s(threads)  # the "after" read (see EngineResult)
    return asdict(result)


def run_engine_with_bound(spec: dict, timeout_s: float | None = None) -> EngineResult:
    """run_engine, with the bandwidth read just before it started (the worker reads again after its runs)."""
    before = measure_bandwidth(spec["threads"])
    result = run_engine(spec, timeout_s)
    reads = [b for b in (before, result.bandwidth_bytes_per_s) if b]
    result.bandwidth_bytes_per_s = max(reads) if reads else None
    return result


def run_engine(spec: dict, timeout_s: float | None = None) -> EngineResult:
    command = [sys.executable, "-m", "qwenlab.bench.speed", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout_s)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise QwenlabError(f"{spec['engine']} ({spec['dtype']}) failed: {tail}")
    data = json.loads(lines[-1])
    data["runs"] = {int(k): v for k, v in data["runs"].items()}
    data["bytes_per_token"] = {int(k): v for k, v in data.get("bytes_per_token", {}).items()}
    return EngineResult(**data)


def measure_bandwidth(threads: int, timeout_s: float | None = 300) -> float | None:
    """Bytes/s of a STREAM-like read in a fresh subprocess (None where the native library does not run)."""
    command = [sys.executable, "-m", "qwenlab.bench.speed", json.dumps({"engine": "stream", "threads": threads})]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        return json.loads(lines[-1])["bandwidth_bytes_per_s"] if done.returncode == 0 and lines else None
    except (OSError, subprocess.SubprocessError, ValueError, KeyError):
        return None


# ---- variants: quantized folders and GGUF files, made once and cached ---------------------------
def variants_dir() -> Path:
    return qwenlab_home() / "bench-variants"


def _folder_key(folder: Path, extra: str) -> str:
    digest = hashlib.sha256(str(folder.resolve()).encode() + extra.encode())
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors" or path.name == "config.json":
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def quantized_variant(float_folder: Path, bits: int, progress: bool = True) -> Path:
    from qwenlab.quant.quantize import DEFAULT_HEAD_BITS, quantize_model

    group_size = default_group_size(bits)
    out = variants_dir() / f"{float_folder.name}-int{bits}-g{group_size}-{_folder_key(float_folder, f'{bits}')}"
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        quantize_model(float_folder, out, bits=bits, group_size=group_size, head_bits=DEFAULT_HEAD_BITS,
                       force=True, progress=progress)
    return out


def gguf_variant(float_folder: Path, kind: str, head_kind: str | None = None) -> Path:
    from qwenlab.quant.gguf_export import export_gguf

    head_kind = head_kind or kind
    name = kind if head_kind == kind else f"{kind}-head-{head_kind}"
    out = variants_dir() / f"{float_folder.name}-{name}-{_folder_key(float_folder, name)}.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        export_gguf(float_folder, out, kind, head_kind=head_kind, force=True)
    return out


def gguf_head_for(section: dict | None, kind: str) -> str:
    """The GGUF type that mirrors a quantized variant's embedding / LM head (same bits per weight)."""
    if not section:
        return kind
    return {16: "f16", 8: "q8_0", 4: "q4_0"}[section.get("head_bits", 8)]


def default_group_size(bits: int) -> int:
    from qwenlab.quant.quantize import DEFAULT_GROUP_SIZE

    return DEFAULT_GROUP_SIZE[bits]


def float_source(folder: Path) -> Path | None:
    """The float model a quantized folder was made from (its lineage), if it still exists."""
    from qwenlab.checkpoint.lineage import read_lineage

    for item in (read_lineage(folder) or {}).get("inputs", []):
        path = Path(item.get("path", ""))
        if item.get("role") == "base" and (path / "config.json").is_file():
            return path
    return None


# ---- the bench -------------------------------------------------------------------------------------
@dataclass
class SpeedReport:
    model: str
    threads: int
    contexts: list[int]
    gen: int
    runs: int
    results: list[EngineResult]
    bandwidth_bytes_per_s: float | None = None  # a STREAM-like read before the engines (each has its own too)

    def as_dict(self) -> dict:
        return {"model": self.model, "threads": self.threads, "contexts": self.contexts, "gen": self.gen,
                "runs": self.runs, "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
                "results": [asdict(r) for r in self.results]}

    def bound(self, result: EngineResult, ctx: int) -> float | None:
        """The decode tokens/s the memory bandwidth allows this engine at this context: the engine's own reads
        (around its runs) where it has them, else the bench's."""
        per_token = result.bytes_per_token.get(ctx)
        bandwidth = result.bandwidth_bytes_per_s or self.bandwidth_bytes_per_s
        return bandwidth / per_token if bandwidth and per_token else None

    def bandwidth_range(self) -> tuple[float, float] | None:
        reads = [b for b in (self.bandwidth_bytes_per_s, *(r.bandwidth_bytes_per_s for r in self.results)) if b]
        return (min(reads), max(reads)) if reads else None


def _parse_list(values, allowed: tuple[str, ...] | None, what: str) -> list[str]:
    items = [v.strip() for v in (values.split(",") if isinstance(values, str) else values) if str(v).strip()]
    if allowed is not None:
        bad = [v for v in items if v not in allowed]
        if bad:
            raise QwenlabError(f"unknown {what} '{bad[0]}'; expected one of {', '.join(allowed)}")
    if not items:
        raise QwenlabError(f"no {what} given")
    return items


def bench_speed(model: str | Path, *, dtypes=("int4",), contexts=(128,), gen: int = 128, runs: int = 5,
                threads: int | None = None, vs=(), seed: int = 0, backend: str | None = None,
                record: bool = True, log=print) -> SpeedReport:
    """Measure qwenlab (and peers) on MODEL; see the module docstring."""
    from qwenlab.checkpoint import open_checkpoint, resolve_model_path

    dtypes = _parse_list(dtypes, DTYPES, "dtype")
    vs = _parse_list(vs, PEERS, "peer engine") if vs else []
    try:
        contexts = sorted({int(c) for c in (contexts.split(",") if isinstance(contexts, str) else contexts)})
    except ValueError:
        raise QwenlabError(f"--ctx must be a comma-separated list of integers, got {contexts!r}") from None
    if not contexts or min(contexts) < 1 or gen < 2 or runs < 1:
        raise QwenlabError("--ctx values must be >= 1, --gen >= 2 and --runs >= 1")
    if "llama.cpp" in vs and importlib.util.find_spec("llama_cpp") is None:
        raise QwenlabError(LLAMA_CPP_INSTALL)
    import torch

    threads = int(threads or torch.get_num_threads())
    folder = resolve_model_path(model)
    checkpoint = open_checkpoint(folder, validate=False)
    quantized = checkpoint.config.extra.get("quantization")
    float_folder = folder if not quantized else float_source(folder)
    if quantized:
        own = f"int{quantized.get('bits')}"
        if dtypes != [own] and set(dtypes) != {own}:
            if float_folder is None:
                raise QwenlabError(f"{folder}: is an {own} model; bench it with --dtype {own}, "
                                   "or bench the float model")
    if (vs or any(d in ("fp32", "bf16") for d in dtypes)) and float_folder is None:
        raise QwenlabError(f"{folder}: the float model it was quantized from is not found (lineage.json); "
                           "peers and fp32/bf16 need it")
    base = dict(threads=threads, contexts=contexts, gen=gen, runs=runs, seed=seed)
    results: list[EngineResult] = []
    log(f"[bench] memory bandwidth: a STREAM-like read on {threads} thread(s)")
    bandwidth = measure_bandwidth(threads)
    for dtype in dtypes:
        section = None
        if dtype in ("fp32", "bf16"):
            path, weights = float_folder, dtype
        elif quantized and dtype == f"int{quantized.get('bits')}":
            path, section = folder, quantized
        else:
            log(f"[bench] preparing the {dtype} variant of {float_folder.name}")
            path = quantized_variant(float_folder, int(dtype[3:]))
            section = open_checkpoint(path, validate=False).config.extra["quantization"]
        weights = _describe_quantized(section) if section else dtype
        log(f"[bench] qwenlab {dtype} ({weights}), {threads} thread(s)")
        # --kernel aten/reference: PyTorch's kernels for the float variants too; native: the native stack or fail
        float_backend = {"aten": "torch", "reference": "torch", "native": "native"}.get(backend)
        result = run_engine_with_bound({**base, "engine": "qwenlab", "dtype": dtype, "path": str(path), "weights": weights,
                              "backend": backend, "float_backend": float_backend})
        result.weights += f" ({_backend_label(backend)})" if dtype.startswith("int") else ""
        results.append(result)
        for ctx in contexts:
            for warning in result.warnings(ctx):
                log(f"[bench] warning: qwenlab {dtype} at ctx {ctx}: {warning}")
        if record:
            _record(path, result, contexts, gen)
        if "llama.cpp" in vs:
            kind = GGUF_FOR_DTYPE[dtype]
            head_kind = gguf_head_for(section, kind)  # same bits per weight for the embedding / LM head
            label = f"gguf {kind}" + (f", token_embd {head_kind}" if head_kind != kind else "")
            log(f"[bench] llama.cpp {label} for {dtype}")
            gguf = gguf_variant(float_folder, kind, head_kind)
            results.append(run_engine_with_bound({**base, "engine": "llama.cpp", "dtype": dtype, "path": str(gguf),
                                        "weights": label}))
    if "hf" in vs:
        for dtype in ["fp32"] + (["bf16"] if "bf16" in dtypes else []):
            log(f"[bench] transformers generate {dtype}")
            results.append(run_engine_with_bound({**base, "engine": "hf", "dtype": dtype, "path": str(float_folder),
                                        "weights": dtype}))
    return SpeedReport(str(folder), threads, contexts, gen, runs, results, bandwidth)


def _describe_quantized(section: dict) -> str:
    head = section.get("head_bits")
    return (f"int{section.get('bits')} g{section.get('group_size')} {section.get('method')}, "
            f"head {'bf16' if head == 16 else f'int{head}'}")


def _backend_label(backend: str | None) -> str:
    if backend not in (None, "auto"):
        return f"{backend} kernel"
    from qwenlab import native

    return "native kernel" if native.available() else "PyTorch kernels"


def _record(folder: Path, result: EngineResult, contexts: list[int], gen: int) -> None:
    from qwenlab.variants.results import record_measurement

    figures, warnings = {}, {}
    for ctx in contexts:
        figures[str(ctx)] = {"ttft_s": round(result.summary(ctx, "ttft_s")[0], 4),
                             "decode_tokens_per_s": round(result.summary(ctx, "decode_tokens_per_s")[0], 2),
                             "prompt_tokens_per_s": round(result.summary(ctx, "prompt_tokens_per_s")[0], 1),
                             "peak_rss_bytes": result.peak_rss_bytes}
        if result.warnings(ctx):  # recorded, and said to be suspect wherever the figure is read
            figures[str(ctx)]["warnings"] = warnings[str(ctx)] = result.warnings(ctx)
    setup = {"dtype": result.dtype, "threads": result.threads, "gen": gen, "engine": "qwenlab",
             "kernel": result.kernel}
    if warnings:
        setup["unsteady"] = warnings
    try:
        record_measurement(folder, "speed", figures, setup=setup)
    except OSError:
        pass  # a read-only folder: the figures are still printed


# ---- the table -------------------------------------------------------------------------------------
def _fmt(summary, digits: int, scale: float = 1.0) -> str:
    if summary is None:
        return "-"
    med, lo, hi = (v * scale for v in summary)
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def speed_table(report: SpeedReport, markdown: bool = True) -> str:
    """One row per engine x dtype x context; medians with (min-max); ratios against peers below."""
    header = ["engine", "dtype", "weights", "kernel", "ctx", "TTFT ms", "prompt tok/s", "decode tok/s",
              "bound tok/s", "of bound", "peak RSS MiB"]
    rows, notes = [], []
    for r in report.results:
        for ctx in report.contexts:
            decode, bound = r.summary(ctx, "decode_tokens_per_s"), report.bound(r, ctx)
            warned = r.warnings(ctx)
            notes += [f"- {r.engine} {r.dtype} ctx {ctx}: {w}" for w in warned]
            rows.append([r.engine, r.dtype, r.weights, r.kernel or "-", str(ctx), _fmt(r.summary(ctx, "ttft_s"), 0, 1000),
                         _fmt(r.summary(ctx, "prompt_tokens_per_s"), 0), _fmt(decode, 1) + (" !" if warned else ""),
                         f"{bound:.1f}" if bound else "-", f"{decode[0] / bound:.0%}" if bound and decode else "-",
                         f"{r.peak_rss_bytes / 2**20:.0f}"])
    text = format_table(header, rows, markdown)
    if report.bandwidth_bytes_per_s:
        low, high = report.bandwidth_range()
        text += (f"\n\nbound: the bytes/s of a STREAM-like read of 1 GiB on {report.threads} thread(s), per engine the "
                 "faster of one read just before its runs and one just after, over the bytes a decode step reads; the "
                 f"reads ranged over {low / 1e9:.1f}-{high / 1e9:.1f} GB/s (first: {report.bandwidth_bytes_per_s / 1e9:.1f})")
    if notes:
        text += "\n\n! figures to distrust (not the variant's speed until measured on a quiet machine):\n" + "\n".join(notes)
    ratios = ratio_rows(report)
    if ratios:
        text += "\n\n" + format_table(["qwenlab vs", "dtype", "ctx", "decode speed x", "TTFT x (lower is better)",
                                       "peak RSS x"], ratios, markdown)
    return text


def ratio_rows(report: SpeedReport) -> list[list[str]]:
    ours = {r.dtype: r for r in report.results if r.engine == "qwenlab"}
    rows = []
    for peer in [r for r in report.results if r.engine != "qwenlab"]:
        targets = [ours[peer.dtype]] if peer.engine == "llama.cpp" and peer.dtype in ours else \
            list(ours.values()) if peer.engine == "hf" else []
        for mine in targets:
            if peer.engine == "hf" and peer.dtype == "bf16" and mine.dtype != "bf16":
                continue  # each of our variants is compared with HF fp32; bf16 with HF bf16 as well
            for ctx in report.contexts:
                a, b = mine.summary(ctx, "decode_tokens_per_s"), peer.summary(ctx, "decode_tokens_per_s")
                ta, tb = mine.summary(ctx, "ttft_s"), peer.summary(ctx, "ttft_s")
                rows.append([f"{peer.engine} {peer.weights}", mine.dtype, str(ctx), f"{a[0] / b[0]:.2f}",
                             f"{ta[0] / tb[0]:.2f}", f"{mine.peak_rss_bytes / max(1, peer.peak_rss_bytes):.2f}"])
    return rows


if __name__ == "__main__":  # the subprocess side: python -m qwenlab.bench.speed '<spec json>'
    print(json.dumps(worker(json.loads(sys.argv[1]))))
