"""Build a Qwen2ForCausalLM from a checkpoint folder, one tensor at a time."""

from __future__ import annotations

import torch

from qwenlab.checkpoint.dtypes import parse_dtype as parse_user_dtype
from qwenlab.errors import QwenlabError
from qwenlab.model.qwen2 import Qwen2ForCausalLM

MODEL_DTYPES = ("fp32", "bf16", "fp16")  # what the model core runs in (fp16 is refused as slow on CPU)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    return parse_user_dtype(name, "dtype", MODEL_DTYPES)


def load_model(path, dtype: str | torch.dtype = "fp32") -> Qwen2ForCausalLM:
    """Load a float checkpoint folder (or 'nano') into the model core, in `dtype`. Any folder, quantized
    ones and adapters included, loads through qwenlab.load()."""
    from qwenlab.checkpoint.reader import Checkpoint, open_checkpoint

    checkpoint = path if isinstance(path, Checkpoint) else open_checkpoint(path, validate=False)
    if "quantization" in checkpoint.config.extra:
        raise QwenlabError(f"{checkpoint.path}: a quantized folder; load it with qwenlab.load()")
    return model_from_checkpoint(checkpoint, parse_dtype(dtype))


def model_from_checkpoint(checkpoint, dtype: torch.dtype) -> Qwen2ForCausalLM:
    # Every tensor's shape and dtype against config.json first, also for a checkpoint opened with
    # validate=False: a mis-shaped tensor must be a one-line error, not a failure deep in torch.
    checkpoint.validate()
    with torch.device("meta"):
        model = Qwen2ForCausalLM(checkpoint.config)
    state = {}
    for name in model.state_dict():
        state[name] = checkpoint.get(name).to(dtype)
    model.load_state_dict(state, assign=True, strict=True)
    # Buffers built on the meta device must be rebuilt on the CPU.
    model.rotary = type(model.rotary)(checkpoint.config.head_dim, checkpoint.config.rope_theta)
    return model.eval().requires_grad_(False)


def check_dtype_supported(dtype: torch.dtype) -> None:
    if dtype == torch.float16:
        raise QwenlabError("fp16 is slow and imprecise on CPU; use fp32 or bf16")
