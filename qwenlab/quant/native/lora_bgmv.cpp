// Per-row LoRA deltas for a batch that mixes adapters (the Punica / S-LoRA "BGMV" idea) on a CPU:
//
//   y[t, :] += Bt[a]ᵀ (A[a] x[t, :])   for every token t of row r = t / T, a = row_adapter[r] (-1: none)
//
// A is [n, R, K] and Bt is [n, R, N] (B transposed, each adapter's scaling folded in, ranks padded to R
// with zero rows). Each token costs R (K + N) multiply-adds for its own adapter only: a dense product
// with all n adapters' columns stacked would cost n times that. y is updated in place (the base
// layer's output), single-threaded: at serving ranks this is a few percent of the base matmul.
#include <immintrin.h>
#include <stdint.h>

#include "vec.h"

#define MAX_RANK 256

extern "C" int qwenlab_lora_bgmv(const float* x, int64_t rows, int64_t T, int64_t K, const int32_t* row_adapter,
                                 const float* A, const float* Bt, int64_t R, int64_t N, float* y) {
    if (R > MAX_RANK) return -1;
    float h[MAX_RANK];
    for (int64_t r = 0; r < rows; ++r) {
        const int32_t a = row_adapter[r];
        if (a < 0) continue;
        const float* Aa = A + (int64_t)a * R * K;
        const float* Ba = Bt + (int64_t)a * R * N;
        for (int64_t t = r * T; t < (r + 1) * T; ++t) {
            const float* xt = x + t * K;
            float* yt = y + t * N;
            for (int64_t j = 0; j < R; ++j) h[j] = dot_f32(Aa + j * K, xt, K);
            int64_t n = 0;
            for (; n + 16 <= N; n += 16) {
                __m512 acc = _mm512_loadu_ps(yt + n);
                for (int64_t j = 0; j < R; ++j)
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(h[j]), _mm512_loadu_ps(Ba + j * N + n), acc);
                _mm512_storeu_ps(yt + n, acc);
            }
            if (n < N) {
                __mmask16 m = (__mmask16)((1u << (N - n)) - 1);
                __m512 acc = _mm512_maskz_loadu_ps(m, yt + n);
                for (int64_t j = 0; j < R; ++j)
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(h[j]), _mm512_maskz_loadu_ps(m, Ba + j * N + n), acc);
                _mm512_mask_storeu_ps(yt + n, m, acc);
            }
        }
    }
    return 0;
}
