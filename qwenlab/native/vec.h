// Small AVX-512 helpers and the entry points' argument checks, shared by the native kernels (included, so every
// kernel inlines them).
#pragma once
#include <immintrin.h>
#include <stdint.h>

#include <initializer_list>

// 16 weights from p as fp32: bf16 is the high half of an fp32, so widening is a 16-bit shift.
static inline __m512 load_w(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load_w(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline __m512 load_w(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 load_w(__mmask16 m, const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// sum_k w[k] * x[k] in fp32 for fp32 or bf16 w, any n (a masked load for the tail), two accumulators for latency.
template <typename W>
static inline float dot_w(const W* w, const float* x, int64_t n) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
        acc0 = _mm512_fmadd_ps(load_w(w + k), _mm512_loadu_ps(x + k), acc0);
        acc1 = _mm512_fmadd_ps(load_w(w + k + 16), _mm512_loadu_ps(x + k + 16), acc1);
    }
    for (; k + 16 <= n; k += 16) acc0 = _mm512_fmadd_ps(load_w(w + k), _mm512_loadu_ps(x + k), acc0);
    if (k < n) {
        __mmask16 m = (__mmask16)((1u << (n - k)) - 1);
        acc1 = _mm512_fmadd_ps(load_w(m, w + k), _mm512_maskz_loadu_ps(m, x + k), acc1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

static inline float dot_f32(const float* a, const float* b, int64_t n) { return dot_w(a, b, n); }

// e^x for x in [-87.3, 88.3] (clamped), Cephes' expf polynomial: ~1e-7 relative error, plenty before
// the int8 quantization the result goes through.
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

// out[k] = silu(gate[k]) * up[k] = gate[k] / (1 + e^-gate[k]) * up[k]; any K (a masked tail).
static inline void silu_mul_row(const float* gate, const float* up, int64_t K, float* out) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 g = _mm512_maskz_loadu_ps(m, gate + k);
        __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        _mm512_mask_storeu_ps(out + k, m, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(m, up + k)));
    }
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
