"""The kernels of the weight formats: the int8/int4 matmul (qmatmul.cpp), the bf16/fp32 matmul
(float_matmul.cpp), the one-call decode stack for both (decode_stack.cpp), and the packing of stored
int8/int4 tensors into their layout. They are built into qwenlab's
one native library (qwenlab/native/: build, thread policy, status codes; `available()` says whether it runs).

Why our own: PyTorch's CPU kernels are per-channel for int8 (`_weight_int8pack_mm`) and dequantize
int4 to floating point before multiplying (`_weight_int4pack_mm_for_cpu`). This kernel quantizes
the activations to int8 per 32 values (as llama.cpp does) and multiplies with VNNI integer dot
products, group-wise for both widths; benchmarks/speed_bench.py shows what each buys.
"""

from __future__ import annotations

import ctypes
import os
import threading

import torch

from qwenlab.native import KernelArgumentError, buffer, checked, kernel_threads, library, lora_bits, optional_buffer
from qwenlab.native.ops import row_starts
from qwenlab.model.kv_cache import leading_padding

ROW_BLOCK = 16  # rows per VNNI vector (the int32 lanes of one 512-bit register)
ROW_GROUP = 64  # 4 row blocks interleaved per 32-column block: one sequential stream per thread
ACT_BLOCK = 32  # activations are quantized in blocks of 32 values


def supports(out_features: int, in_features: int, group_size: int) -> bool:
    return in_features % ACT_BLOCK == 0 and group_size % ACT_BLOCK == 0 and in_features % group_size == 0


