"""What a speed figure is measured against: the machine's memory bandwidth, the bytes a decode step reads,
the kernel path that ran, and whether the machine was busy or the runs disagreed.

- Bound: a decode step reads every weight once, so tokens/s cannot exceed (read bandwidth) / (bytes per
  token). The bandwidth is a STREAM-like read (native.read_bandwidth: the sum of a 1 GiB buffer on the
  kernels' threads, best of 3) measured in its own subprocess on the same machine, just before the
  engines run; bytes per token are the weights the model holds (the embedding only where it is also the
  head) plus the KV cache read halfway through the generation.
- Busy: /proc/stat's busy jiffies over a run, less this process's own CPU time, is the CPU other
  processes took meanwhile; more than BUSY_CORES of it makes the figure suspect.
- Disagreeing runs: decode tokens/s whose min and max differ by more than SPREAD of the median.
"""

from __future__ import annotations

import os
import statistics

BUSY_CORES = 0.25  # other processes' average CPU (in cores) above which a run counts as on a busy machine
SPREAD = 0.15  # (max - min) / median of decode tokens/s above which the runs disagree


def _busy_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat; None where it cannot be read."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


class BusyMeter:
    """CPU that processes other than this one used between start() and stop(), in cores."""

    def start(self) -> None:
        self.stat, self.own, self.wall = _busy_jiffies(), os.times(), os.times().elapsed

    def stop(self) -> float | None:
        stat, own, wall = _busy_jiffies(), os.times(), os.times().elapsed
        if stat is None or self.stat is None or wall <= self.wall:
            return None
        tick = os.sysconf("SC_CLK_TCK")
        busy_s = (stat[0] - self.stat[0]) / tick
        own_s = (own.user - self.own.user) + (own.system - self.own.system)
        return max(0.0, busy_s - own_s) / (wall - self.wall)


def run_warnings(runs: list[dict]) -> list[str]:
    """Warnings about one engine's runs at one context: disagreeing decode figures, a busy machine."""
    warnings = []
    decode = [r["decode_tokens_per_s"] for r in runs]
    if len(decode) > 1:
        spread = (max(decode) - min(decode)) / statistics.median(decode)
        if spread > SPREAD:
            warnings.append(f"decode runs disagree by {spread:.0%} (min {min(decode):.1f}, max {max(decode):.1f})")
    busy = [r["other_cpu_cores"] for r in runs if r.get("other_cpu_cores") is not None]
    if busy and max(busy) > BUSY_CORES:
        warnings.append(f"the machine was busy: other processes used up to {max(busy):.2f} of "
                        f"{os.cpu_count()} cores during a run")
    return warnings


def model_bytes_per_token(model, context: int) -> int:
    """Bytes a decode step reads: every distinct weight tensor the model holds once (an untied embedding
    table only for its one row), plus the KV cache up to `context` slots (fp32 or the model's dtype)."""
    seen, total = set(), 0
    embedding = getattr(model.model.embed_tokens, "weight", None)
    head = getattr(model.lm_head, "weight", None) if model.lm_head is not None else embedding
    skip = embedding.data_ptr() if embedding is not None and (head is None or head.data_ptr() != embedding.data_ptr()) \
        else None
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type != "cpu" or tensor.data_ptr() in seen or tensor.data_ptr() == skip:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    config = model.config
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * context
    return total + kv * model.dtype.itemsize


def kernel_path(model, dtype: str) -> str:
    """The kernel path a model's decode runs, as `qwenlab bench` prints it: bf16:avx512bf16, bf16:avx512f,
    fp32:avx512f, int4:vnni ("int4:vnni/prefill:amx-bf16" where long prompts
    take oneDNN's bf16 matmul), int8:aten, ..., or <dtype>:torch (PyTorch's own kernels)."""
    if dtype.startswith("int"):
        backends = {getattr(m, "backend", None) for m in model.modules()} - {None}
        backend = "vnni" if backends == {"native"} else "+".join(sorted(backends)) or "torch"
        if "native" in backends:
            from qwenlab.quant.native import prefill_path

            if prefill_path() == "amx-bf16":  # long prompts (see quant.native.BF16_PREFILL_MIN_ROWS)
                backend += "/prefill:amx-bf16"
        return f"{dtype}:{backend}"
    from qwenlab.quant.float_native import NativeFloatQwen2ForCausalLM

    if isinstance(model, NativeFloatQwen2ForCausalLM):
        from qwenlab.native.library import float_path

        return float_path(dtype)
    return f"{dtype}:torch"


def read_bandwidth_bytes_per_s(threads: int) -> float | None:
    """The STREAM-like read on `threads` threads (None where the native library does not run)."""
    from qwenlab import native

    if not native.available():
        return None
    from qwenlab.quant.native import read_bandwidth

    return read_bandwidth(1 << 30, repeats=3, threads=threads)
