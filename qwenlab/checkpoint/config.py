"""The Qwen2 model configuration: one dataclass, read from any writer's config.json.

Qwen2.5's own config.json keeps `rope_theta` at the top level; transformers 5 writes
`rope_parameters: {rope_theta: ...}`. Both are read here, and only here.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from qwenlab.errors import QwenlabError

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)
SUPPORTED_MODEL_TYPES = ("qwen2",)

# Upper bounds on a config's sizes, checked before anything is built or allocated from them. A crafted
# config.json (10^9 layers, a 10^12-token vocabulary) otherwise runs the loader out of memory or time
# while it builds the model's modules and the list of tensors to expect. Each bound is far above any
# released Qwen2-architecture model (largest: Qwen2.5-72B, 80 layers, hidden 8192, intermediate 29568,
# vocab 152064, 131072 positions; Qwen2.5-1M: 1010000 positions).
MAX_SIZES = {
    "num_hidden_layers": 1024,
    "hidden_size": 65536,
    "intermediate_size": 262144,
    "vocab_size": 1 << 22,  # 4194304
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "max_position_embeddings": 1 << 24,  # 16777216
}
# And on what they imply together: 2^40 parameters (~1.1 T, 2.2 TB in bf16) is beyond any model a
# CPU lab loads, yet far above the largest real one; without it, layers x hidden x intermediate at
# their separate caps would describe a 10^14-parameter model.
MAX_PARAMETERS = 1 << 40


@dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "float32"
    # Anything else the source config held (e.g. a quantization section), kept for round trips.
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_query_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def validate(self, source: str = "config") -> "Qwen2Config":
        """One-line errors naming `source` and the field; nothing is allocated from an unchecked size."""
        for name, cap in MAX_SIZES.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise QwenlabError(f"{source}: field '{name}' must be a positive integer, got {value!r}")
            if value > cap:
                raise QwenlabError(f"{source}: field '{name}' is {value}, over qwenlab's limit of {cap}")
        if self.hidden_size % self.num_attention_heads:
            raise QwenlabError(f"{source}: hidden_size {self.hidden_size} is not divisible by "
                               f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise QwenlabError(f"{source}: num_attention_heads {self.num_attention_heads} is not divisible "
                               f"by num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:  # RoPE rotates the two halves of each head
            raise QwenlabError(f"{source}: hidden_size / num_attention_heads = {self.head_dim} must be even "
                               "(rotary embeddings split each head in two halves)")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and value > 0):
                raise QwenlabError(f"{source}: field '{name}' must be a positive number, got {value!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise QwenlabError(f"{source}: field 'tie_word_embeddings' must be true or false, "
                               f"got {self.tie_word_embeddings!r}")
        if self.parameter_count() > MAX_PARAMETERS:
            raise QwenlabError(f"{source}: the sizes imply {self.parameter_count():.3g} parameters, over "
                               f"qwenlab's limit of {MAX_PARAMETERS:.3g} (check num_hidden_layers, hidden_size, "
                               "intermediate_size and vocab_size)")
        return self

    def context_window(self, requested: int | None = None, flag: str = "--max-context") -> int:
        """The context window a generation may use: `requested` (tokens, prompt and completion), or
        max_position_embeddings when None. A request beyond the model's positions is refused: RoPE was
        never trained there, and the KV cache would be sized from an unchecked number."""
        if requested is None:
            return self.max_position_embeddings
        if not isinstance(requested, int) or isinstance(requested, bool) or requested <= 0:
            raise QwenlabError(f"{flag} must be a positive number of tokens, got {requested!r}")
        if requested > self.max_position_embeddings:
            raise QwenlabError(f"{flag} {requested} is beyond the model's context of {self.max_position_embeddings} "
                               "tokens (max_position_embeddings in config.json)")
        return requested

    @classmethod
    def from_dict(cls, data: dict, source: str = "config.json") -> "Qwen2Config":
        if not isinstance(data, dict):
            raise QwenlabError(f"{source}: expected a JSON object")
        architectures = data.get("architectures") or []
        model_type = data.get("model_type")
        if not isinstance(architectures, list):
            architectures = [architectures]
        if model_type not in SUPPORTED_MODEL_TYPES or (architectures and architectures[0] not in SUPPORTED_ARCHITECTURES):
            raise QwenlabError(
                f"{source}: unsupported architecture {architectures or model_type!r}; "
                f"qwenlab supports {', '.join(SUPPORTED_ARCHITECTURES)} (model_type 'qwen2')")
        known = {f.name for f in fields(cls)} - {"extra", "rope_theta", "torch_dtype"}
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in data]
        if missing:
            raise QwenlabError(f"{source}: missing field(s) {', '.join(missing)}")
        kwargs = {k: data[k] for k in known if k in data and data[k] is not None}
        kwargs.setdefault("num_key_value_heads", data["num_attention_heads"])
        rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise QwenlabError(f"{source}: field 'rope_parameters' must be an object, got {rope!r}")
        rope_theta = data.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise QwenlabError(f"{source}: rope type '{rope_type}' is not supported (only default RoPE)")
        if not isinstance(rope_theta, (int, float)) or isinstance(rope_theta, bool):
            raise QwenlabError(f"{source}: field 'rope_theta' must be a positive number, got {rope_theta!r}")
        dtype = data.get("torch_dtype") or data.get("dtype") or "float32"
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(rope_theta=float(rope_theta), torch_dtype=str(dtype), extra=extra, **kwargs).validate(source)

    @classmethod
    def from_file(cls, path: str | Path) -> "Qwen2Config":
        path = Path(path)
        if not path.is_file():
            raise QwenlabError(f"{path}: config.json not found")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise QwenlabError(f"{path}: invalid JSON ({e})") from None
        return cls.from_dict(data, source=str(path))

    def to_hf_dict(self) -> dict:
        """A config.json that transformers 4.4x and 5.x both read (rope_theta in both places)."""
        data = dict(self.extra)
        data.update({k: v for k, v in asdict(self).items() if k != "extra"})
        data.pop("rope_parameters", None)
        data.update({
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
        })
        data.setdefault("initializer_range", 0.02)
        data.setdefault("use_cache", True)
        return dict(sorted(data.items()))

    def replace(self, **changes) -> "Qwen2Config":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Qwen2Config(**values).validate()

    # ---- sizes ---------------------------------------------------------------
    def parameter_count(self) -> int:
        return self.embedding_parameters() * (1 if self.tie_word_embeddings else 2) + self.non_embedding_parameters()

    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    def non_embedding_parameters(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        kv = self.num_key_value_heads * self.head_dim
        attention = h * h + h + 2 * (h * kv + kv) + h * h  # q (+bias), k, v (+bias), o (no bias)
        mlp = 3 * h * i
        norms = 2 * h
        return self.num_hidden_layers * (attention + mlp + norms) + h


def _preset(layers, heads, kv_heads, hidden, intermediate, tie, context=32768) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=context, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=tie, bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16")


# The exact shapes of the Qwen2.5 releases (from their config.json files).
PRESETS: dict[str, Qwen2Config] = {
    "qwen2.5-0.5b": _preset(24, 14, 2, 896, 4864, tie=True),
    "qwen2.5-1.5b": _preset(28, 12, 2, 1536, 8960, tie=True),
    "qwen2.5-3b": _preset(36, 16, 2, 2048, 11008, tie=True),
    "qwen2.5-7b": _preset(28, 28, 4, 3584, 18944, tie=False, context=131072),
}


def preset_key(name: str) -> str | None:
    """The PRESETS key for a preset's name ('qwen2.5-0.5b') or its size alone ('0.5b'); None otherwise."""
    key = name.lower()
    key = key if key in PRESETS else f"qwen2.5-{key}"
    return key if key in PRESETS else None


def get_preset(name: str) -> Qwen2Config:
    key = preset_key(name)
    if key is None:
        raise QwenlabError(f"unknown preset '{name}'; known presets: {', '.join(PRESETS)}")
    return PRESETS[key]
