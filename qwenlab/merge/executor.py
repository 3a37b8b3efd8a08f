"""Streaming execution of a merge plan: one output tensor at a time, read, merged in float32, written, freed.

Peak memory is the writer's shard buffer plus one tensor's inputs and temporaries, whatever the
models' size. The output folder appears only when complete (CheckpointWriter's atomic rename).
"""

from __future__ import annotations

import functools
import logging
import threading
import zlib
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from qwenlab.checkpoint import CheckpointWriter
from qwenlab.checkpoint.dtypes import LONG_NAMES
from qwenlab.checkpoint.dtypes import parse_dtype as parse_user_dtype
from qwenlab.checkpoint.lineage import make_lineage, write_lineage
from qwenlab.checkpoint.writer import prepare_output_dir
from qwenlab.errors import QwenlabError
from qwenlab.merge.config import MergeConfig, config_as_dict, load_merge_config
from qwenlab.merge.heap import retained_heap
from qwenlab.merge.methods import get_method
from qwenlab.merge.methods.elementwise import to_float32
from qwenlab.merge.plan import MergePlan, PlannedTensor, build_plan
from qwenlab.merge.sources import TensorSource, open_model_source
from qwenlab.merge.tokenizer_source import check_vocabularies, tokenizer_donor, warn_on_differences, write_tokenizer

log = logging.getLogger(__name__)

# Small shards keep the writer's buffer (its share of peak memory) well below a model's size.
DEFAULT_MERGE_SHARD_BYTES = 1024**3
MERGE_DTYPES = ("bfloat16", "float16", "float32", "float64")


def parse_dtype(name: str | None, field: str) -> torch.dtype | None:
    return None if name is None else parse_user_dtype(name, field, MERGE_DTYPES)


def open_sources(config: MergeConfig, open_model: Callable[[str], TensorSource]) -> dict[str, TensorSource]:
    return {path: open_model(path) for path in config.model_paths()}


def check_models(sources: dict[str, TensorSource]) -> None:
    """Model-level agreement: tied embeddings and vocabulary."""
    tied = {name: s.config.tie_word_embeddings for name, s in sources.items()}
    if len(set(tied.values())) > 1:
        listing = ", ".join(f"{name} ({'tied' if t else 'untied'})" for name, t in tied.items())
        raise QwenlabError(f"the models mix tied and untied embeddings: {listing}; a tied model has no "
                           "lm_head to merge, so merge models of one kind")
    check_vocabularies(sources)


def check_tensor_shapes(plan: MergePlan, sources: dict[str, TensorSource]) -> None:
    """Every planned tensor exists in its inputs with one shape: known from headers, before any write."""
    names = {model: set(source.tensor_names()) for model, source in sources.items()}
    for planned in plan.tensors:
        shapes = []
        for model, name in planned.inputs:
            if name not in names[model]:
                raise QwenlabError(f"tensor '{name}' is missing in {model}")
            shapes.append((model, tuple(sources[model].shape(name))))
        for model, shape in shapes[1:]:
            if shape != shapes[0][1]:
                raise QwenlabError(f"tensor '{planned.name}': shape mismatch, {list(shapes[0][1])} in "
                                   f"{shapes[0][0]} vs {list(shape)} in {model}")


def tensor_seed(seed: int, tensor_name: str, model_index: int) -> int:
    """A per-tensor, per-model seed from names only: random masks do not depend on execution order."""
    return zlib.crc32(f"{seed}/{tensor_name}/{model_index}".encode())


