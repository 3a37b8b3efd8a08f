"""The layer-by-layer solve behind `regmean_sequential`: RegMean run on the merged model's own activations.

RegMean (methods/regmean.py) fits every linear on each model's own inputs, all at once, so each later layer is
fitted to inputs the merged model never produces: the earlier layers' errors add up. Here the merged model is
built in forward order (Nguyen et al. 2025, RegMean++, arXiv:2508.03121). Each model's data runs through the
layers merged so far. Each linear (q/k/v together, then o, gate/up, down) is then the least-squares fit

    min_W Σᵢ λᵢ ‖X̃ᵢ Wᵀ - Yᵢ‖² + ρ‖W - W̄‖²

on those merged inputs X̃ᵢ. RegMean++ targets Yᵢ = X̃ᵢ Wᵢᵀ (model i's weight on the merged inputs:
match_outputs false). By default (match_outputs) the targets are model i's own forward pass instead: a reader
(q, k, v, gate, up) gets model i's own output there; a writer to the residual stream (o, down) gets model i's
own output plus the gap between model i's stream and the merged one just before the write, so that the merged
stream after each attention and each MLP lands on model i's. Each layer then also corrects what the layers
before it got wrong. The prefix that every row of an input's data shares (a chat template's system prompt) is
counted once, not once per row.

Memory: every input as a float32 model, plus the residual stream of each input's data, twice (the input's own
and the merged model's), and one layer's linear inputs. Tensors that are not a decoder linear's weight are the
λ-weighted average, as in RegMean.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qwenlab.errors import QwenlabError
from qwenlab.merge.methods.regmean import ridge_solve

# Each group's linears read the same input, so one pass measures it for all of them; the groups in forward order.
LINEAR_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                 ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
_TEACHERS: OrderedDict = OrderedDict()  # (model, adapter, data) -> (float32 model, token batches, answer positions)
_TEACHER_CACHE_SIZE = 4
_SOLVES: OrderedDict = OrderedDict()  # solve key -> {linear: solved weight}, before any distillation
_SOLVE_CACHE_SIZE = 2
BATCH = 64  # rows per forward: nano's short chats make small matmuls


class _Stop(Exception):
    """Raised by a hook once the input it waits for is captured: the rest of the layer need not run."""


@dataclass
class _Input:
    model: str  # the config's name for it
    teacher: torch.nn.Module  # the input model itself, float32
    batches: list  # (tokens, real-token mask) per batch of its data
    own: list  # its own residual stream entering the current layer, per batch
    merged: list  # the merged model's residual stream on the same data, per batch
    rope: list  # (cos, sin) per batch
    answers: list  # per batch, [B, T] bool: the positions that predict an answer token (for distillation)
    own_reads: list | None = None  # per batch, the current layer's {first linear of a group: what it reads}


def _teacher(source, data, where: str):
    from qwenlab.merge.activations import (data_token_rows, input_key, runnable_model, shared_prefix_length,
                                           token_batches)
    from qwenlab.merge.distill import answer_positions

    key = input_key(source, data)
    if key not in _TEACHERS:
        rows, pad_id, starts = data_token_rows(source, data, where)
        batches = token_batches(rows, pad_id, BATCH)
        answers = [answer_positions(mask, starts[b * BATCH:(b + 1) * BATCH]) for b, (_, mask) in enumerate(batches)]
        # The prefix every row shares (a chat's system prompt: half of nano's tokens) is one point, counted once:
        # 512 copies of it outweighed the tasks' own tokens in every fit.
        shared = shared_prefix_length(rows)
        for b, (_, mask) in enumerate(batches):
            mask[(1 if b == 0 else 0):, :shared] = False
        _TEACHERS[key] = (runnable_model(source), batches, answers)
        while len(_TEACHERS) > _TEACHER_CACHE_SIZE:
            _TEACHERS.popitem(last=False)
    _TEACHERS.move_to_end(key)
    return _TEACHERS[key]


def _weights(planned) -> dict[str, float]:
    return {model: float(w) for (model, _), w in zip(planned.inputs, planned.params["weight"])}


def _run_recording(layer, x, cos, sin, index: int, mask: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The layer's output on x, and what each group's linears read on the way ({path: [real tokens, width]})."""
    seen, handles = {}, []
    for group in LINEAR_GROUPS:
        def hook(_, args, path=group[0]):
            seen[path] = args[0][mask]
        handles.append(layer.get_submodule(group[0]).register_forward_pre_hook(hook))

    def mid_hook(_, args):
        seen["mid"] = args[0][mask]
    handles.append(layer.post_attention_layernorm.register_forward_pre_hook(mid_hook))
    seen["stream"] = x[mask]
    try:
        out = layer(x, cos, sin, None, None, index, 0)
    finally:
        for handle in handles:
            handle.remove()
    return seen, out


