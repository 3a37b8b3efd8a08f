"""Build a server from folders (base, adapters, variants) and run it under uvicorn.

    from qwenlab.serve import ServeConfig, build_app
    app = build_app(ServeConfig(base="nano", adapters={"math": "runs/math"}))
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from pathlib import Path

from qwenlab.errors import QwenlabError
from qwenlab.serve.limits import ServeLimits
from qwenlab.serve.metrics import ServeMetrics
from qwenlab.serve.registry import ModelRegistry, load_engine

log = logging.getLogger("qwenlab.serve")


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
    limits: ServeLimits = field(default_factory=ServeLimits)


def base_name(config: ServeConfig) -> str:
    if config.served_model_name:
        return config.served_model_name
    return "nano" if config.base == "nano" else Path(config.base).resolve().name


def build_registry(config: ServeConfig, metrics: ServeMetrics) -> ModelRegistry:
    common = dict(dtype=config.dtype, max_batch=config.max_batch, max_context=config.max_context,
                  max_prefill_tokens=config.max_prefill_tokens, metrics=metrics)
    base = load_engine(base_name(config), config.base, for_adapters=bool(config.adapters), **common)
    variants = {name: load_engine(name, path, **common) for name, path in config.variants.items()}
    registry = ModelRegistry(base, variants)
    for name, path in config.adapters.items():
        registry.attach_now(name, path)
    return registry


def build_app(config: ServeConfig):
    from qwenlab.serve.app import create_app

    metrics = ServeMetrics()
    return create_app(build_registry(config, metrics), config.limits, metrics)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(config: ServeConfig) -> None:
    import uvicorn

    if not is_loopback(config.host) and not config.limits.api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", config.host)
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    app = build_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=5)


def parse_named_paths(items: list[str], flag: str) -> dict[str, str]:
    """['a=path', ...] -> {'a': 'path'}; names must be unique."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise QwenlabError(f"{flag} expects name=path, got '{item}'")
        if name in out:
            raise QwenlabError(f"{flag}: the name '{name}' is given twice")
        out[name] = path
    return out