def merge_tensor(plan: MergePlan, planned: PlannedTensor, sources: dict[str, TensorSource],
                 load_dtype: torch.dtype | None, out_dtype: torch.dtype | None, seed: int) -> torch.Tensor:
    """One output tensor, in out_dtype (default: the dtype its inputs were stored in)."""
    method = plan.method
    stored = [sources[model].get(name) for model, name in planned.inputs]
    if load_dtype is not None:
        stored = [tensor.to(load_dtype) for tensor in stored]  # mergekit's `dtype` casts inputs as they load
    out_dtype = out_dtype or functools.reduce(torch.promote_types, [t.dtype for t in stored])
    tensors = [to_float32(t) for t in stored] if method.takes_float32_inputs else stored
    del stored
    params = {**planned.params, "out_dtype": out_dtype}
    if method.solves_layers:
        if plan.solved is None:
            from qwenlab.merge.layerwise import solve_layers

            plan.solved = solve_layers(plan, sources)
        params["solved"] = plan.solved.get(planned.name)
    elif method.needs_activations:
        params["grams"] = [input_gram(plan, sources, model, name) for model, name in planned.inputs]
    if method.uses_seed:
        params["seeds"] = [tensor_seed(seed, planned.name, i) for i in range(len(tensors))]
    return method.function(tensors, params).to(out_dtype)


def input_gram(plan: MergePlan, sources: dict[str, TensorSource], model: str, name: str) -> torch.Tensor | None:
    """The Gram matrix of the inputs of the linear whose weight is `name`, in `model` on its data."""
    from qwenlab.merge.activations import model_grams

    index, entry = next((i, e) for i, e in enumerate(plan.config.models or []) if e.model == model)
    return model_grams(sources[model], entry.data, f"models[{index}].data", progress=True).get(name)


def check_activation_data(config: MergeConfig) -> None:
    """A data-aware method needs `data` on every model; other methods take none (it would be ignored)."""
    method = get_method(config.merge_method)
    for index, entry in enumerate(config.models or []):
        if method.needs_activations and entry.data is None:
            raise QwenlabError(f"models[{index}].data: {method.name} measures each model on its own examples; "
                               "give data: {task: NAME} (or tasks: [...], or file: chats.jsonl)")
        if not method.needs_activations and entry.data is not None:
            raise QwenlabError(f"models[{index}].data: only regmean and regmean_sequential use data ({method.name} merges weights alone)")
        if entry.data is not None and entry.data.file is not None and not Path(entry.data.file).is_file():
            raise QwenlabError(f"models[{index}].data.file: {entry.data.file} not found")
        if entry.data is not None and entry.data.file is None:
            from qwenlab.tasks import generate

            for task in [entry.data.task] if entry.data.task else entry.data.tasks:
                try:
                    generate(task, 0, entry.data.difficulty)
                except QwenlabError as e:
                    raise QwenlabError(f"models[{index}].data: {e}") from None
    if method.needs_activations and config.slices:
        raise QwenlabError(f"{method.name} takes models, not slices")


def release_inputs(sources: dict[str, TensorSource]) -> None:
    """Let inputs drop what they hold for the tensor just merged (optional for a source)."""
    for source in sources.values():
        getattr(source, "release", lambda: None)()


def output_config_dict(plan: MergePlan, out_dtype: torch.dtype | None) -> dict:
    config = plan.output_config
    extra = dict(config.extra)
    layer_types = extra.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) != config.num_hidden_layers:
        if len(set(layer_types)) == 1:
            extra["layer_types"] = layer_types[:1] * config.num_hidden_layers
        else:
            extra.pop("layer_types")  # transformers derives it again from the sliding-window settings
    dtype_name = LONG_NAMES[out_dtype] if out_dtype is not None else config.torch_dtype
    if "dtype" in extra:  # transformers 5 writes (and reads first) `dtype`; keep it in step
        extra["dtype"] = dtype_name
    return config.replace(extra=extra, torch_dtype=dtype_name).to_hf_dict()


