"""Quantized folder -> a Qwen2ForCausalLM whose Linears are Int8WeightLinear / Int4WeightLinear.

The model core's `load_model` dispatches here when config.json has a "quantization" section.
q/k/v and gate/up are fused into one layer each at load time (rows concatenate exactly, since
every format is row-wise), so a decode step makes 4 matmul calls per layer instead of 7.
Tensors are read with plain file reads, in row chunks for the big ones (stored.py), and freed
heap memory is handed back to the OS at the end, so resident memory is the model's own size.
"""

from __future__ import annotations


import torch

from qwenlab.checkpoint.names import layer_prefix
from qwenlab.errors import QwenlabError
from qwenlab.model.qwen2 import Qwen2ForCausalLM, RMSNorm
from qwenlab.quant import native
from qwenlab.quant.memory import release_free_memory
from qwenlab.quant.linear import LINEAR_CLASSES, FloatEmbedding, FloatHead, QuantizedEmbedding
from qwenlab.quant.quantize import FORMAT, FORMAT_VERSION, HEAD_BITS
from qwenlab.quant.stored import StoredTensors

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


class QuantizedQwen2ForCausalLM(Qwen2ForCausalLM):
    """The model core with quantized layers; PyTorch's ops run single-threaded inside a forward
    while the native kernel uses every thread (see native.torch_single_threaded)."""

    def forward(self, *args, **kwargs):
        if not self.native:
            return super().forward(*args, **kwargs)
        with native.torch_single_threaded():
            return super().forward(*args, **kwargs)


def read_section(checkpoint) -> dict:
    section = checkpoint.config.extra.get("quantization")
    where = f"{checkpoint.path / 'config.json'}: quantization"
    if not isinstance(section, dict) or section.get("format") != FORMAT:
        found = section.get("format") if isinstance(section, dict) else section
        raise QwenlabError(f"{where}: format {found!r} is not qwenlab's; expected '{FORMAT}'")
    if section.get("version") != FORMAT_VERSION:
        raise QwenlabError(f"{where}: format version {section.get('version')} is not supported "
                           f"(expected {FORMAT_VERSION})")
    if section.get("bits") not in (8, 4) or section.get("head_bits") not in HEAD_BITS:
        raise QwenlabError(f"{where}: 'bits' must be 8 or 4 and 'head_bits' 16, 8 or 4")
    if section.get("group_size") not in (32, 64, 128):
        raise QwenlabError(f"{where}: 'group_size' must be 32, 64 or 128")
    return section


