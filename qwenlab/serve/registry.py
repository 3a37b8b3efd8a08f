"""The served models: one base (with its adapters) and any number of variants, each an Engine.

A request's `model` field names one of: the base, an adapter (runs on the base's engine with that
adapter on its rows), or a variant (another model folder - a merge, a quantized copy - with its
own engine). Adapter names are unique across all of them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from qwenlab.errors import QwenlabError
from qwenlab.serve.engine import Engine
from qwenlab.serve.limits import APIError
from qwenlab.serve.schemas import ModelCard


@dataclass(frozen=True)
class Target:
    model_id: str
    engine: Engine
    adapter: str | None


def load_engine(name: str, path: str | Path, *, dtype: str = "fp32", max_batch: int = 32,
                max_context: int | None = None, max_prefill_tokens: int = 1024, metrics=None,
                for_adapters: bool = False) -> Engine:
    """Load a model folder (or 'nano'; int8/int4 folders load through quant) into an Engine.

    for_adapters: a quantized base is loaded with q/k/v and gate/up unfused, so LoRA can target them.
    """
    from qwenlab.checkpoint import open_checkpoint
    from qwenlab.model import load_model, load_tokenizer

    checkpoint = open_checkpoint(path, validate=False)
    if "quantization" in checkpoint.config.extra:  # quant checks its own tensor layout
        from qwenlab.quant import load_quantized_model

        model = load_quantized_model(checkpoint, fuse=not for_adapters)
    else:
        model = load_model(checkpoint.validate(), dtype)
    tokenizer = load_tokenizer(checkpoint.path)
    context = min(max_context or model.config.max_position_embeddings, model.config.max_position_embeddings)
    engine = Engine(name, model, tokenizer, tokenizer.stop_ids(checkpoint.generation_config),
                    max_batch=max_batch, max_context=context, max_prefill_tokens=max_prefill_tokens, metrics=metrics)
    engine.path = str(checkpoint.path)
    return engine


class ModelRegistry:
    def __init__(self, base: Engine, variants: dict[str, Engine] | None = None):
        self.base = base
        self.variants = dict(variants or {})
        for name in self.variants:
            if name == base.name:
                raise QwenlabError(f"variant name '{name}' is the base's name; pick another")

    @property
    def engines(self) -> list[Engine]:
        return [self.base, *self.variants.values()]

    def ids(self) -> set[str]:
        return {self.base.name, *self.variants, *self.base.adapters.known}

    def resolve(self, model_id: str) -> Target:
        if model_id == self.base.name:
            return Target(model_id, self.base, None)
        if model_id in self.variants:
            return Target(model_id, self.variants[model_id], None)
        if model_id in self.base.adapters.known:
            return Target(model_id, self.base, model_id)
        raise APIError(404, f"The model '{model_id}' does not exist; see GET /v1/models.", code="model_not_found",
                       param="model")

    def cards(self) -> list[ModelCard]:
        cards = [ModelCard(id=self.base.name, root=self.base.path, kind="base")]
        cards += [ModelCard(id=name, root=self.base.adapters.paths.get(name), parent=self.base.name, kind="adapter")
                  for name in sorted(self.base.adapters.known)]
        cards += [ModelCard(id=name, root=e.path, kind="variant") for name, e in self.variants.items()]
        return cards

    # ---- adapters at run time -------------------------------------------------------------------
    def attach_now(self, name: str, path: str | Path) -> None:
        """At start-up (no engine thread yet)."""
        self._check_new_name(name)
        self.base.adapters.attach(name, self.base.adapters.read(path), str(path))

    async def load_adapter(self, name: str, path: str) -> None:
        self._check_new_name(name)
        try:
            adapter = await run_in_threadpool(self.base.adapters.read, path)  # file I/O off the event loop
        except QwenlabError as e:
            raise APIError(400, str(e), code="invalid_adapter", param="lora_path") from None
        future = self.base.call(lambda: self._attach_checked(name, adapter, path))
        try:
            await asyncio.wrap_future(future)
        except QwenlabError as e:
            raise APIError(400, str(e), code="invalid_adapter", param="lora_path") from None

    def _attach_checked(self, name: str, adapter, path: str) -> None:
        self._check_new_name(name)  # again on the engine thread: two loads of one name may race
        self.base.adapters.attach(name, adapter, path)

    async def unload_adapter(self, name: str) -> None:
        if name not in self.base.adapters.known:
            raise APIError(404, f"No adapter named '{name}' is loaded.", code="model_not_found", param="lora_name")

        def detach() -> None:
            if name in self.base.adapters_in_use():
                raise APIError(409, f"Adapter '{name}' has requests running or queued; retry when they end.",
                               code="adapter_in_use", param="lora_name")
            self.base.adapters.detach(name)

        await asyncio.wrap_future(self.base.call(detach))

    def _check_new_name(self, name: str) -> None:
        if name in self.ids():
            raise APIError(400, f"The name '{name}' is already served; pick another.", code="name_taken",
                           param="lora_name")