def _capture(layer, module, x, cos, sin, index: int) -> torch.Tensor:
    """The input `module` (a linear inside `layer`) receives when the layer runs on x."""
    seen = {}

    def hook(_, args):
        seen["x"] = args[0]
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        layer(x, cos, sin, None, None, index, 0)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["x"]


@torch.no_grad()
def solve_layers(plan, sources: dict, progress: bool = True) -> dict[str, torch.Tensor]:
    """{weight name: merged float32 weight} for every linear of the decoder layers, solved in forward order."""
    from qwenlab.merge.activations import empty_model

    planned = {p.name: p for p in plan.tensors}
    data = {entry.model: (index, entry.data) for index, entry in enumerate(plan.config.models or [])}
    models = [model for model, _ in plan.tensors[0].inputs]
    for model in models:
        if model not in data or data[model][1] is None:
            raise QwenlabError(f"{plan.method.name}: every input needs data, and '{model}' has none "
                               "(list the base under models, with data, instead of base_model)")
    merged = empty_model(plan.output_config).eval().requires_grad_(False)
    state = merged.state_dict()
    for name, tensor in state.items():  # the method's own λ-weighted average to start from (and, outside the
        if name in planned:                # linears, to keep)
            tensor.copy_(plan.method.function([sources[m].get(n).float() for m, n in planned[name].inputs],
                                              {**planned[name].params, "solved": None}))
    inputs = []
    for model in models:
        index, entry = data[model]
        teacher, batches, answers = _teacher(sources[model], entry, f"models[{index}].data")
        own = [teacher.model.embed_tokens(tokens) for tokens, _ in batches]
        rope = [teacher.rotary(torch.arange(tokens.shape[1]).expand(tokens.shape), torch.float32)
                for tokens, _ in batches]
        inputs.append(_Input(model, teacher, batches, own, [merged.model.embed_tokens(t) for t, _ in batches], rope,
                             answers))
    key = _solve_key(plan, planned, models, data, sources)
    if key in _SOLVES:  # the same solve as a moment ago (merge-search's best trial, refined): only distil again
        _SOLVES.move_to_end(key)
        solved = {name: weight.clone() for name, weight in _SOLVES[key].items()}
        for name, weight in solved.items():
            merged.get_parameter(name).copy_(weight)
    else:
        solved = _solve_in_order(plan, planned, merged, inputs, progress)
        _SOLVES[key] = {name: weight.clone() for name, weight in solved.items()}
        while len(_SOLVES) > _SOLVE_CACHE_SIZE:
            _SOLVES.popitem(last=False)
    first = planned[next(iter(solved))]
    if int(first.params.get("distill_steps") or 0) > 0:  # then the outputs, end to end (merge/distill.py)
        from qwenlab.merge.distill import distill_linears

        weights = _weights(first)
        chosen = [(item.teacher, [(tokens, where) for (tokens, _), where in zip(item.batches, item.answers)])
                  for item in inputs if weights[item.model] > 0]
        for item in inputs:
            item.own = item.merged = item.own_reads = None  # the solve's streams: not needed any more
        distill_linears(merged, chosen, int(first.params["distill_steps"]), float(first.params["distill_lr"]),
                        progress, f"merge ({plan.method.name})")
        solved = {name: merged.get_parameter(name).detach().clone() for name in solved}
    return solved


def _solve_key(plan, planned: dict, models: list, data: dict, sources: dict) -> str:
    """What decides a solve: each input and its data, and the solve's own parameters (not the distillation's)."""
    from qwenlab.merge.activations import input_key

    solve_params = [(name, {k: v for k, v in p.params.items() if not k.startswith("distill_")})
                    for name, p in planned.items()]
    return repr(([input_key(sources[m], data[m][1]) for m in models], plan.output_config, solve_params))


