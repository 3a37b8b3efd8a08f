"""The Qwen2 model core: config, module, KV cache, tokenizer and chat template, generation."""

from qwenlab.checkpoint.config import PRESETS, Qwen2Config, get_preset
from qwenlab.model.generate import Completion, GenerationConfig, generate, stream_generate
from qwenlab.model.load import load_model, parse_dtype
from qwenlab.model.qwen2 import Qwen2ForCausalLM
from qwenlab.model.tokenizer import Tokenizer, load_tokenizer

__all__ = ["PRESETS", "Completion", "GenerationConfig", "Qwen2Config", "Qwen2ForCausalLM", "Tokenizer",
           "generate", "get_preset", "load_model", "load_tokenizer", "parse_dtype", "stream_generate"]
