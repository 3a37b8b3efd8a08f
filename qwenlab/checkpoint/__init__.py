"""Hugging Face checkpoint folders in and out: lazy safetensors, shards and index, atomic writes."""

from qwenlab.checkpoint.names import LINEAR_MODULES, expected_tensor_shapes
from qwenlab.checkpoint.reader import Checkpoint, open_checkpoint, resolve_model_path
from qwenlab.checkpoint.writer import CheckpointWriter, copy_tokenizer_files, parse_size

__all__ = ["Checkpoint", "CheckpointWriter", "LINEAR_MODULES", "copy_tokenizer_files",
           "expected_tensor_shapes", "open_checkpoint", "parse_size", "resolve_model_path"]
