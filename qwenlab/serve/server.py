"""Build a server from folders (base, adapters, variants) and run it under uvicorn.

    from qwenlab.serve import ServeConfig, build_app
    app = build_app(ServeConfig(base="nano", adapters={"math": "runs/math"}))
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from qwenlab.errors import QwenlabError
from qwenlab.serve.adapters_bridge import LORA_DTYPES
from qwenlab.serve.limits import ServeLimits, at_least, is_loopback
from qwenlab.serve.metrics import ServeMetrics
from qwenlab.serve.prefix_cache import PrefixCache
from qwenlab.serve.registry import ModelRegistry, load_engine

log = logging.getLogger("qwenlab.serve")
MAX_BATCH = 1024  # rows per engine; the batch KV cache is sized by it, so a typo must not allocate for 10^9
MAX_THREADS = 1024


@dataclass
class ServeConfig:
    base: str
    adapters: dict[str, str] = field(default_factory=dict)  # name -> PEFT adapter folder (over base)
    variants: dict[str, str] = field(default_factory=dict)  # name -> another model folder
    served_model_name: str | None = None  # the base's id in /v1/models (default: its folder name)
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "fp32"
    max_batch: int = 32  # rows decoded together per model
    max_context: int | None = None  # tokens per request (prompt + completion); default: the model's
    max_prefill_tokens: int = 1024  # padded prompt tokens per prefill: bounds the pause of running rows
    threads: int | None = None  # torch CPU threads (default: torch's choice)
    prefix_cache_mb: int = 512  # KV of prompt prefixes kept for reuse, all engines together; 0: off
    lora_dtype: str = "auto"  # adapters' stacks in mixed batches: auto (bf16 over a bf16/quantized base), fp32, bf16
    limits: ServeLimits = field(default_factory=ServeLimits)

    def check(self) -> None:
        """Refuse nonsense settings at start, each with one line naming its flag."""
        from qwenlab.checkpoint.dtypes import USER_NAMES

        at_least("--port", self.port, 1, 65535)
        if not isinstance(self.host, str) or not self.host.strip():
            raise QwenlabError("--host must be an address to bind, e.g. 127.0.0.1")
        if not isinstance(self.dtype, str) or self.dtype.lower() not in USER_NAMES:
            raise QwenlabError(f"--dtype must be one of fp32, bf16, fp16, got '{self.dtype}'")
        at_least("--max-batch", self.max_batch, 1, MAX_BATCH)
        at_least("--max-prefill-tokens", self.max_prefill_tokens, 1)
        at_least("--prefix-cache-mb", self.prefix_cache_mb, 0, 1 << 30)
        if self.lora_dtype not in LORA_DTYPES:
            raise QwenlabError(f"--lora-dtype must be one of {', '.join(LORA_DTYPES)}, got '{self.lora_dtype}'")
        if self.max_context is not None:
            at_least("--max-context", self.max_context, 2)  # one prompt token and one to generate
        if self.threads is not None:
            at_least("--threads", self.threads, 1, MAX_THREADS)
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise QwenlabError("--served-model-name must not be empty")
        self.limits.check()
        if len(self.adapters) > self.limits.max_adapters:
            raise QwenlabError(f"--adapter is given {len(self.adapters)} times but --max-adapters is "
                               f"{self.limits.max_adapters}")


def base_name(config: ServeConfig) -> str:
    if config.served_model_name:
        return config.served_model_name
    return "nano" if config.base == "nano" else Path(config.base).resolve().name


def build_registry(config: ServeConfig, metrics: ServeMetrics) -> ModelRegistry:
    prefix_cache = PrefixCache(int(config.prefix_cache_mb * 2**20)) if config.prefix_cache_mb > 0 else None
    metrics.watch_prefix_cache(prefix_cache)
    common = dict(dtype=config.dtype, max_batch=config.max_batch, max_context=config.max_context,
                  max_prefill_tokens=config.max_prefill_tokens, metrics=metrics, prefix_cache=prefix_cache)
    base = load_engine(base_name(config), config.base, for_adapters=bool(config.adapters),
                       lora_dtype=config.lora_dtype, **common)
    variants = {name: load_engine(name, path, **common) for name, path in config.variants.items()}
    registry = ModelRegistry(base, variants)
    for name, path in config.adapters.items():
        registry.attach_now(name, path)
    return registry


def build_app(config: ServeConfig):
    from qwenlab.serve.app import create_app

    config.check()
    metrics = ServeMetrics()
    return create_app(build_registry(config, metrics), config.limits, metrics, bind_host=config.host)


def exposure_warning(config: ServeConfig) -> str | None:
    """The start-up warning for a server others can reach and use without a key."""
    if is_loopback(config.host) or config.limits.api_key:
        return None
    loading = (f"; and load adapters from {config.limits.allow_adapter_dir}" if config.limits.allow_adapter_dir
               else "")
    return (f"warning: serving on {config.host} without --api-key: anyone who can reach this address can "
            f"generate with every served model{loading}")


def serve(config: ServeConfig) -> None:
    import uvicorn

    config.check()
    warning = exposure_warning(config)
    if warning:
        # stderr directly: logging is not configured yet, and this must be seen whatever the log level
        print(warning, file=sys.stderr, flush=True)
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    app = build_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=5)


def parse_named_paths(items: list[str], flag: str) -> dict[str, str]:
    """['a=path', 'path', ...] -> {'a': 'path', <path's folder name>: 'path'}; names must be unique."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:  # a bare path (or hub id) is served under its folder's name, as vLLM names LoRA modules
            name, path = Path(item.rstrip("/")).name, item
        if not name or not path:
            raise QwenlabError(f"{flag} expects name=path or a folder, got '{item}'")
        if name in out:
            raise QwenlabError(f"{flag}: the name '{name}' is given twice")
        out[name] = path
    return out
