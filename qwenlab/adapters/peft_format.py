"""LoRA adapters in PEFT's file format, both ways.

A PEFT adapter folder holds adapter_config.json and adapter_model.safetensors, with one pair of
tensors per adapted linear module, named as PEFT writes them:

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   [r, in_features]
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   [out_features, r]

so that ΔW = scaling · B @ A with scaling = alpha / r (alpha / √r with rsLoRA, Kalajdzievski 2023).
Per-module alphas come from `alpha_pattern` (regex keys matched against the module name, as PEFT
does); the rank of each module is read from its tensors.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwenlab.checkpoint.reader import read_json_object
from qwenlab.checkpoint.safetensors_file import SafetensorsFile
from qwenlab.checkpoint.writer import save_safetensors
from qwenlab.errors import QwenlabError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")

# PEFT features qwenlab's LoRA layer does not implement, with the value that means "off".
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "bias": "none",
                "modules_to_save": None, "trainable_token_indices": None, "target_parameters": None,
                "layer_replication": None, "use_qalora": False, "alora_invocation_tokens": None}


@dataclass
class LoraAdapter:
    """A LoRA adapter in memory: module name -> (A [r, in], B [out, r]), plus its scaling rule."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    alpha: float
    use_rslora: bool = False
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    dropout: float = 0.0
    base_model: str | None = None
    source: str = "adapter"  # where it came from, for error messages

    def rank(self, module: str) -> int:
        return self.modules[module][0].shape[0]

    def ranks(self) -> set[int]:
        return {self.rank(m) for m in self.modules}

    def alpha_for(self, module: str) -> float:
        for pattern, alpha in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module):  # PEFT's get_pattern_key rule
                return float(alpha)
        return float(self.alpha)

    def scaling(self, module: str) -> float:
        return lora_scaling(self.alpha_for(module), self.rank(module), self.use_rslora)

    def delta(self, module: str) -> torch.Tensor:
        """ΔW = scaling · B @ A, in fp32."""
        a, b = self.modules[module]
        return self.scaling(module) * (b.float() @ a.float())

    def target_modules(self) -> list[str]:
        """The short names PEFT puts in target_modules (q_proj, v_proj, ...)."""
        return sorted({m.rsplit(".", 1)[-1] for m in self.modules})


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """alpha / r (Hu et al. 2021), or alpha / √r for rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _read_config(path: Path) -> dict:
    config_path = path / ADAPTER_CONFIG
    if not path.is_dir():
        raise QwenlabError(f"{path}: no such adapter folder")
    if not config_path.is_file():
        raise QwenlabError(f"{path}: not an adapter folder (missing {ADAPTER_CONFIG})")
    config = read_json_object(config_path)
    if config.get("peft_type", "LORA") != "LORA":
        raise QwenlabError(f"{config_path}: peft_type is {config.get('peft_type')!r}; qwenlab reads LoRA adapters only")
    for key, off in _UNSUPPORTED.items():
        value = config.get(key, off)
        if value not in (off, None, False, [], {}):
            raise QwenlabError(f"{config_path}: '{key}': {value!r} is not supported by qwenlab's LoRA layer")
    for key in ("r", "lora_alpha"):
        if not _is_number(config.get(key)) or not config[key] > 0:
            raise QwenlabError(f"{config_path}: '{key}' must be a positive number, got {config.get(key)!r}")
    dropout = config.get("lora_dropout")
    if dropout is not None and (not _is_number(dropout) or not 0 <= dropout < 1):
        raise QwenlabError(f"{config_path}: 'lora_dropout' must be a number in [0, 1), got {dropout!r}")
    _check_alpha_pattern(config.get("alpha_pattern"), config_path)
    return config


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_alpha_pattern(patterns, config_path: Path) -> None:
    """{regex: alpha}: each key is matched against module names (PEFT's rule), so it must compile."""
    if patterns is None:
        return
    where = f"{config_path}: 'alpha_pattern'"
    if not isinstance(patterns, dict):
        raise QwenlabError(f"{where}: expected an object of module-name regex -> alpha, got {type(patterns).__name__}")
    for pattern, alpha in patterns.items():
        try:
            re.compile(pattern)
        except re.error as e:
            raise QwenlabError(f"{where}: key {pattern!r} is not a valid regular expression ({e})") from None
        if not _is_number(alpha) or not alpha > 0:
            raise QwenlabError(f"{where}: {pattern!r} must map to a positive number, got {alpha!r}")


def read_adapter_config(path: str | Path) -> dict:
    """The adapter folder's checked adapter_config.json, and that its weights file is there (not read)."""
    path = Path(path)
    config = _read_config(path)
    if not (path / ADAPTER_WEIGHTS).is_file():
        pickled = path / "adapter_model.bin"
        if pickled.is_file():
            raise QwenlabError(f"{pickled}: pickle adapters are refused (they can run code); "
                               "re-save it with safe_serialization=True")
        raise QwenlabError(f"{path}: missing {ADAPTER_WEIGHTS}")
    return config


def read_adapter(path: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA adapter folder, checking every key and shape."""
    path = Path(path)
    config = read_adapter_config(path)
    weights_path = path / ADAPTER_WEIGHTS
    file = SafetensorsFile(weights_path)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key in file.names():
        match = _KEY.match(key)
        if not match:
            raise QwenlabError(f"{weights_path}: unexpected tensor '{key}' (expected "
                               f"'{KEY_PREFIX}<module>.lora_A.weight' / '.lora_B.weight')")
        halves.setdefault(match["module"], {})[match["which"]] = file.get(key)
    if not halves:
        raise QwenlabError(f"{weights_path}: no LoRA tensors")
    modules = {}
    for module, pair in sorted(halves.items(), key=lambda kv: _natural_key(kv[0])):
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise QwenlabError(f"{weights_path}: module '{module}' has no lora_{missing} tensor")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
            raise QwenlabError(f"{weights_path}: module '{module}': lora_A {list(a.shape)} and lora_B "
                               f"{list(b.shape)} do not form a rank-r pair ([r, in] and [out, r], r >= 1)")
        for which, tensor in (("A", a), ("B", b)):
            if not tensor.dtype.is_floating_point:  # integer weights would be silently cast
                raise QwenlabError(f"{weights_path}: module '{module}': lora_{which} has dtype {tensor.dtype}, "
                                   f"expected a float dtype (F32, BF16, F16)")
        modules[module] = (a, b)
    return LoraAdapter(modules=modules, alpha=float(config["lora_alpha"]),
                       use_rslora=bool(config.get("use_rslora", False)),
                       alpha_pattern=dict(config.get("alpha_pattern") or {}),
                       dropout=float(config.get("lora_dropout") or 0.0),
                       base_model=config.get("base_model_name_or_path"), source=str(path))


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def adapter_config_dict(adapter: LoraAdapter) -> dict:
    """The adapter_config.json PEFT writes for a plain LoRA (fields it needs; the rest default)."""
    ranks = {m: adapter.rank(m) for m in adapter.modules}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    rank_pattern = {re.escape(m): r for m, r in ranks.items() if r != rank}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.base_model,
        "r": rank,
        "lora_alpha": _plain_number(adapter.alpha),
        "lora_dropout": adapter.dropout,
        "target_modules": adapter.target_modules(),
        "use_rslora": adapter.use_rslora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": adapter.alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
    }


def _plain_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def adapter_state_dict(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    state = {}
    for module, (a, b) in adapter.modules.items():
        state[f"{KEY_PREFIX}{module}.lora_A.weight"] = a.detach().contiguous().clone()
        state[f"{KEY_PREFIX}{module}.lora_B.weight"] = b.detach().contiguous().clone()
    return state


def atomic_folder(out: str | Path, force: bool = False, inputs=()):
    """A temporary sibling folder that replaces `out` when complete (qwenlab.checkpoint.writer.atomic_folder)."""
    from qwenlab.checkpoint.writer import atomic_folder as _atomic_folder

    return _atomic_folder(out, force, inputs)


def save_adapter_files(adapter: LoraAdapter, folder: Path, dtype: torch.dtype | None = None) -> None:
    """Write adapter_config.json and adapter_model.safetensors into an existing folder."""
    state = adapter_state_dict(adapter)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    save_safetensors(state, folder / ADAPTER_WEIGHTS)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter_config_dict(adapter), indent=2) + "\n")


def write_adapter(adapter: LoraAdapter, out: str | Path, *, force: bool = False, dtype: torch.dtype | None = None,
                  tokenizer_from: Path | None = None, lineage: dict | None = None, inputs=()) -> Path:
    """Write a PEFT adapter folder atomically (with the base's tokenizer files and a lineage.json).

    inputs: the folders it was made from; `out` may not be or hold one of them, even with force."""
    from qwenlab.checkpoint.lineage import write_lineage
    from qwenlab.checkpoint.writer import copy_tokenizer_files

    with atomic_folder(out, force, [*inputs, tokenizer_from]) as tmp:
        save_adapter_files(adapter, tmp, dtype)
        if tokenizer_from is not None:
            copy_tokenizer_files(Path(tokenizer_from), tmp)
        if lineage is not None:
            write_lineage(tmp, lineage)
    return Path(out)


def check_adapter_fits(adapter: LoraAdapter, base_shapes: dict[str, tuple[int, ...]], base_name: str) -> None:
    """Every adapted module must be a linear of the base with matching [out, in]; else name the mismatch."""
    for module, (a, b) in adapter.modules.items():
        shape = base_shapes.get(module + ".weight")
        if shape is None:
            raise QwenlabError(f"adapter {adapter.source} targets module '{module}', which base {base_name} "
                               "does not have (adapter made for another architecture?)")
        expected = (b.shape[0], a.shape[1])
        if tuple(shape) != expected:
            raise QwenlabError(f"adapter {adapter.source} was made for another base: module '{module}' is "
                               f"{list(shape)} in {base_name} but the adapter expects {list(expected)}")