def expected_modules(config, head_bits: int) -> dict[str, tuple[int, int]]:
    """Every quantized module and its (out, in) shape."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * config.head_dim
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
              "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    modules = {f"{layer_prefix(n)}{'self_attn' if m in ATTENTION else 'mlp'}.{m}": s
               for n in range(config.num_hidden_layers) for m, s in shapes.items()}
    if head_bits < 16:
        modules["model.embed_tokens"] = (config.vocab_size, h)
        if not config.tie_word_embeddings:
            modules["lm_head"] = (config.vocab_size, h)
    return modules


def validate_quantized(checkpoint, stored: StoredTensors, section: dict) -> None:
    """The quantized counterpart of Checkpoint.validate: every tensor present, with consistent shapes."""
    config, gs = checkpoint.config, section["group_size"]
    for module, (n, k) in expected_modules(config, section["head_bits"]).items():
        bits = section["bits"] if "layers" in module else section["head_bits"]
        expected = {"qweight": (n, k if bits == 8 else k // 2), "scales": (n, k // gs)}
        if bits == 4:
            expected["zeros"] = (n, k // gs)
        for suffix, shape in expected.items():
            name = f"{module}.{suffix}"
            if name not in stored:
                raise QwenlabError(f"{checkpoint.path}: missing tensor '{name}'")
            if stored.shape(name) != shape:
                raise QwenlabError(f"{checkpoint.path}: tensor '{name}' has shape {list(stored.shape(name))}, "
                                   f"expected {list(shape)} from config.json and the quantization section")


def _reader(stored: StoredTensors, module: str, bits: int):
    names = ("qweight", "scales") + (("zeros",) if bits == 4 else ())
    return lambda start, stop: {n: stored.read(f"{module}.{n}", start, stop) for n in names}


def build_linear(stored: StoredTensors, modules: list[str], bits: int, group_size: int, backend: str | None):
    """One quantized layer from one module, or several with their rows concatenated (fusion)."""
    cls = LINEAR_CLASSES[bits]
    biases = [stored.read(f"{m}.bias") if f"{m}.bias" in stored else None for m in modules]
    rows = [stored.shape(f"{m}.scales")[0] for m in modules]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.float() if b is not None else torch.zeros(r) for b, r in zip(biases, rows)])
    k = stored.shape(f"{modules[0]}.scales")[1] * group_size
    if len(modules) == 1:
        return cls(_reader(stored, modules[0], bits), rows[0], k, group_size, bias, backend)
    parts = [_reader(stored, m, bits)(0, r) for m, r in zip(modules, rows)]
    whole = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    return cls.from_tensors(group_size, bias, backend, **whole)


def load_quantized_model(checkpoint, backend: str | None = None, fuse: bool = True) -> Qwen2ForCausalLM:
    """Build the model from a quantized folder. backend: None/'auto', 'native', 'aten' or 'reference'."""
    section = read_section(checkpoint)
    bits, group_size, head_bits = section["bits"], section["group_size"], section["head_bits"]
    config = checkpoint.config
    stored = StoredTensors(checkpoint.path)
    validate_quantized(checkpoint, stored, section)
    with torch.device("meta"):
        model = QuantizedQwen2ForCausalLM(config)
    dtype = torch.float32  # activations: the native kernel reads and writes fp32
    build = lambda *modules: build_linear(stored, list(modules), bits, group_size, backend)
    norm = lambda name: torch.nn.Parameter(stored.read(name).to(dtype), requires_grad=False)
    for i, layer in enumerate(model.model.layers):
        a, m = f"{layer_prefix(i)}self_attn.", f"{layer_prefix(i)}mlp."
        attn, mlp = layer.self_attn, layer.mlp
        if fuse:
            attn.qkv_proj = build(a + "q_proj", a + "k_proj", a + "v_proj")
            attn.q_proj = attn.k_proj = attn.v_proj = None
            mlp.gate_up_proj = build(m + "gate_proj", m + "up_proj")
            mlp.gate_proj = mlp.up_proj = None
        else:
            attn.q_proj, attn.k_proj, attn.v_proj = build(a + "q_proj"), build(a + "k_proj"), build(a + "v_proj")
            mlp.gate_proj, mlp.up_proj = build(m + "gate_proj"), build(m + "up_proj")
        attn.o_proj, mlp.down_proj = build(a + "o_proj"), build(m + "down_proj")
        layer.input_layernorm.weight = norm(f"{layer_prefix(i)}input_layernorm.weight")
        layer.post_attention_layernorm.weight = norm(f"{layer_prefix(i)}post_attention_layernorm.weight")
        release_free_memory()  # the repacking buffers of this layer: freed heap pages would add up to the peak
    model.model.norm.weight = norm("model.norm.weight")
    _load_embedding_and_head(model, stored, head_bits, group_size, backend, dtype)
    model.rotary = type(model.rotary)(config.head_dim, config.rope_theta)
    model.quantization = dict(section)
    model.native = any(getattr(m, "backend", None) == "native" for m in model.modules())
    if fuse and model.native:  # one fused native call per layer for a decode step's attention
        for layer in model.model.layers:
            layer.self_attn.decode_kernel = native.decode_attention
            if layer.mlp.down_proj.backend == "native":
                layer.mlp.down_of_silu_mul = layer.mlp.down_proj.forward_silu_mul
    layer_linears = lambda layer: (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                                   layer.mlp.down_proj)
    if fuse and all(getattr(m, "backend", None) == "native" for layer in model.model.layers for m in layer_linears(layer)):
        model.decode_stack = native.DecodeStack(model.model.layers, config)  # a decode step's layers in one call
    if model.native:  # RMSNorm in one native call instead of torch's ~10-op CPU decomposition
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.kernel = native.rms_norm
    release_free_memory()
    return model.eval().requires_grad_(False)


def _load_embedding_and_head(model, stored: StoredTensors, head_bits: int, group_size: int, backend, dtype) -> None:
    tied = model.config.tie_word_embeddings
    if head_bits == 16:
        table = stored.read("model.embed_tokens.weight").to(torch.bfloat16)
        model.model.embed_tokens = FloatEmbedding(table, dtype)
        model.lm_head = FloatHead(table if tied else stored.read("lm_head.weight").to(torch.bfloat16))
        return
    build = lambda module: build_linear(stored, [module], head_bits, group_size, backend)
    table = build("model.embed_tokens")
    model.model.embed_tokens = QuantizedEmbedding(table, dtype)
    model.lm_head = table if tied else build("lm_head")  # tied: the head multiplies by the same table
