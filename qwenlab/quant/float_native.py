"""bf16 and fp32 weights on qwenlab's native decode stack: the float model's module swaps.

A decode step reads every weight once, so its speed is the memory bandwidth over the weights' bytes.
PyTorch's bf16 path reached about half of that bound on the 0.5B shape (issue 23); the native kernel
(float_matmul.cpp) streams the weights as stored and the decode stack runs every layer in one call.

- NativeLinear: nn.Linear with the same parameters and names (LoRA wraps it, merges write into it),
  whose forward runs the native kernel for a few rows (decode) and oneDNN (PyTorch) for more (prefill,
  where the matmul is compute-bound and oneDNN's blocked kernels win). The weight stays bf16 or fp32.
- Activations, norms, biases and the KV cache are fp32: the kernel reads and writes fp32, as the
  quantized models do. A bf16 model therefore rounds less than PyTorch's all-bf16 model (its x is
  rounded to bf16 only inside the vdpbf16ps matmul).
- NativeFloatQwen2ForCausalLM: a decode step (one token per row, a plain KV cache) runs all decoder
  layers in one native call (quant/native.DecodeStack); PyTorch's own ops run single-threaded meanwhile
  (native.torch_single_threaded), so a busy core cannot stall an OpenMP barrier ~100 times per token.
  Prefill runs on PyTorch's threads, as many as other processes left free (torch_threads_on_free_cores:
  with another process on one of two cores, 2 OpenMP threads ran 150x slower than 1). Adapters attached
  for serve's per-row use ride along (the stack adds each row's own delta); anything the stack does not
  take (padding after a row's tokens, a cache without slot buffers, adapters outside serve) runs the
  layers one by one, each linear still on NativeLinear.
"""

from __future__ import annotations

import torch
from torch import nn

from qwenlab.model.linear import ONEDNN, Linear, fast_linear
from qwenlab.model.qwen2 import MLP, Attention, Qwen2ForCausalLM
from qwenlab import native as kernels
from qwenlab.quant import native
from qwenlab.quant.fused import attend_on_cache

NATIVE_MAX_ROWS = 16  # rows up to which the native kernel beats oneDNN (it streams; oneDNN blocks for reuse)
FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class NativeLinear(Linear):
    """nn.Linear whose bf16/fp32 weight is multiplied by the native kernel for up to NATIVE_MAX_ROWS rows.
    The bias is fp32; the output is fp32 for an fp32 input (else the input's dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = x.numel() // max(x.shape[-1], 1)
        if (rows <= NATIVE_MAX_ROWS and kernels.available() and w.dtype in native.FLOAT_BITS and w.is_contiguous()
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            y = native.linear_float(x, w, self.bias)
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(w.dtype)
        return fast_linear(x.to(w.dtype), w, bias).to(x.dtype)


ONEDNN_POINTWISE = ONEDNN and hasattr(torch.ops.mkldnn._linear_pointwise, "binary")  # and its binary post-ops


class NativeFloatMLP(MLP):
    """The MLP (same modules and names) whose bf16 prefill keeps its inner activations in bf16, as PyTorch's
    bf16 model does, with SiLU and the gate x up product as oneDNN post-ops of the two matmuls.

    Layer by layer, each NativeLinear takes fp32 in and gives fp32 out: at prefill that cast [T, 4864]
    outputs twice and ran SiLU and the product in fp32 over them, 240 of 856 ms of a 512-token prefill
    of the 0.5B shape in bf16 (torch profiler, AMD host), beside 440 ms of matmuls. Here the input is
    cast once and only the output comes back to fp32. Decode (a few rows), fp32 weights, adapters
    wrapped around a linear and anything that needs a gradient take the plain MLP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        rows = x.numel() // max(x.shape[-1], 1)
        if not (rows > NATIVE_MAX_ROWS and ONEDNN_POINTWISE and not torch.is_grad_enabled()
                and type(gate) is NativeLinear and type(up) is NativeLinear and type(down) is NativeLinear
                and gate.weight.dtype == up.weight.dtype == down.weight.dtype == torch.bfloat16):
            return super().forward(x)
        xb = x.reshape(rows, x.shape[-1]).to(torch.bfloat16).contiguous()
        silu_gate = torch.ops.mkldnn._linear_pointwise(xb, gate.weight, None, "swish", [], "")
        hidden = torch.ops.mkldnn._linear_pointwise.binary(xb, silu_gate, up.weight, None, "mul")
        return fast_linear(hidden, down.weight).to(x.dtype).view(*x.shape[:-1], down.out_features)


