"""Per-row adapters on the one-call native decode stack: a batch whose rows use different adapters (and
none) decodes in one native call per step for fp32, bf16, int8 and int4 bases, with each row's logits
equal to the layer-by-layer path's (the bridge's per-linear deltas), and a served mixed batch gives each
request the text it has alone."""

import pytest
import torch

from qwenlab import native
from qwenlab.loading import load
from qwenlab.quant import native as kernels
from qwenlab.serve.adapters_bridge import AdapterSet
from tests.conftest import build_hf_model

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernel: {native.unavailable_reason()}")

ADAPTER_NAMES = ("a", "b")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base whose q, k, v, gate and up widths are multiples of 64 (a quantized layer kept apart for its
    adapters runs on the stack only with exact widths), two PEFT adapters of different ranks and targets,
    and int8 / int4 copies."""
    from qwenlab.quant import quantize_model
    from tests.adapters.conftest import make_peft_adapter

    root = tmp_path_factory.mktemp("adapter-stack")
    paths = {"base": root / "base"}
    build_hf_model(paths["base"], hidden=128, intermediate=128, layers=2, heads=4, kv_heads=2, seed=3)
    make_peft_adapter(paths["base"], root / "a", r=4, alpha=8, seed=1)  # every linear
    make_peft_adapter(paths["base"], root / "b", r=2, alpha=6, targets=("q_proj", "v_proj", "down_proj"), seed=2)
    paths.update(a=root / "a", b=root / "b")
    for bits in (8, 4):
        paths[f"int{bits}"] = quantize_model(paths["base"], root / f"int{bits}", bits=bits, group_size=32,
                                             progress=False)
    return paths


def with_adapters(models, kind, lora_dtype="auto"):
    model = load(models[kind] if kind.startswith("int") else models["base"], "fp32" if kind.startswith("int") else kind,
                 fuse=False).model  # what serve loads for a base that takes adapters
    adapters = AdapterSet(model, dtype=lora_dtype)
    for name in ADAPTER_NAMES:
        adapters.attach(name, adapters.read(models[name]), str(models[name]))
    assert adapters.use_kernel
    return model, adapters


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8", "int4"])
def test_rows_with_different_adapters_decode_in_one_native_call(models, kind, monkeypatch):
    stacked, stacked_adapters = with_adapters(models, kind)
    layered, layered_adapters = with_adapters(models, kind)
    layered.row_adapters = None  # no provider: the stack declines adapters, the layers run one by one
    taken = []
    call = kernels.DecodeStack.__call__

    def counted(self, *args, **kwargs):
        out = call(self, *args, **kwargs)
        lora = args[7] if len(args) > 7 else kwargs.get("lora")
        taken.append((out is not None, lora is not None))
        return out

    monkeypatch.setattr(kernels.DecodeStack, "__call__", counted)
    rows = ["a", None, "b", "a"]
    prompt = torch.randint(0, 300, (4, 7), generator=torch.Generator().manual_seed(4))
    valid = torch.ones(4, 7, dtype=torch.bool)
    valid[1, :3] = valid[2, :5] = False  # left-padded rows: the stack runs them from their own starts
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    caches = [m.new_cache(4, 24) for m in (stacked, layered)]
    tolerance = 1e-4 if kind == "fp32" else 2e-3
    with torch.inference_mode():
        for adapters in (stacked_adapters, layered_adapters):
            adapters.select(rows)
        outs = [m(prompt, positions=positions, cache=c, valid=valid) for m, c in zip((stacked, layered), caches)]
        for step in range(5):
            torch.testing.assert_close(outs[0], outs[1], atol=tolerance, rtol=tolerance)
            if step == 3:  # rows change adapters between steps (a row finished, another took its place)
                rows = [None, "b", "b", None]
                for adapters in (stacked_adapters, layered_adapters):
                    adapters.select(rows)
            nxt = outs[1][:, -1:].argmax(-1)
            positions = positions[:, -1:] + 1
            outs = [m(nxt, positions=positions, cache=c) for m, c in zip((stacked, layered), caches)]
        torch.testing.assert_close(outs[0], outs[1], atol=tolerance, rtol=tolerance)
    # every decode step of the stacked model ran in the stack with the adapters' deltas; the layered one never
    assert taken == [(True, True)] * 5, taken
    # without any adapter row, the stack runs with no deltas
    with torch.inference_mode():
        stacked_adapters.select([None] * 4)
        taken.clear()
        stacked(outs[0][:, -1:].argmax(-1), positions=positions + 1, cache=caches[0])
    assert taken == [(True, False)]


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory):
    """An int8 base wide enough (hidden 512, r 16) that the deltas run on the kernels' thread pool."""
    from qwenlab.quant import quantize_model
    from tests.adapters.conftest import make_peft_adapter

    root = tmp_path_factory.mktemp("adapter-stack-wide")
    build_hf_model(root / "base", hidden=512, intermediate=1024, layers=2, heads=8, kv_heads=2, seed=7)
    make_peft_adapter(root / "base", root / "a", r=16, alpha=32, seed=1)
    make_peft_adapter(root / "base", root / "b", r=8, alpha=8, targets=("k_proj", "v_proj", "up_proj"), seed=2)
    return {"int8": quantize_model(root / "base", root / "int8", bits=8, group_size=32, progress=False),
            "a": root / "a", "b": root / "b"}


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("rows", [["a", None, "b", "a"], ["b"], ["a", "b"]])
def test_deltas_on_the_thread_pool_equal_the_layer_by_layer_path(wide_models, rows, threads, monkeypatch):
    """q, k and v's deltas (and gate and up's) run as one pool job on 2-3 threads: whole rows per thread,
    and a row's columns split when rows are fewer than threads. The logits equal the layer-by-layer path's."""
    import importlib

    monkeypatch.setattr(importlib.import_module("qwenlab.native.library"), "_kernel_threads", threads)
    stacked, stacked_adapters = with_adapters(wide_models, "int8")
    layered, layered_adapters = with_adapters(wide_models, "int8")
    layered.row_adapters = None
    b = len(rows)
    prompt = torch.randint(0, 300, (b, 5), generator=torch.Generator().manual_seed(b))
    caches = [m.new_cache(b, 8) for m in (stacked, layered)]
    with torch.inference_mode():
        for adapters in (stacked_adapters, layered_adapters):
            adapters.select(rows)
        outs = [m(prompt, cache=c) for m, c in zip((stacked, layered), caches)]
        nxt = outs[1][:, -1:].argmax(-1)
        steps = [m(nxt, cache=c, positions=torch.full((b, 1), 5)) for m, c in zip((stacked, layered), caches)]
    torch.testing.assert_close(steps[0], steps[1], atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("kind,lora_dtype,stacked", [
    ("fp32", "auto", torch.float32), ("bf16", "auto", torch.bfloat16), ("int8", "auto", torch.bfloat16),
    ("int4", "auto", torch.bfloat16), ("int4", "fp32", torch.float32), ("fp32", "bf16", torch.bfloat16)])
def test_adapter_stacks_take_the_bases_precision_unless_told(models, kind, lora_dtype, stacked):
    """auto (vLLM's --lora-dtype auto): bf16 stacks over a bf16 or quantized base, fp32 over fp32."""
    _, adapters = with_adapters(models, kind, lora_dtype)
    adapters.select(["a", "b"])
    dtypes = {(stack.a.dtype, stack.bt.dtype) for stack in adapters._stacks.values()}
    assert dtypes == {(stacked, stacked)}
    assert {stack.bits for stack in adapters._stacks.values()} == {16 if stacked == torch.bfloat16 else 32}


def test_an_unknown_lora_dtype_is_refused_by_name(models):
    from qwenlab.errors import QwenlabError

    with pytest.raises(QwenlabError, match="lora dtype must be one of auto, fp32, bf16, got 'fp16'"):
        with_adapters(models, "fp32", "fp16")


@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_bf16_stacks_change_the_logits_by_the_rounding_of_the_adapters_only(models, kind):
    """The same mixed batch with fp32 and with bf16 stacks: bf16 rounds A and scaled B (relative 2^-9), so
    the logits move by a small fraction of what the adapters themselves move them, and the base rows not at all."""
    rows = ["a", None, "b", "a"]
    prompt = torch.randint(0, 300, (4, 6), generator=torch.Generator().manual_seed(5))
    outs = {}
    with torch.inference_mode():
        for lora_dtype in ("fp32", "bf16", "none"):
            model, adapters = with_adapters(models, kind, "fp32" if lora_dtype == "none" else lora_dtype)
            adapters.select(rows if lora_dtype != "none" else [None] * 4)
            cache = model.new_cache(4, 16)
            logits = model(prompt, cache=cache)
            step = model(logits[:, -1:].argmax(-1) if lora_dtype == "fp32" else outs["fp32"][0], cache=cache,
                         positions=torch.full((4, 1), prompt.shape[1]))
            outs[lora_dtype] = (logits[:, -1:].argmax(-1), torch.cat([logits, step], 1))
    fp32, bf16, base = outs["fp32"][1], outs["bf16"][1], outs["none"][1]
    torch.testing.assert_close(bf16[1], fp32[1], atol=0, rtol=0)  # the row with no adapter
    for row in (0, 2, 3):
        moved = (fp32[row] - base[row]).abs().max()
        assert moved > 1e-2  # the adapters really change these rows
        assert (bf16[row] - fp32[row]).abs().max() < 0.05 * moved


def test_a_served_batch_mixing_adapters_runs_on_the_stack_and_equals_each_request_alone(models, monkeypatch):
    from qwenlab.serve.engine import Engine
    from qwenlab.serve.requests import EngineRequest, SamplingParams
    from tests.serve.test_engine import Collector, alone, run_until_done

    loaded = load(models["int8"], fuse=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    engine = Engine("base-int8", model, tokenizer, tokenizer.stop_ids(), max_batch=4, max_context=128)
    for name in ADAPTER_NAMES:
        engine.adapters.attach(name, engine.adapters.read(models[name]), str(models[name]))
    reference = load(models["int8"], fuse=False).model
    from qwenlab.adapters import attach_adapter

    for name in ADAPTER_NAMES:
        attach_adapter(reference, models[name], name)
    taken = []
    call = kernels.DecodeStack.__call__

    def counted(self, *args, **kwargs):
        out = call(self, *args, **kwargs)
        if self is model.decode_stack:
            taken.append((args[0].shape[0], out is not None, (args[7] if len(args) > 7 else None) is not None))
        return out

    monkeypatch.setattr(kernels.DecodeStack, "__call__", counted)
    jobs = [(tokenizer.encode(p), adapter, 8) for p, adapter in
            (("hello world", "a"), ("Reverse the word: apple", None), ("a b c", "b"), ("sort: d c b a", "a"))]
    collectors = [Collector() for _ in jobs]
    for (ids, adapter, max_tokens), collector in zip(jobs, collectors):
        engine.submit(EngineRequest(ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True), collector,
                                    adapter=adapter))
    run_until_done(engine, collectors)
    for (ids, adapter, max_tokens), collector in zip(jobs, collectors):
        assert "".join(collector.text) == alone(reference, tokenizer, ids, adapter, max_tokens), adapter
    assert taken and all(ran for _, ran, _ in taken), taken
    assert any(rows == 4 and with_lora for rows, _, with_lora in taken), taken
