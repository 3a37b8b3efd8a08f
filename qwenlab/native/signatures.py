"""The C entry points of qwenlab's native library, written once: name -> (argument types, GIL policy).

Every entry point returns an int status (vec.h: 0 OK, -1 not applicable, -2 out of memory, -3 bad
sizes) and takes each buffer with its length in elements. tests/native/test_signatures.py checks this
table against the library's exported symbols and the parameter counts declared in the sources.

GIL: "released" entry points run through ctypes.CDLL (the matmuls and the decode stack take long
enough that other Python threads should run meanwhile); "held" ones through ctypes.PyDLL: they take
microseconds, and releasing and re-taking the GIL per call let the server's event-loop thread in
between every call (measured: mixed-adapter decode inside `qwenlab serve` ran slower than alone).
"""

from __future__ import annotations

import ctypes

p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float

SIGNATURES: dict[str, tuple[list, str]] = {
    # x, x_len, M, K, w, w_len, s, s_len, N, gs, bias, bias_len, y, y_len, threads, act
    "qwenlab_gemm_int8": ([p, i64, i64, i64, p, i64, p, i64, i64, i64, p, i64, p, i64, i32, i32], "released"),
    # as gemm_int8, with mz, mz_len after s, s_len
    "qwenlab_gemm_int4": ([p, i64, i64, i64, p, i64, p, i64, p, i64, i64, i64, p, i64, p, i64, i32, i32], "released"),
    # bits (8 or 4), w, w_len, s, s_len, mz (int4; NULL for int8), mz_len, N, K, gs, wt (bf16 [K, N]), wt_len, threads
    "qwenlab_dequant_bf16": ([i32, p, i64, p, i64, p, i64, i64, i64, i64, p, i64, i32], "released"),
    # x, x_len, M, K, w, w_len, bits (16 bf16, 32 fp32), N, bias, bias_len, y, y_len, threads, act
    "qwenlab_gemm_float": ([p, i64, i64, i64, p, i64, i64, i64, p, i64, p, i64, i32, i32], "released"),
    # request: 1 use vdpbf16ps (only after qwenlab_probe_bf16 ran in a child), 0 the widening path, -1 ask
    "qwenlab_float_path": ([i32], "held"),
    # x, x_len, threads, out (a STREAM-like read: the sum of x)
    "qwenlab_read_bandwidth": ([p, i64, i32, p], "released"),
    # x, x_len, B, H, layers, n_layers, Hq, Hkv, D, cos, sin, cs_len, cap, pos, eps, threads, starts (B int64 or
    # NULL), lora (n_layers LoraLayer or NULL), lora_len, row_adapter (B int32 or NULL), ra_len
    "qwenlab_decode_stack": ([p, i64, i64, i64, p, i64, i64, i64, i64, p, p, i64, i64, i64, f32, i32, p, p, i64, p,
                              i64], "released"),
    # x, x_len, rows, T, K, row_adapter, ra_len, A, A_len, Bt, Bt_len, n_adapters, R, N, y, y_len, threads,
    # bits (A and Bt: 32 fp32, 16 bf16)
    "qwenlab_lora_bgmv": ([p, i64, i64, i64, i64, p, i64, p, i64, p, i64, i64, i64, i64, p, i64, i32, i32], "held"),
    # qkv, qkv_len, B, Hq, Hkv, D, cos, sin, cs_len, keys, values, kv_len, cap, pos, out, out_len,
    # starts (B int64 or NULL)
    "qwenlab_decode_attention": ([p, i64, i64, i64, i64, i64, p, p, i64, p, p, i64, i64, i64, p, i64, p, i32], "held"),
    # q, q_len, q_ld, k, k_len, k_ld, v, v_len, v_ld, B, T, Hq, Hkv, D, cos, sin, cs_len, keys, values, kv_len, cap,
    # start, out, out_len, starts (B int64 or NULL), threads
    "qwenlab_prefill_attention": ([p, i64, i64, p, i64, i64, p, i64, i64, i64, i64, i64, i64, i64, p, p, i64, p, p,
                                   i64, i64, i64, p, i64, p, i32], "released"),
    # x, x_len, rows, n, w, w_len, eps, out, out_len
    "qwenlab_rms_norm": ([p, i64, i64, i64, p, i64, f32, p, i64], "held"),
    # logits, logits_len, mask (uint32 words), mask_len, n_valid, out (one int64: the id, or -1)
    "qwenlab_masked_argmax": ([p, i64, p, i64, i64, p], "held"),
    # seed (build.py runs it in a child process before the library is loaded)
    "qwenlab_probe": ([i32], "held"),
    # seed: one vdpbf16ps, run in a child process like qwenlab_probe (the bf16 path's own probe)
    "qwenlab_probe_bf16": ([i32], "held"),
}


class Library:
    """The loaded library: one attribute per entry point, without the `qwenlab_` prefix."""

    def __init__(self, path):
        released, held = ctypes.CDLL(str(path)), ctypes.PyDLL(str(path))
        for name, (argtypes, gil) in SIGNATURES.items():
            function = getattr(released if gil == "released" else held, name)
            function.argtypes, function.restype = argtypes, i32
            setattr(self, name.removeprefix("qwenlab_"), function)
        self.path = path
