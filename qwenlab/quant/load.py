"""Quantized folder -> a Qwen2ForCausalLM whose Linears are Int8WeightLinear / Int4WeightLinear.

The model core's `load_model` dispatches here when config.json has a "quantization" section.
q/k/v and gate/up are fused into one layer each at load time (rows concatenate exactly, since
every format is row-wise), so a decode step makes 4 matmul calls per layer instead of 7.
Tensors are read with plain file reads, in row chunks for the big ones (stored.py), and freed
heap memory is handed back to the OS at the end, so resident memory is the model's own size.
"""

from __future__ import annotations

import torch

from qwenlab.checkpoint.names import expected_tensor_shapes, layer_prefix
from qwenlab.errors import QwenlabError
from qwenlab.model.qwen2 import Qwen2ForCausalLM, RMSNorm
from qwenlab.native import torch_single_threaded, torch_threads_on_free_cores
from qwenlab.quant import native
from qwenlab.model.memory import keep_freed_memory, release_free_memory
from qwenlab.quant.linear import LINEAR_CLASSES, FloatEmbedding, FloatHead, QuantizedEmbedding
from qwenlab.quant.formats import GROUP_SIZES
from qwenlab.quant.fused import FusedAttention, FusedMLP, NativeRMSNorm
from qwenlab.quant.quantize import FORMAT, FORMAT_VERSION, HEAD_BITS, head_names, is_linear_weight
from qwenlab.quant.stored import StoredTensors


class QuantizedQwen2ForCausalLM(Qwen2ForCausalLM):
    """The model core with quantized layers; PyTorch's ops run single-threaded inside a forward
    while the native kernel uses every thread (see native.torch_single_threaded). Where every layer
    is fused and native, a decode step runs all decoder layers in one native call (decode_stack)."""

    native = False
    decode_stack: native.DecodeStack | None = None

    def forward(self, tokens, *args, **kwargs):
        if not self.native:
            return super().forward(tokens, *args, **kwargs)
        if tokens.numel() >= native.BF16_PREFILL_MIN_ROWS and native.bf16_prefill_runs():
            # A long prompt's matmuls run on oneDNN (AMX), and so do its attention and norms: PyTorch gets the
            # threads other processes left free, as the float models' prefill does.
            with torch_threads_on_free_cores():
                return super().forward(tokens, *args, **kwargs)
        with torch_single_threaded():
            return super().forward(tokens, *args, **kwargs)

    def run_layers(self, x, cos, sin, mask, cache, start):
        stack = self.decode_stack
        if stack is not None and not stack.matches():
            stack = self.decode_stack = native.DecodeStack(self.model.layers, self.config)  # an adapter swap
        stacked = native.run_decode_stack(self, stack, x, cos, sin, mask, cache, start)
        return stacked if stacked is not None else super().run_layers(x, cos, sin, mask, cache, start)


# The largest block a quantized model's process serves from the heap (model.memory.keep_freed_memory): a 2048-token
# prompt's gate|up output on the 1.5B shape is 147 MiB.
PREFILL_HEAP_BLOCK = 256 << 20

# Stored dtypes (safetensors names) of the format quantize.py writes: anything else is refused before a
# kernel sees it (a float32 "qweight" would be packed as nonsense, a wrong width read out of bounds).
QWEIGHT_DTYPES = {8: "I8", 4: "U8"}
GROUP_PARAM_DTYPE = "F16"  # scales and zeros
SMALL_DTYPE = "F32"  # norms and biases, kept exact
FLOAT_HEAD_DTYPE = "BF16"  # head_bits 16: the embedding (and an untied head) kept in bf16


def _section_int(section: dict, key: str, allowed: tuple[int, ...], where: str) -> int:
    value = section.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value not in allowed:
        raise QwenlabError(f"{where}: '{key}' must be one of {', '.join(map(str, allowed))}, got {value!r}")
    return value


def read_section(checkpoint) -> dict:
    """The quantization section of config.json, every field the loader uses checked against config.json."""
    section = checkpoint.config.extra.get("quantization")
    where = f"{checkpoint.path / 'config.json'}: quantization"
    if not isinstance(section, dict) or section.get("format") != FORMAT:
        found = section.get("format") if isinstance(section, dict) else section
        raise QwenlabError(f"{where}: format {found!r} is not qwenlab's; expected '{FORMAT}'")
    if section.get("version") != FORMAT_VERSION:
        raise QwenlabError(f"{where}: format version {section.get('version')} is not supported "
                           f"(expected {FORMAT_VERSION})")
    _section_int(section, "bits", tuple(QWEIGHT_DTYPES), where)
    _section_int(section, "head_bits", HEAD_BITS, where)
    group_size = _section_int(section, "group_size", GROUP_SIZES, where)
    config = checkpoint.config
    for field in ("hidden_size", "intermediate_size"):  # the input widths of every quantized layer
        if getattr(config, field) % group_size:
            raise QwenlabError(f"{where}: 'group_size' {group_size} does not divide {field} "
                               f"{getattr(config, field)} from config.json")
    return section