def _solve_in_order(plan, planned: dict, merged, inputs: list, progress: bool) -> dict[str, torch.Tensor]:
    """Every decoder linear of `merged`, solved and set in forward order (inputs: each input's _Input)."""
    solved: dict[str, torch.Tensor] = {}
    layers = plan.output_config.num_hidden_layers
    steps = tqdm(total=layers * len(LINEAR_GROUPS), desc=f"merge ({plan.method.name}): solving layers", unit="group",
                 disable=not progress, file=sys.stderr)

    def solve(index: int, group: tuple, reads: list, residual=None) -> None:
        layer = merged.model.layers[index]
        names = [f"model.layers.{index}.{path}.weight" for path in group]
        for path, name, weight in zip(group, names, _solve_group(plan, [planned[n] for n in names], layer, index,
                                                                 group, inputs, reads, residual)):
            layer.get_submodule(path).weight.copy_(weight)
            solved[name] = weight
        steps.update(1)

    def each(function) -> list:  # function(input index, batch index, cos, sin) for every batch of every input
        return [[function(i, b, cos, sin) for b, (cos, sin) in enumerate(item.rope)] for i, item in enumerate(inputs)]

    for index in range(layers):
        layer = merged.model.layers[index]
        for item in inputs:  # each input's own layer, run once: what its linears read, and its stream moves on
            own_layer = item.teacher.model.layers[index]
            item.own_reads = []
            for b, ((_, mask), (cos, sin)) in enumerate(zip(item.batches, item.rope)):
                reads, item.own[b] = _run_recording(own_layer, item.own[b], cos, sin, index, mask)
                item.own_reads.append(reads)
        # The merged layer one step at a time, as DecoderLayer.forward (model/qwen2.py) runs it; each step reads what
        # the linears solved before it now produce.
        attention, mlp = layer.self_attn, layer.mlp
        solve(index, LINEAR_GROUPS[0], each(lambda i, b, cos, sin: layer.input_layernorm(inputs[i].merged[b])))
        mixes = each(lambda i, b, cos, sin: _capture(layer, attention.o_proj, inputs[i].merged[b], cos, sin, index))
        solve(index, LINEAR_GROUPS[1], mixes, ("stream", [item.merged for item in inputs]))
        mids = each(lambda i, b, cos, sin: inputs[i].merged[b] + attention.o_proj(mixes[i][b]))
        normed = [[layer.post_attention_layernorm(x) for x in rows] for rows in mids]
        solve(index, LINEAR_GROUPS[2], normed)
        products = [[F.silu(mlp.gate_proj(x)) * mlp.up_proj(x) for x in rows] for rows in normed]
        solve(index, LINEAR_GROUPS[3], products, ("mid", mids))
        for i, item in enumerate(inputs):
            item.merged = [mid + mlp.down_proj(x) for mid, x in zip(mids[i], products[i])]
    steps.close()
    return solved


def _solve_group(plan, planned: list, layer, index: int, group: tuple, inputs: list, reads: list,
                 residual=None) -> list[torch.Tensor]:
    """The merged weights of linears that read one input (q/k/v; gate/up; or one alone), from every input's data.

    reads[i][b]: what the group reads in the merged model on batch b of input i's data. residual: for o_proj and
    down_proj, (the recorded name of the own stream before the write, the merged stream there per input and batch)."""
    own_linears = [[item.teacher.model.layers[index].get_submodule(path) for path in group] for item in inputs]
    biases = [layer.get_submodule(path).bias for path in group]  # the merged ones: the λ-weighted average
    width = own_linears[0][0].weight.shape[1]
    lhs = [torch.zeros(width, width, dtype=torch.float64) for _ in group]
    rhs = [torch.zeros(width, m.weight.shape[0], dtype=torch.float64) for m in own_linears[0]]
    average = [torch.zeros_like(r) for r in rhs]
    weights = [_weights(p) for p in planned]
    for i, item in enumerate(inputs):
        for k, own in enumerate(own_linears[i]):
            average[k] += weights[k][item.model] * own.weight.double().T
        active = [k for k in range(len(group)) if weights[k][item.model] > 0]
        if not active:
            continue
        # float64 sums: the solve amplifies their rounding by the Gram matrix's condition number (float32 sums
        # moved a model merged with itself by up to 0.08 per weight)
        x = torch.cat([read[mask] for read, (_, mask) in zip(reads[i], item.batches)]).double()  # real tokens only
        gram = x.T @ x
        own_x = torch.cat([own_reads[group[0]] for own_reads in item.own_reads])
        for k in active:
            weight = weights[k][item.model]
            lhs[k] += weight * gram
            if bool(planned[k].params.get("match_outputs", True)):
                y = own_linears[i][k](own_x)
                if residual is not None:  # a writer to the residual stream also makes up the stream's drift
                    key, streams = residual
                    y = y + torch.cat([own_reads[key] for own_reads in item.own_reads]) - \
                        torch.cat([stream[mask] for stream, (_, mask) in zip(streams[i], item.batches)])
                if biases[k] is not None:  # the merged bias is added after the fit
                    y = y - biases[k]
                rhs[k] += weight * (x.T @ y.double())
            else:
                rhs[k] += weight * (gram @ own_linears[i][k].weight.double().T)
    solved = []
    for k, p in enumerate(planned):
        total = sum(weights[k].values())
        if total <= 0:
            raise QwenlabError(f"{plan.method.name}: the weights of '{p.name}' must sum to more than 0")
        solved.append(ridge_solve(lhs[k], rhs[k], average[k] / total, p.params["ridge"]).T.to(torch.float32)
                      .contiguous())
    return solved
