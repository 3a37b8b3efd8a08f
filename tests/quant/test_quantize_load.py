"""Quantized folders: written with a quantization section and lineage, loaded by the model core, round-tripped."""

import json

import pytest
import torch

from qwenlab.checkpoint import open_checkpoint
from qwenlab.errors import QwenlabError
from qwenlab.model import GenerationConfig, load_model
from qwenlab.model.generate import generate_token_ids
from qwenlab.quant import load_quantized_model, quantize_model
from qwenlab.quant.formats import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from qwenlab import native
from tests.conftest import CountedCalls
from qwenlab.loading import load
from qwenlab.quant.linear import Int4WeightLinear, Int8WeightLinear, QuantizedEmbedding

needs_native_kernel = pytest.mark.skipif(not native.available(), reason=f"native kernel: {native.unavailable_reason()}")


def load_q(path, **kw):
    # Quantized folders are checked by qwenlab.quant, not by the float-layout validation.
    return load(path).model if not kw else \
        load_quantized_model(open_checkpoint(path, validate=False), **kw)


def tokens(vocab=300, shape=(2, 12), seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [8, 4])
def test_folder_layout(quantized_dirs, bits):
    folder = quantized_dirs[bits]
    config = json.loads((folder / "config.json").read_text())
    section = config["quantization"]
    assert section["bits"] == bits and section["group_size"] == 32 and section["head_bits"] == 8
    lineage = json.loads((folder / "lineage.json").read_text())
    assert lineage["kind"] == "quantized" and lineage["inputs"][0]["role"] == "base"
    assert (folder / "tokenizer.json").is_file()
    checkpoint = open_checkpoint(folder, validate=False)
    name = "model.layers.0.mlp.down_proj"
    assert checkpoint.shape(f"{name}.qweight") == ((64, 128) if bits == 8 else (64, 64))
    assert checkpoint.get(f"{name}.scales").dtype == torch.float16 and checkpoint.shape(f"{name}.scales") == (64, 4)
    assert (f"{name}.zeros" in checkpoint) == (bits == 4)
    assert "model.embed_tokens.qweight" in checkpoint and "model.embed_tokens.weight" not in checkpoint


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_through_save_and_load(tiny32_dir, quantized_dirs, bits):
    """Every loaded layer multiplies by exactly the weights quantize() produced from the float model."""
    source = open_checkpoint(tiny32_dir)
    model = load_q(quantized_dirs[bits])
    layer = model.model.layers[1]
    assert isinstance(layer.mlp.down_proj, Int8WeightLinear if bits == 8 else Int4WeightLinear)
    for module, name in [(layer.mlp.down_proj, "model.layers.1.mlp.down_proj"),
                         (layer.self_attn.o_proj, "model.layers.1.self_attn.o_proj")]:
        w = source.get(f"{name}.weight").float()
        expected = dequantize_int8(*quantize_int8(w, 32)) if bits == 8 else dequantize_int4(*quantize_int4(w, 32))
        tolerance = 1e-6 if bits == 8 else 1e-3 * float(w.abs().max())  # int4: fp16 rounding of -scale*zero
        assert torch.allclose(module.dequantized_weight(), expected, atol=tolerance)
    # the fused q|k|v rows are q, k, v in order, biases included
    q_w = source.get("model.layers.1.self_attn.q_proj.weight").float()
    fused = layer.self_attn.qkv_proj
    assert fused.out_features == 64 + 2 * 32
    assert torch.equal(fused.bias[:64], source.get("model.layers.1.self_attn.q_proj.bias"))
    assert (fused.dequantized_weight()[:64] - q_w).abs().max() < 0.2 * q_w.abs().max()
    # the tied embedding and the LM head are one quantized table
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding) and model.model.embed_tokens.table is model.lm_head
    # loading again gives the same logits, bit for bit
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x), load_q(quantized_dirs[bits])(x))