def _start_lineage(plan: MergePlan, sources: dict[str, TensorSource]) -> tuple[threading.Thread, dict]:
    """Hash the inputs on a thread while the merge runs (hashlib releases the GIL)."""
    base = plan.config.base_model
    roles = {}
    for index, (path, source) in enumerate(sources.items()):
        role = "base" if path == base else f"model{index}"
        roles[role] = source.path
        if getattr(source, "adapter_path", None) is not None:  # BASE+ADAPTER inputs
            roles[f"{role}-adapter"] = source.adapter_path
    result: dict = {}

    def work():
        try:
            result["lineage"] = make_lineage("merge", plan.method.name, roles, config_as_dict(plan.config))
        except Exception as e:  # reported after the merge; never lost silently
            result["error"] = e

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread, result


def input_paths(sources: dict[str, TensorSource]) -> list[Path]:
    """Every folder a merge reads (models, and the adapters of BASE+ADAPTER inputs): OUT may hold none."""
    paths = [getattr(s, "path", None) for s in sources.values()]
    paths += [getattr(s, "adapter_path", None) for s in sources.values()]
    return [p for p in paths if p is not None]


def write_merge(plan: MergePlan, sources: dict[str, TensorSource], out: Path, *, dtype: torch.dtype | None,
                force: bool, max_shard_bytes: int, progress: bool, seed: int) -> Path:
    config = plan.config
    load_dtype = parse_dtype(config.dtype, "dtype")
    out_dtype = dtype or parse_dtype(config.out_dtype, "out_dtype") or load_dtype
    base = config.base_model
    donor = tokenizer_donor(config.tokenizer_source, base, sources)
    generation_config = next((s.generation_config for s in sources.values() if s.path == donor),
                             sources[base or next(iter(sources))].generation_config)
    warn_on_differences(sources)
    lineage_thread, lineage = _start_lineage(plan, sources)
    with CheckpointWriter(out, output_config_dict(plan, out_dtype), max_shard_bytes=max_shard_bytes,
                          generation_config=generation_config, force=force, inputs=input_paths(sources)) as writer:
        for planned in tqdm(plan.tensors, desc=f"merge ({plan.method.name})", unit="tensor", disable=not progress):
            writer.add(planned.name, merge_tensor(plan, planned, sources, load_dtype, out_dtype, seed))
            release_inputs(sources)
        write_tokenizer(writer.path_in_output(""), donor, config.chat_template, sources)
        lineage_thread.join()
        if "error" in lineage:
            raise lineage["error"]
        write_lineage(writer.path_in_output(""), lineage["lineage"])
    return out


def plan_merge(config: MergeConfig | dict | str | Path, *,
               open_model: Callable[[str], TensorSource] = open_model_source) -> tuple[MergePlan, dict]:
    """Load the config, open the inputs (headers only), plan and check: everything but the work."""
    config = load_merge_config(config)
    parse_dtype(config.dtype, "dtype"), parse_dtype(config.out_dtype, "out_dtype")  # fail before any reading
    check_activation_data(config)
    sources = open_sources(config, open_model)
    check_models(sources)
    plan = build_plan(config, sources)
    check_tensor_shapes(plan, sources)
    return plan, sources


def merge(config: MergeConfig | dict | str | Path, out: str | Path, *, dtype: str | torch.dtype | None = None,
          force: bool = False, max_shard_bytes: int = DEFAULT_MERGE_SHARD_BYTES, progress: bool = True,
          seed: int = 0, open_model: Callable[[str], TensorSource] = open_model_source) -> Path:
    """Merge the models a mergekit-style config names into the HF folder `out`; returns its path.

    dtype overrides the saved dtype (out_dtype, then dtype, in the config); seed drives DARE/DELLA
    masks; open_model turns a config's model name into an input (a Checkpoint by default).
    """
    out = prepare_output_dir(out, force)  # refuse an existing folder before any work
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype, "--dtype")
    plan, sources = plan_merge(config, open_model=open_model)
    try:
        prepare_output_dir(out, force, input_paths(sources))  # before any work, now that the inputs are known
        with retained_heap():
            return write_merge(plan, sources, out, dtype=dtype, force=force, max_shard_bytes=max_shard_bytes,
                               progress=progress, seed=seed)
    finally:
        release_inputs(sources)
