"""A base checkpoint seen through a LoRA adapter, one tensor at a time, and `adapter merge` on it.

AdaptedCheckpoint has the Checkpoint interface the merge executor and load_model read
(`.config`, `.tensor_names()`, `.shape(name)`, `.get(name)`): `get` returns W + scaling·B@A for
every adapted linear weight and the base tensor otherwise, so a merged model is never held whole.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qwenlab.adapters.merge import merge_lora
from qwenlab.adapters.peft_format import LoraAdapter, check_adapter_fits, read_adapter
from qwenlab.checkpoint import Checkpoint, open_checkpoint
from qwenlab.model.load import parse_dtype


class AdaptedCheckpoint(Checkpoint):
    """Subclasses Checkpoint (without its folder scan) so load_model and the merge executor take it as one."""

    def __init__(self, base_checkpoint: Checkpoint | str | Path, adapter_dir: LoraAdapter | str | Path):
        # A folder, or an open source with the Checkpoint interface (a Checkpoint, the merge's MappedCheckpoint).
        is_folder = isinstance(base_checkpoint, (str, Path))
        self.base = open_checkpoint(base_checkpoint) if is_folder else base_checkpoint
        self.adapter = adapter_dir if isinstance(adapter_dir, LoraAdapter) else read_adapter(adapter_dir)
        check_adapter_fits(self.adapter, {n: self.base.shape(n) for n in self.base.tensor_names()},
                           base_name=str(self.base.path))
        self.config = self.base.config
        self.config_dict = self.base.config_dict
        self.generation_config = self.base.generation_config
        self.path = self.base.path
        self._adapted = {module + ".weight": module for module in self.adapter.modules}

    def tensor_names(self) -> list[str]:
        return self.base.tensor_names()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def lm_head_name(self) -> str:
        return self.base.lm_head_name()

    def validate(self) -> "AdaptedCheckpoint":
        self.base.validate()
        return self

    def get(self, name: str) -> torch.Tensor:
        tensor = self.base.get(name)
        module = self._adapted.get(name)
        if module is None:
            return tensor
        a, b = self.adapter.modules[module]
        return merge_lora(tensor, a, b, self.adapter.scaling(module))

    def get_fp32(self, name: str) -> torch.Tensor:
        """The merged tensor before the cast back to the base dtype."""
        module = self._adapted.get(name)
        if module is None:
            return self.base.get(name).float()
        a, b = self.adapter.modules[module]
        return merge_lora(self.base.get(name).float(), a, b, self.adapter.scaling(module))


def merge_adapter_into_folder(base: str | Path, adapter: str | Path, out: str | Path, *, dtype: str | None = None,
                              force: bool = False, progress: bool = True) -> Path:
    """Write base + adapter as a normal HF folder (W + scaling·B@A), streaming tensor by tensor."""
    from tqdm import tqdm

    from qwenlab.checkpoint import CheckpointWriter, copy_tokenizer_files
    from qwenlab.checkpoint.lineage import make_lineage, write_lineage

    adapted = AdaptedCheckpoint(base, adapter)
    out_dtype = parse_dtype(dtype) if dtype else parse_dtype(adapted.config.torch_dtype)
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[out_dtype]
    config = dict(adapted.config_dict, torch_dtype=dtype_name)
    config.pop("dtype", None)
    with CheckpointWriter(out, config, generation_config=adapted.generation_config or None, force=force,
                          inputs=[adapted.path, adapter]) as writer:
        for name in tqdm(adapted.tensor_names(), desc="merge", unit="tensor", disable=not progress):
            writer.add(name, adapted.get_fp32(name).to(out_dtype))
        copy_tokenizer_files(adapted.path, writer.path_in_output(""))
        lineage = make_lineage("merge", "lora-merge", {"base": adapted.path, "adapter": adapter},
                               {"dtype": dtype_name, "modules": len(adapted.adapter.modules)})
        write_lineage(writer.path_in_output(""), lineage)
    return Path(out)