def padded_rows(n: int) -> int:
    return -(-n // ROW_GROUP) * ROW_GROUP


def pad_rows(t: torch.Tensor, fill: int = 0) -> torch.Tensor:
    extra = padded_rows(t.shape[0]) - t.shape[0]
    return t if extra == 0 else torch.cat((t, t.new_full((extra, *t.shape[1:]), fill)))


# ---- packing (stored format -> kernel layout), pure tensor reshapes ------------------------------
# Rows r = 64 * group + 16 * block + lane; columns k = 32 * kb + 4 * quad + i (int8), or
# k = 32 * kb + 8 * octet + 4 * half + i (int4). Within a row group: [kb][quad or octet][block][lane][i].
def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> uint8 [N/64, K/32, 8, 4, 16, 4] holding q + 128 (VNNI multiplies u8 by s8)."""
    u = pad_rows(q.to(torch.int8).contiguous()).view(torch.uint8) ^ 0x80  # q + 128 as u8, no int16 copy
    n, k = u.shape
    words = u.view(torch.int32).view(n // ROW_GROUP, 4, ROW_BLOCK, k // ACT_BLOCK, 8)  # 4 columns per word
    return words.permute(0, 3, 4, 1, 2).contiguous().view(torch.uint8).view(
        n // ROW_GROUP, k // ACT_BLOCK, 8, 4, ROW_BLOCK, 4)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] in 0..15 -> uint8 [N/64, K/32, 4, 4, 16, 4]: per octet of k, low nibbles hold
    k..k+3 and high nibbles k+4..k+7."""
    v = pad_rows(q.to(torch.uint8).contiguous())
    n, k = v.shape
    # 4 nibbles at a time: each int32 word holds q[k..k+3] (values < 16, so no carry between bytes)
    words = v.view(torch.int32).view(n // ROW_GROUP, 4, ROW_BLOCK, k // ACT_BLOCK, 4, 2)
    packed = words[..., 0] | (words[..., 1] << 4)  # [groups, block, lane, k/32, octet]
    return packed.permute(0, 3, 4, 1, 2).contiguous().view(torch.uint8).view(
        n // ROW_GROUP, k // ACT_BLOCK, 4, 4, ROW_BLOCK, 4)


def pack_group_params(p: torch.Tensor) -> torch.Tensor:
    """[N, G] -> fp16 [N/64, G, 4, 16]."""
    p = pad_rows(p.to(torch.float16))
    n, g = p.shape
    return p.view(n // ROW_GROUP, 4, ROW_BLOCK, g).permute(0, 3, 1, 2).contiguous()


def _row_index(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return rows // ROW_GROUP, (rows // ROW_BLOCK) % 4, rows % ROW_BLOCK


def gather_rows_int8(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """q rows [T, K] for row indices `rows` [T], straight from the packed layout (embedding lookup)."""
    group, block, lane = _row_index(rows)
    u = packed[group, :, :, block, lane]  # [T, K/32, 8, 4]
    return (u.reshape(rows.shape[0], -1) ^ 0x80).view(torch.int8)


def gather_rows_int4(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    group, block, lane = _row_index(rows)
    v = packed[group, :, :, block, lane]  # [T, K/32, 4, 4]
    return torch.stack((v & 0x0F, v >> 4), dim=-2).reshape(rows.shape[0], -1)


def gather_group_params(p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    group, block, lane = _row_index(rows)
    return p[group, :, block, lane]  # [T, G]


# ---- the matmuls --------------------------------------------------------------------------------
def _gemm_input(x: torch.Tensor, k: int, silu_mul: bool) -> tuple[torch.Tensor, int]:
    """x as fp32 contiguous rows, and the kernel's act flag (see qmatmul.cpp)."""
    width = 2 * k if silu_mul else k
    if x.shape[-1] != width:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {width}"
                         + (" (gate|up for SiLU-mul)" if silu_mul else ""))
    x2 = x.reshape(-1, width)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    return x2, int(silu_mul)


class PackedLinear:
    """A quantized layer's kernel buffers (packed weight, scales, int4 mins, padded bias), checked once
    (dtype, contiguity) and kept with their addresses and lengths, so that a call passes them as they
    are: no per-call checks in Python, while the kernel still checks every length against the sizes.
    Holds the tensors, so the addresses stay valid as long as this object lives."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                 bias: torch.Tensor | None, group_size: int):
        self.bits = 8 if mins is None else 4
        self.kernel = f"gemm_int{self.bits}"
        self.tensors = (packed, scales, mins, bias)
        self.group_size = group_size
        if packed.dim() != 6:
            raise KernelArgumentError(f"native {self.kernel}: the packed weight must be 6-dimensional (pack_int8/"
                                      f"pack_int4), got shape {list(packed.shape)}")
        self.k, self.rows = packed.shape[1] * ACT_BLOCK, packed.shape[0] * ROW_GROUP
        buffers = [buffer(packed, torch.uint8, "the packed weight", self.kernel),
                   buffer(scales, torch.float16, "the scales", self.kernel)]
        if mins is not None:
            buffers.append(buffer(mins, torch.float16, "the mins", self.kernel))
        weights = [value for buffer in buffers for value in buffer]
        bias_args = optional_buffer(bias, torch.float32, "the bias", self.kernel)
        self.args = (*weights, self.rows, group_size, *bias_args)  # as qwenlab_gemm_int* takes them after K
        # as qwenlab_dequant_bf16 takes them: bits, w, w_len, s, s_len, mz, mz_len, N, K, gs
        self.dequant_args = (self.bits, *weights[:4], *(weights[4:] if mins is not None else (None, 0)),
                             self.rows, self.k, group_size)

    def __deepcopy__(self, memo):  # a copy points into the copied tensors, never at the originals
        import copy

        return PackedLinear(*(copy.deepcopy(t, memo) for t in self.tensors), self.group_size)

    def __call__(self, x: torch.Tensor, n: int, silu_mul: bool = False) -> torch.Tensor:
        """x [..., K] (any float dtype) -> fp32 [..., n]; silu_mul: x is a fused gate|up output [..., 2K]
        and the layer multiplies silu(gate) * up."""
        x2, act = _gemm_input(x, self.k, silu_mul)
        if x2.shape[0] >= BF16_PREFILL_MIN_ROWS and self.k * self.rows <= BF16_PREFILL_MAX_WEIGHT \
                and bf16_prefill_runs():
            return self._bf16_matmul(x2, n, silu_mul).view(*x.shape[:-1], n)
        y = torch.empty(x2.shape[0], self.rows)
        gemm = library().gemm_int8 if self.bits == 8 else library().gemm_int4
        checked(gemm(x2.data_ptr(), x2.numel(), x2.shape[0], self.k, *self.args, y.data_ptr(), y.numel(),
                      kernel_threads(), act), self.kernel)
        return (y if self.rows == n else y[:, :n]).view(*x.shape[:-1], n)

    def dequantized_bf16_t(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight, transposed, in bf16: [K, rows] (rows: the padded output rows), written into `out` if given."""
        wt = torch.empty(self.k, self.rows, dtype=torch.bfloat16) if out is None else out
        if wt.dtype != torch.bfloat16 or tuple(wt.shape) != (self.k, self.rows) or not wt.is_contiguous():
            raise KernelArgumentError(f"native dequant_bf16: out must be a contiguous bf16 [{self.k}, {self.rows}]")
        checked(library().dequant_bf16(*self.dequant_args, wt.data_ptr(), wt.numel(), kernel_threads()),
                "dequant_bf16")
        return wt

    def _bf16_matmul(self, x2: torch.Tensor, n: int, silu_mul: bool) -> torch.Tensor:
        """Prefill through oneDNN's bf16 matmul (AMX): x rounded to bf16, the weight dequantized into a scratch
        buffer shared by every layer of this thread, fp32 out. See BF16_PREFILL_MIN_ROWS."""
        if silu_mul:
            gate, up = x2.split(self.k, dim=-1)
            x2 = torch.nn.functional.silu(gate) * up
        wt = self.dequantized_bf16_t(_scratch_bf16(self.k * self.rows).view(self.k, self.rows))
        # On PyTorch's threads: a quantized model's forward gives a long prompt the free cores (quant/load.py)
        y = torch.matmul(x2.to(torch.bfloat16), wt).float()
        bias = self.tensors[3]
        if bias is not None:
            y += bias
        return y if self.rows == n else y[:, :n]


# Prompts of at least this many rows multiply through oneDNN's bf16 matmul where it runs on AMX-BF16: the
# weight is dequantized to bf16 once per call (a pass over the packed bytes, writing 2 bytes a weight), then
# the matmul runs at ~3x the VNNI loop's rate. Below it the dequantization costs more than it saves (measured
# on the 0.5B shape; benchmarks/results/decode_bound.md). Weights over BF16_PREFILL_MAX_WEIGHT values (the
# LM head of a large vocabulary, when every position's logits are asked for) stay on VNNI, so the scratch
# buffer stays small.
BF16_PREFILL_MIN_ROWS = 256
BF16_PREFILL_MAX_WEIGHT = 1 << 27
_scratch = threading.local()


def _scratch_bf16(numel: int) -> torch.Tensor:
    """A bf16 buffer of `numel` values, reused by every call on this thread (no fresh pages per layer)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _scratch.buf = torch.empty(numel, dtype=torch.bfloat16)
    return buf[:numel]


def bf16_prefill_runs() -> bool:
    """Whether long prompts take the bf16 (AMX) path: PyTorch reports AMX tiles usable (its own check asks
    the kernel for permission with arch_prctl) and QWENLAB_PREFILL (or force_prefill_path) is not "vnni"."""
    if _prefill["runs"] is None:
        choice = _prefill["forced"] or os.environ.get("QWENLAB_PREFILL", "auto")
        if choice not in PREFILL_PATHS:
            raise KernelArgumentError(f"QWENLAB_PREFILL must be one of {', '.join(PREFILL_PATHS)}, got {choice!r}")
        is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        _prefill["runs"] = choice != "vnni" and bool(is_amx and is_amx())
    return _prefill["runs"]


PREFILL_PATHS = ("auto", "vnni", "amx-bf16")
_prefill: dict = {"forced": None, "runs": None}


def force_prefill_path(name: str | None) -> str:
    """"vnni", or "amx-bf16" (taken only where AMX runs), for long prompts from now on in this process; None: the
    default. Returns the path in use. For tests and benchmarks (QWENLAB_PREFILL does the same for a run)."""
    _prefill["forced"], _prefill["runs"] = name, None
    return prefill_path()


def prefill_path() -> str:
    return "amx-bf16" if bf16_prefill_runs() else "vnni"


def linear_int8(x: torch.Tensor, n: int, packed: torch.Tensor, scales: torch.Tensor, group_size: int,
                bias: torch.Tensor | None = None, silu_mul: bool = False) -> torch.Tensor:
    """x [..., K] (any float dtype) -> fp32 [..., n]; bias (if any) padded to the packed rows.
    silu_mul: x is a fused gate|up output [..., 2K] and the layer multiplies silu(gate) * up.
    (A layer calls its PackedLinear, built once, instead: this checks the tensors on every call.)"""
    return PackedLinear(packed, scales, None, bias, group_size)(x, n, silu_mul)


def linear_int4(x: torch.Tensor, n: int, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                group_size: int, bias: torch.Tensor | None = None, silu_mul: bool = False) -> torch.Tensor:
    return PackedLinear(packed, scales, mins, bias, group_size)(x, n, silu_mul)


# ---- bf16 / fp32 weights (float_matmul.cpp) -----------------------------------------------------------
FLOAT_BITS = {torch.bfloat16: 16, torch.float32: 32}


def linear_float(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 silu_mul: bool = False) -> torch.Tensor:
    """x [..., K] (any float dtype; silu_mul: a fused gate|up [..., 2K]) times a bf16 or fp32 weight [N, K]
    (row-major, as stored), plus an fp32 bias [N] -> fp32 [..., N]."""
    kernel = "gemm_float"
    if weight.dim() != 2 or weight.dtype not in FLOAT_BITS:
        raise KernelArgumentError(f"native {kernel}: the weight must be a 2-d bf16 or fp32 tensor, got "
                                  f"{list(weight.shape)} {weight.dtype}")
    n, k = weight.shape
    x2, act = _gemm_input(x, k, silu_mul)
    wp, w_len = buffer(weight, weight.dtype, "the weight", kernel)
    bp, b_len = optional_buffer(bias, torch.float32, "the bias", kernel)
    y = torch.empty(x2.shape[0], n)
    checked(library().gemm_float(x2.data_ptr(), x2.numel(), x2.shape[0], k, wp, w_len, FLOAT_BITS[weight.dtype], n,
                                 bp, b_len, y.data_ptr(), y.numel(), kernel_threads(), act), kernel)
    return y.view(*x.shape[:-1], n)


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 3, threads: int | None = None) -> float:
    """Bytes per second of a STREAM-like read (the sum of an nbytes buffer, on the kernels' threads):
    the best of `repeats` after one untimed pass. The bound of a decode step is this over its bytes."""
    import time

    x = torch.ones(max(nbytes // 4, 1 << 18))  # written once: every page is resident before timing
    out = ctypes.c_double()
    best = float("inf")
    for i in range(repeats + 1):
        start = time.perf_counter()
        checked(library().read_bandwidth(x.data_ptr(), x.numel(), threads or kernel_threads(), ctypes.byref(out)),
                "read_bandwidth")
        if i:
            best = min(best, time.perf_counter() - start)
    if out.value != x.numel():
        raise RuntimeError(f"read_bandwidth summed {out.value}, expected {x.numel()}")
    return x.numel() * 4 / best


# ---- a whole decode step through every layer (decode_stack.cpp) -------------------------------------
class _QLinear(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("s", ctypes.c_void_p), ("mz", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("N", ctypes.c_int64), ("K", ctypes.c_int64), ("gs", ctypes.c_int64), ("bits", ctypes.c_int64),
                ("w_len", ctypes.c_int64), ("s_len", ctypes.c_int64), ("mz_len", ctypes.c_int64),
                ("bias_len", ctypes.c_int64)]


class _DecodeLayer(ctypes.Structure):
    _fields_ = [("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p), ("qkv", _QLinear), ("o", _QLinear),
                ("gate_up", _QLinear), ("down", _QLinear), ("keys", ctypes.c_void_p), ("values", ctypes.c_void_p),
                ("norm1_len", ctypes.c_int64), ("norm2_len", ctypes.c_int64), ("kv_len", ctypes.c_int64),
                ("k", _QLinear), ("v", _QLinear), ("up", _QLinear)]  # float layers only (else zeroed)


class _LoraLinear(ctypes.Structure):  # decode_stack.cpp's LoraLinear: A [n, R, K], Bt [n, R, N]; A null: none
    _fields_ = [("A", ctypes.c_void_p), ("Bt", ctypes.c_void_p), ("A_len", ctypes.c_int64), ("Bt_len", ctypes.c_int64),
                ("R", ctypes.c_int64), ("n", ctypes.c_int64), ("bits", ctypes.c_int64)]


class _LoraLayer(ctypes.Structure):
    _fields_ = [(name, _LoraLinear) for name in ("q", "k", "v", "o", "gate", "up", "down")]


# The layer's linears in _LoraLayer's order: (owner, attribute) names.
ADAPTER_TARGETS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
                   ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


class LoraKernelStack:
    """One LoRALinear's adapters in lora_bgmv's layout (serve's per-row adapters, GRPO's policy during a rollout):
    A [n, R, in] and scaled Bᵀ [n, R, out], one slot per adapter of `order`; an adapter that does not touch this
    module (or is merged into the weight) has zeros. Copies, made without autograd (a trained policy's A and B
    are parameters)."""

    def __init__(self, module, order: list[str], dtype: torch.dtype = torch.float32):
        names = [n for n in order if n in module.lora_A and n not in module.merged]
        self.active = bool(names)
        rank = max((module.lora_A[n].shape[0] for n in names), default=0)
        a = torch.zeros(len(order), rank, module.in_features)
        bt = torch.zeros(len(order), rank, module.out_features)
        with torch.no_grad():
            for n in names:
                i, r = order.index(n), module.lora_A[n].shape[0]
                a[i, :r] = module.lora_A[n].float()
                bt[i, :r] = (module.lora_B[n].float() * module.scaling[n]).t()  # scaled in fp32, then rounded once
        self.a, self.bt = a.to(dtype), bt.to(dtype)
        # What each call passes to the kernel, read once (a Python call per linear per step adds up).
        self.rank, self.out_features, self.count = rank, module.out_features, len(order)
        self.bits = lora_bits(dtype)
        self.a_ptr, self.bt_ptr = self.a.data_ptr(), self.bt.data_ptr()
        self.a_len, self.bt_len = self.a.numel(), self.bt.numel()  # the kernel checks them against the sizes


def lora_table(wrapped: list[tuple], stacks: dict) -> ctypes.Array:
    """Per layer the adapters' stacks of its wrapped linears for decode_stack.cpp. wrapped: per layer the
    DecodeStack's modules in ADAPTER_TARGETS order (None: not wrapped); stacks: module -> an object with
    a_ptr, a_len, bt_ptr, bt_len, rank, count, bits, active (a LoraKernelStack)."""
    def entry(module):
        stack = stacks.get(module) if module is not None else None
        if stack is None or not stack.active:
            return _LoraLinear()
        return _LoraLinear(stack.a_ptr, stack.bt_ptr, stack.a_len, stack.bt_len, stack.rank, stack.count, stack.bits)
    return (_LoraLayer * len(wrapped))(*[_LoraLayer(*map(entry, modules)) for modules in wrapped])


def unwrapped(module):
    """The linear an adapter wraps (LoRALinear's base_layer), or the module itself."""
    return getattr(module, "base_layer", module)


def _qlinear(layer) -> _QLinear:
    layer = unwrapped(layer)
    kernel = "decode_stack"
    if not hasattr(layer, "qweight"):  # a float layer: its weight as stored, [N, K] row-major
        bits = FLOAT_BITS.get(layer.weight.dtype)
        if bits is None:
            raise KernelArgumentError(f"native {kernel}: a {layer.weight.dtype} weight has no kernel")
        w, w_len = buffer(layer.weight, layer.weight.dtype, "a float weight", kernel)
        bias, bias_len = optional_buffer(layer.bias, torch.float32, "a bias", kernel)
        return _QLinear(w, None, None, bias, layer.out_features, layer.in_features, 0, bits, w_len, 0, 0, bias_len)
    w, w_len = buffer(layer.qweight, torch.uint8, "a packed weight", kernel)
    s, s_len = buffer(layer.scales, torch.float16, "scales", kernel)
    mz, mz_len = optional_buffer(layer.mins if layer.bits == 4 else None, torch.float16, "mins", kernel)
    bias, bias_len = optional_buffer(layer.native_bias, torch.float32, "a bias", kernel)
    return _QLinear(w, s, mz, bias, layer.qweight.shape[0] * ROW_GROUP, layer.in_features, layer.group_size,
                    layer.bits, w_len, s_len, mz_len, bias_len)


def _norm(layer_norm) -> tuple[int, int]:
    return buffer(layer_norm.weight, torch.float32, "a norm weight", "decode_stack")


class DecodeStack:
    """Every decoder layer of a model as one native call per decode step: a fused native quantized model
    (q|k|v and gate|up packed together), or a float one whose q, k, v, gate, up, o and down are bf16 or
    fp32 weights (qwenlab.quant.float_native).

    Holds pointers to the layers' weights (the model must keep its modules while this is in use; a float
    model checks `still_valid` before each use and rebuilds) and, per KV cache, the table of its layers'
    key/value buffers. Called as (x, cos, sin, cache, buffers, pos) -> x after the last layer, or None where
    it does not apply (the caller then runs the layers one by one): one token per row, fp32, a cache of
    contiguous fp32 buffers. Every buffer goes with its length, which the kernel checks for every layer
    before the first runs.
    """

    def __init__(self, layers, config):
        self.layers = [self._layer(layer) for layer in layers]
        self.hidden, self.eps = config.hidden_size, float(config.rms_norm_eps)
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        # The modules whose weights the table points at (and any adapter wrapping them), to tell when a
        # module swap (an adapter attached or detached, a merge writing new weights) has made it stale.
        # Checked before every step, so kept to dict lookups and one data_ptr() each (nn.Module's
        # __getattr__ cost ~6 µs per linear: 1 ms a step on the 0.5B shape's 168 linears).
        self._watched = [(owner._modules, name, owner._modules[name], *_weight_slot(owner._modules[name]))
                         for layer in layers for owner in (layer.self_attn, layer.mlp)
                         for name in owner._modules if name.endswith("_proj")]
        # Per layer, ADAPTER_TARGETS' modules where an adapter wraps them (serve's per-row adapters).
        self.wrapped = [tuple(_wrapped_or_none(getattr(getattr(layer, owner), name, None)) for owner, name in ADAPTER_TARGETS)
                        for layer in layers]
        self.has_adapters = any(m is not None for modules in self.wrapped for m in modules)

    def matches(self) -> bool:
        """Whether the layers still hold the modules and weights this stack was built from."""
        return all(modules.get(name) is module and table.get(key) is tensor and tensor.data_ptr() == address
                   for modules, name, module, table, key, tensor, address in self._watched)

    def _layer(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        norms = (_norm(layer.input_layernorm), _norm(layer.post_attention_layernorm))
        if hasattr(attn, "qkv_proj"):  # quantized and fused
            none = _QLinear()
            return (*norms, _qlinear(attn.qkv_proj), _qlinear(attn.o_proj), _qlinear(mlp.gate_up_proj),
                    _qlinear(mlp.down_proj), none, none, none)
        return (*norms, _qlinear(attn.q_proj), _qlinear(attn.o_proj), _qlinear(mlp.gate_proj), _qlinear(mlp.down_proj),
                _qlinear(attn.k_proj), _qlinear(attn.v_proj), _qlinear(mlp.up_proj))

    def _table(self, cache, buffers):
        table = getattr(cache, "native_decode_table", None)
        if table is None or table[0] is not self:
            if len(buffers) != len(self.layers) or any(
                    t.dtype != torch.float32 or not t.is_contiguous() or t.shape != kv[0].shape
                    for kv in buffers for t in kv):
                return None
            array = (_DecodeLayer * len(self.layers))(*[
                _DecodeLayer(norm1[0], norm2[0], qkv, o, gate_up, down, k.data_ptr(), v.data_ptr(), norm1[1], norm2[1],
                             k.numel(), k_proj, v_proj, up)
                for (norm1, norm2, qkv, o, gate_up, down, k_proj, v_proj, up), (k, v) in zip(self.layers, buffers)])
            table = cache.native_decode_table = (self, array)
        return table[1]

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, buffers, pos: int,
                 starts: torch.Tensor | None = None, lora: tuple | None = None) -> torch.Tensor | None:
        """buffers: the cache's slot_buffers() (per layer keys, values), kept per cache as a native table.
        starts: int64 [B], each row's count of leading padding slots (None: all 0): row b attends to slots
        starts[b]..pos only; each must lie in [0, pos] (the kernel refuses others before any work).
        lora: (lora_table(...), row_adapter int32 [B], each row's index into the stacks or -1), the deltas
        of each row's own adapter; None: no adapter delta (no row uses one)."""
        b, t, h = x.shape
        if t != 1 or h != self.hidden or x.requires_grad or any(
                a.dtype != torch.float32 for a in (x, cos, sin)) or not (cos.is_contiguous() and sin.is_contiguous()) \
                or cos.shape != sin.shape:
            return None
        table = self._table(cache, buffers)
        if table is None:
            return None
        starts_ptr = row_starts(starts, b, "decode_stack")
        lora_ptr, lora_len, ra_ptr, ra_len = None, 0, None, 0
        if lora is not None:
            adapters, row_adapter = lora
            lora_ptr, lora_len = ctypes.addressof(adapters), len(adapters)
            ra_ptr, ra_len = buffer(row_adapter, torch.int32, "row_adapter", "decode_stack")
        out = x.contiguous().clone()  # updated in place by the kernel
        status = library().decode_stack(out.data_ptr(), out.numel(), b, h, ctypes.addressof(table), len(self.layers),
                                        self.heads, self.kv_heads, self.head_dim, cos.data_ptr(), sin.data_ptr(),
                                        cos.numel(), cache.capacity, pos, self.eps, kernel_threads(), starts_ptr,
                                        lora_ptr, lora_len, ra_ptr, ra_len)
        return out if checked(status, "decode_stack") == 0 else None


def _weight_slot(module) -> tuple[dict, str, torch.Tensor | None, int]:
    """Where a linear keeps the weight the stack points at: (its parameters or buffers dict, the key, the
    tensor, its address); a merge that writes `weight.data` changes the address, a swap the tensor."""
    base = unwrapped(module)
    for table in (base._buffers, base._parameters):
        for key in ("qweight", "weight"):
            if table.get(key) is not None:
                return table, key, table[key], table[key].data_ptr()
    return {}, "", None, 0


def _wrapped_or_none(module):
    return module if module is not None and hasattr(module, "lora_A") else None


def run_decode_stack(model, stack: DecodeStack | None, x, cos, sin, mask, cache, start):
    """A decode step's layers through `stack` (one native call), or None where it does not apply and the
    caller runs the layers one by one: not one token per row, no cache offering slot buffers, a row with
    padding after its tokens, or adapters attached with no per-row provider that runs them natively
    (model.row_adapters, serve's AdapterSet: `native_deltas(stack)` -> False, None or (table, row_adapter))."""
    if stack is None or x.shape[1] != 1 or cache is None:
        return None
    # padded rows (a mask) go too where each row's padding is leading: it attends from its own start
    starts = leading_padding(cache) if mask is not None else None
    if mask is not None and starts is None:
        return None
    lora = None
    if stack.has_adapters:
        provider = getattr(model, "row_adapters", None)
        lora = provider.native_deltas(stack) if provider is not None else False
        if lora is False:
            return None
    buffers = cache.slot_buffers()
    return stack(x, cos, sin, cache, buffers, start, starts, lora) if buffers is not None else None
