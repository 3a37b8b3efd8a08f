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

// The delta itself; the entry points check its arguments first. Token t's x starts at x + t ldx and its
// y at y + t ldy (ldx >= K, ldy >= N: the decode stack adds q, k and v deltas into columns of one buffer).
static void bgmv(const float* x, int64_t ldx, int64_t rows, int64_t T, int64_t K, const int32_t* row_adapter,
                 const float* A, const float* Bt, int64_t R, int64_t N, float* y, int64_t ldy) {
    float h[MAX_RANK];
    for (int64_t r = 0; r < rows; ++r) {
        const int32_t a = row_adapter[r];
        if (a < 0) continue;
        const float* Aa = A + (int64_t)a * R * K;
        const float* Ba = Bt + (int64_t)a * R * N;
        for (int64_t t = r * T; t < (r + 1) * T; ++t) {
            const float* xt = x + t * ldx;
            float* yt = y + t * ldy;
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
}

// Lengths count elements: x_len = rows T K, y_len = rows T N, ra_len = rows, A_len = n R K, Bt_len = n R N
// for n adapters; a row's adapter index must be below n. Checked before y is touched: O(rows).
extern "C" int qwenlab_lora_bgmv(const float* x, int64_t x_len, int64_t rows, int64_t T, int64_t K,
                                 const int32_t* row_adapter, int64_t ra_len, const float* A, int64_t A_len,
                                 const float* Bt, int64_t Bt_len, int64_t n_adapters, int64_t R, int64_t N, float* y,
                                 int64_t y_len) {
    if (R > MAX_RANK) return QWENLAB_NOT_APPLICABLE;
    if (rows < 0 || T < 0 || K < 0 || R < 0 || N < 0 || !has_elems(x_len, {rows, T, K}) ||
        !has_elems(y_len, {rows, T, N}) || !has_elems(ra_len, {rows}) || !has_elems(A_len, {n_adapters, R, K}) ||
        !has_elems(Bt_len, {n_adapters, R, N}) || (x_len && !x) || (y_len && !y) || (ra_len && !row_adapter) ||
        (A_len && !A) || (Bt_len && !Bt))
        return QWENLAB_BAD_SIZES;
    for (int64_t r = 0; r < rows; ++r)
        if (row_adapter[r] >= n_adapters) return QWENLAB_BAD_SIZES;
    bgmv(x, K, rows, T, K, row_adapter, A, Bt, R, N, y, N);
    return QWENLAB_OK;
}

// For decode_stack.cpp, which checks every argument before its first layer: one token per row, strided.
int lora_bgmv_rows(const float* x, int64_t ldx, int64_t rows, int64_t K, const int32_t* row_adapter,
                   const float* A, const float* Bt, int64_t R, int64_t N, float* y, int64_t ldy) {
    if (R > MAX_RANK) return QWENLAB_NOT_APPLICABLE;
    bgmv(x, ldx, rows, 1, K, row_adapter, A, Bt, R, N, y, ldy);
    return QWENLAB_OK;
}
