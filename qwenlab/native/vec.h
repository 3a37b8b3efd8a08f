// Small AVX-512 helpers and the entry points' argument checks, shared by the native kernels (included, so every
// kernel inlines them).
#pragma once
#include <immintrin.h>
#include <stdint.h>

#include <initializer_list>

// sum_k a[k] * b[k] in fp32, any n (a masked load for the tail), two accumulators for latency.
static inline float dot_f32(const float* a, const float* b, int64_t n) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k + 16), _mm512_loadu_ps(b + k + 16), acc1);
    }
    for (; k + 16 <= n; k += 16) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc0);
    if (k < n) {
        __mmask16 m = (__mmask16)((1u << (n - k)) - 1);
        acc1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + k), _mm512_maskz_loadu_ps(m, b + k), acc1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// ---- argument checks at the entry points --------------------------------------------------------------
// Status codes every entry point returns (qwenlab.quant.native turns them into exceptions or a fallback).
enum {
    QWENLAB_OK = 0,
    QWENLAB_NOT_APPLICABLE = -1,  // a shape this kernel does not handle: the caller takes PyTorch's path
    QWENLAB_NO_MEMORY = -2,       // a malloc failed
    QWENLAB_BAD_SIZES = -3,       // a buffer's length does not fit the dimensions: nothing was read or written
};

// True when `len` (a buffer's length in elements, as the caller measured it) equals the product of
// `dims`. Negative factors and overflowing products never match, so a crafted dimension cannot wrap
// around into a small length. O(number of factors): these run once per call, never inside the loops.
static inline bool has_elems(int64_t len, std::initializer_list<int64_t> dims) {
    int64_t n = 1;
    for (int64_t d : dims)
        if (d < 0 || __builtin_mul_overflow(n, d, &n)) return false;
    return len >= 0 && len == n;
}
