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
                for_adapters: bool = False, prefix_cache=None, lora_dtype: str = "auto") -> Engine:
    """Load a model folder (or 'nano'; int8/int4 folders load through quant) into an Engine.

    for_adapters: a quantized base is loaded with q/k/v and gate/up unfused, so LoRA can target them.
    prefix_cache: a PrefixCache shared by the server's engines (None: no prefix caching).
    lora_dtype: the adapters' stacks in mixed batches (adapters_bridge.LORA_DTYPES).
    """
    from qwenlab.loading import load

    model, tokenizer, checkpoint = load(path, dtype, fuse=not for_adapters)
    context = model.config.context_window(max_context)  # beyond the model's positions: refused, not lowered
    engine = Engine(name, model, tokenizer, tokenizer.stop_ids(checkpoint.generation_config),
                    max_batch=max_batch, max_context=context, max_prefill_tokens=max_prefill_tokens, metrics=metrics,
                    prefix_cache=prefix_cache, lora_dtype=lora_dtype)
    engine.path = str(checkpoint.path)
    return engine


def folder_name(path: str | Path | None) -> str | None:
    return Path(path).name if path else None


def allowed_adapter_folder(allowed_dir: Path | None, requested: str) -> Path:
    """The folder a /v1/load_lora_adapter request may read, or an APIError.

    allowed_dir: the resolved --allow-adapter-dir (None: run-time loading is off). A relative
    lora_path is taken under it. The check runs on the path with every symlink resolved, so a link
    inside the directory that points out of it is refused. A path outside, a missing one and a file
    get the same answer, so a client cannot probe which paths exist on the server.
    """
    if allowed_dir is None:
        raise APIError(403, "Loading adapters at run time is off on this server (start it with "
                       "--allow-adapter-dir DIR to allow folders under DIR).", code="adapter_loading_disabled",
                       param="lora_path")
    # Not even the requested path is echoed: the answer is the same text for every refused path.
    refused = APIError(400, "lora_path is not an adapter folder under the server's adapter directory.",
                       code="invalid_adapter_path", param="lora_path")
    try:
        folder = (allowed_dir / requested).resolve()  # an absolute `requested` replaces allowed_dir
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        raise refused from None
    if not folder.is_relative_to(allowed_dir) or not folder.is_dir():
        raise refused
    return folder


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
        """The served models. `root` is a folder's name only: a full path would tell any client how the
        server's disk is laid out (user names, mount points)."""
        cards = [ModelCard(id=self.base.name, root=folder_name(self.base.path), kind="base")]
        cards += [ModelCard(id=name, root=folder_name(self.base.adapters.paths.get(name)), parent=self.base.name,
                            kind="adapter") for name in sorted(self.base.adapters.known)]
        cards += [ModelCard(id=name, root=folder_name(e.path), kind="variant") for name, e in self.variants.items()]
        return cards

    # ---- adapters at run time -------------------------------------------------------------------
    def attach_now(self, name: str, path: str | Path) -> None:
        """At start-up (no engine thread yet)."""
        from qwenlab.checkpoint.reader import resolve_model_path

        self._check_new_name(name)
        folder = resolve_model_path(path)  # the operator's --adapter: a folder or a hub id
        self.base.adapters.attach(name, self.base.adapters.read(folder), str(path))

    async def load_adapter(self, name: str, folder: Path, shown: str, max_adapters: int) -> None:
        """Attach the adapter in `folder` (already checked against the allowed directory) as `name`.

        shown: the path as the client wrote it; error messages name that, never the resolved folder."""
        self._check_new_name(name)
        self._check_room(max_adapters)
        try:
            adapter = await run_in_threadpool(self.base.adapters.read, folder)  # file I/O off the event loop
        except QwenlabError as e:
            raise APIError(400, str(e).replace(str(folder), shown), code="invalid_adapter", param="lora_path") from None
        except OSError:  # e.g. a file it may not read: say so without the server's own path or errno text
            raise APIError(400, f"lora_path '{shown}': the adapter's files cannot be read.", code="invalid_adapter",
                           param="lora_path") from None
        future = self.base.call(lambda: self._attach_checked(name, adapter, folder, max_adapters))
        try:
            await asyncio.wrap_future(future)
        except QwenlabError as e:
            raise APIError(400, str(e).replace(str(folder), shown), code="invalid_adapter", param="lora_path") from None

    def _attach_checked(self, name: str, adapter, folder: Path, max_adapters: int) -> None:
        # again on the engine thread: two loads may race past the checks made before reading
        self._check_new_name(name)
        self._check_room(max_adapters)
        self.base.adapters.attach(name, adapter, str(folder))

    def _check_room(self, max_adapters: int) -> None:
        if len(self.base.adapters.known) >= max_adapters:
            raise APIError(400, f"{len(self.base.adapters.known)} adapters are loaded, the most this server allows "
                           f"(--max-adapters {max_adapters}); unload one first.", code="adapter_limit_reached",
                           param="lora_name")

    async def unload_adapter(self, name: str) -> None:
        if name not in self.base.adapters.known:
            raise APIError(404, f"No adapter named '{name}' is loaded.", code="model_not_found", param="lora_name")

        def detach() -> None:
            if name in self.base.adapters_in_use():
                raise APIError(409, f"Adapter '{name}' has requests running or queued; retry when they end.",
                               code="adapter_in_use", param="lora_name")
            self.base.forget_adapter(name)

        await asyncio.wrap_future(self.base.call(detach))

    def _check_new_name(self, name: str) -> None:
        if name in self.ids():
            raise APIError(400, f"The name '{name}' is already served; pick another.", code="name_taken",
                           param="lora_name")