def expected_quantized_tensors(config, section: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor of a quantized folder -> (shape, safetensors dtype), from config.json and its
    quantization section: the float layout (names.py) with each quantized weight replaced by its
    stored parts, norms and biases in fp32."""
    bits, group_size, head_bits = section["bits"], section["group_size"], section["head_bits"]
    heads = head_names(config)
    expected = {}
    for name, shape in expected_tensor_shapes(config).items():
        width = bits if is_linear_weight(name) else head_bits if name in heads else None
        if width is None or width == 16:
            expected[name] = (shape, FLOAT_HEAD_DTYPE if name in heads else SMALL_DTYPE)
            continue
        module, (n, k) = name[: -len(".weight")], shape
        expected[f"{module}.qweight"] = ((n, k if width == 8 else k // 2), QWEIGHT_DTYPES[width])
        expected[f"{module}.scales"] = ((n, k // group_size), GROUP_PARAM_DTYPE)
        if width == 4:
            expected[f"{module}.zeros"] = ((n, k // group_size), GROUP_PARAM_DTYPE)
    return expected


def validate_quantized(checkpoint, stored: StoredTensors, section: dict) -> None:
    """The quantized counterpart of Checkpoint.validate, from the headers alone and before any tensor is
    read: every tensor present, none unexpected, each with the shape and dtype config.json implies. The
    kernels trust these sizes (a norm of shape [1] made them read past its end)."""
    expected = expected_quantized_tensors(checkpoint.config, section)
    missing = [name for name in expected if name not in stored]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise QwenlabError(f"{checkpoint.path}: missing tensor '{missing[0]}'{more}")
    unexpected = sorted(set(stored.names()) - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise QwenlabError(f"{stored.file(unexpected[0])}: unexpected tensor '{unexpected[0]}'{more}")
    for name, (shape, dtype) in expected.items():
        if stored.shape(name) != shape:
            raise QwenlabError(f"{stored.file(name)}: tensor '{name}' has shape {list(stored.shape(name))}, "
                               f"expected {list(shape)} from config.json and its quantization section")
        if stored.dtype_name(name) != dtype:
            raise QwenlabError(f"{stored.file(name)}: tensor '{name}' has dtype {stored.dtype_name(name)}, "
                               f"expected {dtype}")


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

    def norm(norm_class: type[RMSNorm], name: str) -> RMSNorm:
        module = norm_class(config.hidden_size, config.rms_norm_eps)
        module.weight = torch.nn.Parameter(stored.read(name).to(dtype), requires_grad=False)
        return module

    is_native = lambda module: getattr(module, "backend", None) == "native"
    for i, layer in enumerate(model.model.layers):
        a, m = f"{layer_prefix(i)}self_attn.", f"{layer_prefix(i)}mlp."
        attn, mlp = layer.self_attn, layer.mlp
        if fuse:  # module swaps: the model core's Attention and MLP stay plain PyTorch
            qkv, down = build(a + "q_proj", a + "k_proj", a + "v_proj"), build(m + "down_proj")
            layer.self_attn = FusedAttention(config, qkv, build(a + "o_proj"), native_decode=is_native(qkv))
            layer.mlp = FusedMLP(build(m + "gate_proj", m + "up_proj"), down, silu_mul_in_down=is_native(down))
        else:
            attn.q_proj, attn.k_proj, attn.v_proj = build(a + "q_proj"), build(a + "k_proj"), build(a + "v_proj")
            mlp.gate_proj, mlp.up_proj = build(m + "gate_proj"), build(m + "up_proj")
            attn.o_proj, mlp.down_proj = build(a + "o_proj"), build(m + "down_proj")
        release_free_memory()  # the repacking buffers of this layer: freed heap pages would add up to the peak
    _load_embedding_and_head(model, stored, head_bits, group_size, backend, dtype)
    model.native = any(is_native(module) for module in model.modules())
    if model.native:  # a prompt's outputs (36 MiB per gate|up at 512 tokens on the 1.5B shape) reused, not re-faulted
        keep_freed_memory(PREFILL_HEAP_BLOCK)
    # RMSNorm in one native call instead of torch's ~10-op CPU decomposition, where the kernels run
    norm_class = NativeRMSNorm if model.native else RMSNorm
    for i, layer in enumerate(model.model.layers):
        layer.input_layernorm = norm(norm_class, f"{layer_prefix(i)}input_layernorm.weight")
        layer.post_attention_layernorm = norm(norm_class, f"{layer_prefix(i)}post_attention_layernorm.weight")
    model.model.norm = norm(norm_class, "model.norm.weight")
    model.rotary = type(model.rotary)(config.head_dim, config.rope_theta)
    model.quantization = dict(section)
    layer_linears = lambda layer: [m for owner in (layer.self_attn, layer.mlp) for name, m in owner.named_children()
                                   if name.endswith("_proj")]
    if all(is_native(m) for layer in model.model.layers for m in layer_linears(layer)):
        model.decode_stack = native.DecodeStack(model.model.layers, config)  # a decode step's layers in one call
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