class NativeFloatAttention(Attention):
    """The model core's attention (same modules and names) whose prompt attention is one native call
    (quant/fused.attend_on_cache) where it applies."""

    def attend_projected(self, q, k, v, cos, sin, mask, cache, layer, start):
        if q.shape[1] > 1:
            out = attend_on_cache(q, k, v, cos, sin, cache, layer, start, self.num_heads)
            if out is not None:
                return self.o_proj(out)
        return super().attend_projected(q, k, v, cos, sin, mask, cache, layer, start)


class Float32Embedding(nn.Embedding):
    """nn.Embedding (same weight and name) whose lookups come out in fp32, the activations' dtype."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens).float()


class NativeFloatQwen2ForCausalLM(Qwen2ForCausalLM):
    """The model core with NativeLinear layers; see the module docstring."""

    _stack: native.DecodeStack | None = None

    def forward(self, tokens, *args, **kwargs):
        if tokens.shape[1] != 1:  # prefill: oneDNN on PyTorch's threads, as many as other processes left free
            with kernels.torch_threads_on_free_cores():
                return super().forward(tokens, *args, **kwargs)
        with kernels.torch_single_threaded():
            return super().forward(tokens, *args, **kwargs)

    def run_layers(self, x, cos, sin, mask, cache, start):
        stack = self.decode_stack() if x.shape[1] == 1 and cache is not None else None
        stacked = native.run_decode_stack(self, stack, x, cos, sin, mask, cache, start)
        return stacked if stacked is not None else super().run_layers(x, cos, sin, mask, cache, start)

    def decode_stack(self) -> native.DecodeStack | None:
        """The one-call decode stack over the current layers, rebuilt when a layer or a weight's memory has
        changed since it was built (an adapter attached, detached or merged); None where a layer's linear is
        not a NativeLinear (an adapter's wrapper around one is fine: the stack adds its rows' deltas)."""
        if self._stack is not None and self._stack.matches():
            return self._stack
        self._stack = None
        for layer in self.model.layers:
            for owner, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                 (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
                for name in names:
                    module = owner._modules[name]
                    base = native.unwrapped(module)
                    if type(base) is not NativeLinear or not base.weight.is_contiguous() \
                            or base.weight.dtype not in native.FLOAT_BITS:
                        return None
        if not kernels.available():
            return None
        self._stack = native.DecodeStack(self.model.layers, self.config)
        return self._stack


def native_float_applies(dtype: str | torch.dtype) -> bool:
    """Whether `qwenlab.load` takes a float model in `dtype` onto the native stack here."""
    dtype = FLOAT_DTYPES.get(dtype, dtype)
    return dtype in native.FLOAT_BITS and kernels.available()


def load_native_float_model(checkpoint, dtype: str | torch.dtype) -> NativeFloatQwen2ForCausalLM:
    """A float checkpoint with its linear (and embedding) weights in `dtype` (bf16 or fp32) and everything
    else in fp32, on NativeLinear layers; the tied LM head multiplies by the embedding's own weight."""
    dtype = FLOAT_DTYPES.get(dtype, dtype)
    checkpoint.validate()  # every tensor's shape and dtype against config.json before anything is read
    config = checkpoint.config
    with torch.device("meta"):
        model = NativeFloatQwen2ForCausalLM(config)
        for layer in model.model.layers:
            layer.mlp = NativeFloatMLP(config)
            layer.self_attn = NativeFloatAttention(config)
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, NativeLinear(child.in_features, child.out_features, child.bias is not None))
        model.model.embed_tokens = Float32Embedding(config.vocab_size, config.hidden_size)
    state = {}
    for name, meta in model.state_dict().items():
        is_weight_matrix = name.endswith(".weight") and meta.dim() == 2  # linears and the embedding
        state[name] = checkpoint.get(name).to(dtype if is_weight_matrix else torch.float32).contiguous()
    model.load_state_dict(state, assign=True, strict=True)
    if model.lm_head is None:  # tied: a head module over the embedding's own weight (no copy)
        model.lm_head = NativeLinear(config.hidden_size, config.vocab_size, bias=False, device="meta")
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary = type(model.rotary)(config.head_dim, config.rope_theta)  # buffers built on meta: rebuilt
    return model.eval().requires_grad_(False)
