"""One way to load a model for inference: `qwenlab.load(ref, dtype=…, adapters=…) -> Loaded`.

Every command, recipe stage, the server and the benchmarks call this. A reference is a model folder,
`nano`, or an adapter folder (loaded over the base its lineage.json or adapter_config.json names).
The folder decides the engine: a quantized folder (config.json has a `quantization` section) loads
through qwenlab.quant with its own kernels; any other through the model core in `dtype`, with its fp32
or bf16 weights on the native decode stack (qwenlab.quant.float_native) where the kernels run here and
no adapter comes with the load (float_backend="torch": the plain PyTorch model core).

Adapters:
- adapter_mode="merge" (generation, evaluation): folded into a float base, W + s·B·A, so decoding pays
  nothing per token;
- adapter_mode="attach" (measurement, serving): attached unmerged and active, as a server runs them.
A quantized base cannot absorb a delta: its adapter is always attached, on unfused q/k/v and gate/up.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from qwenlab.checkpoint.hub import hub_snapshot, parse_hub_id
from qwenlab.checkpoint.reader import NANO_DIR, Checkpoint, open_checkpoint, resolve_model_path
from qwenlab.errors import QwenlabError
from qwenlab.model.load import load_model
from qwenlab.model.qwen2 import Qwen2ForCausalLM
from qwenlab.model.tokenizer import Tokenizer, load_tokenizer

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Loaded:
    model: Qwen2ForCausalLM
    tokenizer: Tokenizer
    checkpoint: Checkpoint  # the base model's folder: config, generation_config, path
    adapters: list[Path] = field(default_factory=list)
    quantized: bool = False

    def stop_ids(self) -> set[int]:
        return self.tokenizer.stop_ids(self.checkpoint.generation_config)

    def __iter__(self):  # model, tokenizer, checkpoint = qwenlab.load(...)
        return iter((self.model, self.tokenizer, self.checkpoint))


def is_adapter_folder(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def adapter_base(folder: Path, lineage: dict | None = None) -> Path | None:
    """The base an adapter applies to: lineage.json's `base` input, else adapter_config's base_model_name_or_path."""
    if lineage is None and (folder / "lineage.json").is_file():
        try:
            lineage = json.loads((folder / "lineage.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            lineage = None
    candidates = [i.get("path") for i in (lineage or {}).get("inputs", []) if isinstance(i, dict) and i.get("role") == "base"]
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        base, revision = config.get("base_model_name_or_path"), config.get("revision")
        # PEFT keeps a hub base's revision beside its id
        candidates.append(f"{base}@{revision}" if isinstance(base, str) and isinstance(revision, str) and revision
                          and parse_hub_id(base) else base)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        pass
    for candidate in candidates:
        if not candidate or not isinstance(candidate, str):
            continue
        path = NANO_DIR if candidate == "nano" else Path(candidate)
        if (path / "config.json").is_file():
            return path
        if not path.exists() and parse_hub_id(candidate):  # a hub id: its snapshot, if cached (never a download)
            try:
                return hub_snapshot(candidate, local_only=True)
            except QwenlabError:
                continue
    return None


def warn_if_other_base(adapter: Path, base: Path) -> None:
    """An adapter trained on another base still loads (the shapes may match), but says so."""
    own = adapter_base(adapter)
    if own is not None and own.resolve() != base.resolve():
        print(f"warning: adapter {adapter} was trained on {own}; applying it over {base}", file=sys.stderr)


def load(ref: str | Path, dtype: str = "fp32", adapters: list[str | Path] | tuple = (), *,
         adapter_mode: Literal["merge", "attach"] = "merge", quant_backend: str | None = None,
         fuse: bool = True, float_backend: Literal["auto", "native", "torch"] | None = None) -> Loaded:
    """Load `ref` (a model folder, 'nano', or an adapter folder) with `adapters` applied, for inference."""
    adapters = [resolve_model_path(a) for a in adapters]  # folders or hub ids
    path = resolve_model_path(ref)
    if is_adapter_folder(path):
        base = adapter_base(path)
        if base is None:
            raise QwenlabError(f"{path}: cannot find the adapter's base model (lineage.json and "
                               "adapter_config.json's base_model_name_or_path name no existing folder)")
        path, adapters = base, [path, *adapters]
        adapter_mode = "attach" if len(adapters) == 1 else adapter_mode
    checkpoint = open_checkpoint(path, validate=False)  # each engine checks every tensor itself
    for adapter in adapters:
        warn_if_other_base(adapter, checkpoint.path)
    quantized = "quantization" in checkpoint.config.extra
    if quantized:
        model = _load_quantized(checkpoint, adapters, quant_backend, fuse)
    else:
        # (fuse=False, serve's base for run-time adapters, stays native: LoRA wraps NativeLinear, and the
        # decode stack adds serve's per-row deltas itself)
        model = _load_float(checkpoint, dtype, float_backend if not adapters else "torch")
        _apply_adapters(model, adapters, adapter_mode)
    # An adapter folder that carries its own tokenizer (extra tokens, another template) speaks with it.
    own = [a for a in adapters if (a / "tokenizer.json").is_file()]
    tokenizer = load_tokenizer(own[0] if len(adapters) == 1 and own else checkpoint.path)
    return Loaded(model, tokenizer, checkpoint, adapters, quantized)


def _load_float(checkpoint: Checkpoint, dtype: str, backend: str | None):
    """The model core in `dtype`; with the native kernels (auto: where they run), on NativeLinear layers."""
    if backend not in (None, "auto", "native", "torch"):
        raise QwenlabError(f"float_backend must be auto, native or torch, got {backend!r}")
    if backend != "torch":
        from qwenlab.model.load import parse_dtype
        from qwenlab.quant.float_native import load_native_float_model, native_float_applies

        if native_float_applies(parse_dtype(dtype)):
            return load_native_float_model(checkpoint, parse_dtype(dtype))
        if backend == "native":
            from qwenlab.quant.linear import kernels_unavailable_reason

            raise QwenlabError(f"the native float kernels cannot run here: {kernels_unavailable_reason()}")
    return load_model(checkpoint, dtype)


def _load_quantized(checkpoint: Checkpoint, adapters: list[Path], backend: str | None, fuse: bool):
    from qwenlab.adapters.apply import attach_adapter, set_active_adapters
    from qwenlab.quant import load_quantized_model

    if len(adapters) > 1:
        raise QwenlabError("--adapter: a quantized base takes one adapter; merge the others first "
                           "(qwenlab adapter combine)")
    # Quantized weights cannot absorb a delta: the adapter runs beside them, on the unfused projections.
    model = load_quantized_model(checkpoint, backend=backend, fuse=fuse and not adapters)
    if adapters:
        attach_adapter(model, adapters[0], "adapter")
        set_active_adapters(model, "adapter")
    return model


def _apply_adapters(model, adapters: list[Path], mode: str) -> None:
    if not adapters:
        return
    from qwenlab.adapters.apply import attach_adapter, merge_adapter, set_active_adapters

    if mode == "attach":
        if len(adapters) > 1:
            raise QwenlabError("attached adapters run one at a time; merge them (adapter_mode='merge') or "
                               "combine them first (qwenlab adapter combine)")
        attach_adapter(model, adapters[0], "adapter")
        set_active_adapters(model, "adapter")
        return
    for i, folder in enumerate(adapters):  # folded in, in order: no per-token LoRA cost
        attach_adapter(model, folder, f"adapter{i}")
        merge_adapter(model, f"adapter{i}")