@pytest.mark.parametrize("bits,max_error", [(8, 0.03), (4, 0.15)])
def test_logits_close_to_the_float_model_and_generation_runs(tiny32_dir, quantized_dirs, bits, max_error):
    reference = load_model(tiny32_dir)
    model = load_q(quantized_dirs[bits])
    assert model.dtype == torch.float32
    x = tokens()
    with torch.no_grad():
        expected, got = reference(x), model(x)
        unfused = load_q(quantized_dirs[bits], fuse=False)(x)
        slow = load_q(quantized_dirs[bits], backend="reference")(x)
    assert ((got - expected).norm() / expected.norm()).item() < max_error
    assert torch.allclose(unfused, got, atol=1e-4)
    assert ((slow - got).norm() / got.norm()).item() < 0.02  # the kernels' int8 activations
    steps = list(generate_token_ids(model, [[1, 2, 3], [4, 5]], GenerationConfig(max_new_tokens=5), set()))
    assert len(steps) == 5 and all(isinstance(t, int) for step in steps for t in step)


def test_bf16_head_keeps_the_float_table(tiny32_dir, tmp_path):
    out = quantize_model(tiny32_dir, tmp_path / "q", bits=4, group_size=32, head_bits=16, progress=False)
    checkpoint = open_checkpoint(out, validate=False)
    assert checkpoint.get("model.embed_tokens.weight").dtype == torch.bfloat16
    model = load_q(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_bad_input_is_one_clear_error(tiny32_dir, quantized_dirs, tmp_path):
    with pytest.raises(QwenlabError, match="already quantized"):
        quantize_model(quantized_dirs[4], tmp_path / "again", progress=False)
    with pytest.raises(QwenlabError, match="group size 128 does not divide the input dimension 64"):
        quantize_model(tiny32_dir, tmp_path / "g128", bits=8, group_size=128, progress=False)
    assert not (tmp_path / "g128").exists()  # checked before anything is written
    with pytest.raises(QwenlabError, match="--group-size"):
        quantize_model(tiny32_dir, tmp_path / "g48", group_size=48, progress=False)
    with pytest.raises(QwenlabError, match="--head-bits"):
        quantize_model(tiny32_dir, tmp_path / "h2", head_bits=2, progress=False)
    with pytest.raises(QwenlabError, match="exists"):
        quantize_model(tiny32_dir, quantized_dirs[8], progress=False)


def test_stored_tensors_reads_rows_without_a_memory_map(quantized_dirs):
    from qwenlab.quant.stored import StoredTensors

    folder = quantized_dirs[4]
    stored, checkpoint = StoredTensors(folder), open_checkpoint(folder, validate=False)
    name = "model.embed_tokens.qweight"
    whole = checkpoint.get(name)
    assert torch.equal(stored.read(name), whole)
    assert torch.equal(stored.read(name, 17, 40), whole[17:40])
    assert torch.equal(stored.read("model.norm.weight"), checkpoint.get("model.norm.weight"))


def test_logit_comparison_figures(tiny32_dir, quantized_dirs):
    from qwenlab.quant.quality import compare_logits, random_sequences

    reference = load_model(tiny32_dir)
    sequences = random_sequences(300, count=2, length=8)
    same = compare_logits(reference, reference, sequences)
    assert same["rel_rms_error"] == 0 and same["top1_agreement"] == 1 and abs(same["kl"]) < 1e-6
    int8, int4 = (compare_logits(reference, load_q(quantized_dirs[b]), sequences) for b in (8, 4))
    assert 0 < int8["rel_rms_error"] < int4["rel_rms_error"] < 0.2 and int8["kl"] < int4["kl"]


@needs_native_kernel
@pytest.mark.parametrize("bits,padded", [(8, False), (4, False), (8, True), (4, True)])
def test_fused_decode_paths_equal_the_pytorch_path(quantized_dirs, bits, padded, monkeypatch):
    """Decode steps through the native paths give the logits and cache contents of the PyTorch path,
    step after step, for a batch of rows: the whole stack of layers in one call (decode_stack.cpp),
    and layer by layer with the fused attention (RoPE + cache write + softmax·V), native RMSNorm and
    SiLU·mul inside the down projection. Padded: 3 left-padded rows of 9, 6 and 1 tokens; the stack
    attends each row from its first token (per-row starts 0, 3, 8), the layer-by-layer path masks."""
    from qwenlab.model.qwen2 import RMSNorm
    from qwenlab.quant.fused import NativeRMSNorm

    stacked, layered, plain = (load_q(quantized_dirs[bits]) for _ in range(3))
    assert stacked.decode_stack is not None
    assert all(layer.self_attn.native_decode and layer.mlp.silu_mul_in_down for layer in layered.model.layers)
    assert isinstance(stacked.model.norm, NativeRMSNorm)
    layered.decode_stack = plain.decode_stack = None
    for layer in plain.model.layers:
        layer.self_attn.native_decode = layer.mlp.silu_mul_in_down = False
        layer.input_layernorm.__class__ = layer.post_attention_layernorm.__class__ = RMSNorm  # PyTorch's RMSNorm too
    plain.model.norm.__class__ = RMSNorm
    taken = {"stack": [], "attention": []}

    def counted(kind, fn):
        def call(*args):
            out = fn(*args)
            taken[kind].append(out is not None)
            return out
        return call

    stack = stacked.decode_stack
    stacked.decode_stack = CountedCalls(stack, lambda args, out: taken["stack"].append(out is not None))
    monkeypatch.setattr(native, "decode_attention", counted("attention", native.decode_attention))  # layered only
    models = (stacked, layered, plain)
    prompt = tokens(shape=(3, 9), seed=2)
    valid = torch.ones(3, 9, dtype=torch.bool)
    if padded:
        valid[1, :3] = valid[2, :8] = False
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    caches = [m.new_cache(3, 24) for m in models]
    with torch.inference_mode():
        outs = [m(prompt, positions=positions, cache=c, valid=valid) for m, c in zip(models, caches)]
        for step in range(8):
            for out in outs[:2]:
                torch.testing.assert_close(out[valid[:, -outs[2].shape[1]:]], outs[2][valid[:, -outs[2].shape[1]:]],
                                           atol=1e-4, rtol=1e-4)
            nxt = outs[2][:, -1:].argmax(-1)
            positions = positions[:, -1:] + 1
            outs = [m(nxt, positions=positions, cache=c) for m, c in zip(models, caches)]
        if padded:  # starts outside [0, pos] are refused before any layer runs
            x = torch.zeros(3, 1, stacked.config.hidden_size)
            cos, sin = stacked.rotary(positions, torch.float32)
            for bad in ([0, 3, -1], [0, 3, 18]):
                with pytest.raises(native.KernelArgumentError, match="native decode_stack"):
                    stack(x, cos, sin, caches[0], caches[0].slot_buffers(), 17, torch.tensor(bad))
        for cache in caches[:2]:
            for k_fused, k_plain in zip(cache.keys, caches[2].keys):
                torch.testing.assert_close(k_fused[:, :, :17], k_plain[:, :, :17], atol=1e-5, rtol=1e-5)
            for v_fused, v_plain in zip(cache.values, caches[2].values):
                torch.testing.assert_close(v_fused[:, :, :17], v_plain[:, :, :17], atol=1e-5, rtol=1e-5)
    # every decode step took the fused paths (the prefill, 9 tokens per row, is not a decode step); padded
    # rows take the stack with their starts, and the per-layer attention's PyTorch masked path
    assert taken["stack"] == [True] * 8
    if padded:
        assert taken["attention"] == []
    else:
        assert len(taken["attention"]) == 8 * len(layered.model.layers) and all(taken["attention"])
