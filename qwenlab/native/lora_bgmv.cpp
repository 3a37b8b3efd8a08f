// Per-row LoRA deltas for a batch that mixes adapters (the Punica / S-LoRA "BGMV" idea) on a CPU:
//
//   y[t, :] += Bt[a]ᵀ (A[a] x[t, :])   for every token t of row r = t / T, a = row_adapter[r] (-1: none)
//
// A is [n, R, K] and Bt is [n, R, N] (B transposed, each adapter's scaling folded in, ranks padded to R
// with zero rows). Each token costs R (K + N) multiply-adds for its own adapter only: a dense product
// with all n adapters' columns stacked would cost n times that. y is updated in place (the base
// layer's output), on the kernels' thread pool when the work is large enough (bgmv_segments).
//
// A and Bt are fp32 or bf16 (bits 32 or 16; x, y and the sums stay fp32). bf16 stacks halve the bytes a
// decode step reads; measured, that took only ~1 ms off a ~48 ms step (0.5B int4, 8 rows of 8 adapters),
// since the deltas' cost there was mostly per-call overhead, not bandwidth.
#include <immintrin.h>
#include <stdint.h>

#include "lora_bgmv.h"
#include "vec.h"

#include "pool.h"

#define MAX_RANK 256
// Below this many multiply-adds (all rows together) the decode stack's delta runs on the calling thread.
#define PARALLEL_FROM_MACS (1 << 16)

// One token's delta, columns [n0, n1) of its output: h = A[a] x (R dot products), then y[n0:n1] += Bt[a]ᵀ h.
template <typename W>
static void bgmv_token(const float* xt, const W* Aa, const W* Ba, int64_t R, int64_t K, int64_t N,
                       int64_t n0, int64_t n1, float* yt) {
    float h[MAX_RANK];
    for (int64_t j = 0; j < R; ++j) h[j] = dot_w(Aa + j * K, xt, K);
    int64_t n = n0;
    for (; n + 16 <= n1; n += 16) {
        __m512 acc = _mm512_loadu_ps(yt + n);
        for (int64_t j = 0; j < R; ++j) acc = _mm512_fmadd_ps(_mm512_set1_ps(h[j]), load_w(Ba + j * N + n), acc);
        _mm512_storeu_ps(yt + n, acc);
    }
    if (n < n1) {
        __mmask16 m = (__mmask16)((1u << (n1 - n)) - 1);
        __m512 acc = _mm512_maskz_loadu_ps(m, yt + n);
        for (int64_t j = 0; j < R; ++j) acc = _mm512_fmadd_ps(_mm512_set1_ps(h[j]), load_w(m, Ba + j * N + n), acc);
        _mm512_mask_storeu_ps(yt + n, m, acc);
    }
}

// Adapter a's token delta with A and Bt of either width (bits 16: bf16, else fp32).
static inline void adapter_token(const float* xt, const void* A, const void* Bt, int bits, int32_t a, int64_t R,
                                 int64_t K, int64_t N, int64_t n0, int64_t n1, float* yt) {
    if (bits == 16)
        bgmv_token(xt, (const uint16_t*)A + (int64_t)a * R * K, (const uint16_t*)Bt + (int64_t)a * R * N, R, K, N,
                   n0, n1, yt);
    else
        bgmv_token(xt, (const float*)A + (int64_t)a * R * K, (const float*)Bt + (int64_t)a * R * N, R, K, N, n0, n1,
                   yt);
}

// The delta itself; the entry points check its arguments first. Token t's x starts at x + t ldx and its
// y at y + t ldy (ldx >= K, ldy >= N: the decode stack adds q, k and v deltas into columns of one buffer).
static void bgmv(const float* x, int64_t ldx, int64_t rows, int64_t T, int64_t K, const int32_t* row_adapter,
                 const void* A, const void* Bt, int bits, int64_t R, int64_t N, float* y, int64_t ldy) {
    for (int64_t r = 0; r < rows; ++r) {
        const int32_t a = row_adapter[r];
        if (a < 0) continue;
        for (int64_t t = r * T; t < (r + 1) * T; ++t) adapter_token(x + t * ldx, A, Bt, bits, a, R, K, N, 0, N, y + t * ldy);
    }
}

// The deltas of one or several linears that read the same x (q, k and v; gate and up) as one job on the
// kernels' thread pool: one hand-off for all, and the small k and v deltas share the threads with q's. A
// chunk is one token of one segment and a slice of its columns (fewer tokens than threads split each
// token's columns, recomputing its R dot products). Segment s adds into y_s (row stride ldy, N_s columns).
// Measured on the 0.5B int4 shape, 8 rows of 8 adapters: the pool took prefill's first step from 0.70-0.78 s
// to 0.64-0.66 s; one job for q/k/v and one for gate/up (with down's silu vectorised in the decode stack)
// took 1-3 ms off a ~48 ms decode step.
struct SegmentsJob {
    const float* x;
    int64_t T, ldx, K, ldy;
    const int32_t* row_adapter;
    const LoraSegment* segs;
    int nseg;
    int64_t parts[LORA_MAX_SEGMENTS], first[LORA_MAX_SEGMENTS + 1];  // chunks of segment s: [first[s], first[s + 1])
};

static void segments_chunk(const void* p, int64_t chunk) {
    const SegmentsJob& j = *static_cast<const SegmentsJob*>(p);
    int s = 0;
    while (chunk >= j.first[s + 1]) ++s;
    const LoraSegment& g = j.segs[s];
    const int64_t local = chunk - j.first[s], t = local / j.parts[s], part = local % j.parts[s];  // token t of row t / T
    const int32_t a = j.row_adapter[t / j.T];
    if (a < 0) return;
    const int64_t width = (g.N + j.parts[s] - 1) / j.parts[s];
    const int64_t n0 = part * width, n1 = n0 + width < g.N ? n0 + width : g.N;
    if (n0 < n1) adapter_token(j.x + t * j.ldx, g.A, g.Bt, g.bits, a, g.R, j.K, g.N, n0, n1, g.y + t * j.ldy);
}

// rows x T tokens of nseg segments on up to nthreads threads; on the calling thread when the work is too
// small to pay for the hand-off. Arguments already checked, except what is returned as not applicable.
static int bgmv_segments(const float* x, int64_t ldx, int64_t rows, int64_t T, int64_t K, const int32_t* row_adapter,
                         const LoraSegment* segs, int nseg, int64_t ldy, int nthreads) {
    if (nseg <= 0) return QWENLAB_OK;
    if (nseg > LORA_MAX_SEGMENTS) return QWENLAB_NOT_APPLICABLE;
    const int64_t tokens = rows * T;
    int64_t macs = 0;
    for (int s = 0; s < nseg; ++s) {
        if (segs[s].R > MAX_RANK) return QWENLAB_NOT_APPLICABLE;
        macs += tokens * segs[s].R * (K + segs[s].N);
    }
    if (nthreads <= 1 || macs < PARALLEL_FROM_MACS) {
        for (int s = 0; s < nseg; ++s)
            bgmv(x, ldx, rows, T, K, row_adapter, segs[s].A, segs[s].Bt, segs[s].bits, segs[s].R, segs[s].N, segs[s].y,
                 ldy);
        return QWENLAB_OK;
    }
    SegmentsJob job{x, T, ldx, K, ldy, row_adapter, segs, nseg, {}, {}};
    job.first[0] = 0;
    for (int s = 0; s < nseg; ++s) {
        int64_t parts = tokens >= nthreads ? 1 : (nthreads + tokens - 1) / tokens;
        if (parts > 1 && segs[s].N / parts < 64) parts = segs[s].N >= 128 ? segs[s].N / 64 : 1;  // under 64 columns: not worth it
        job.parts[s] = parts;
        job.first[s + 1] = job.first[s] + tokens * parts;
    }
    qwenlab_pool::pool().run(segments_chunk, &job, job.first[nseg], nthreads);
    return QWENLAB_OK;
}

// For decode_stack.cpp (arguments checked there): one token per row; nseg <= LORA_MAX_SEGMENTS.
int lora_bgmv_segments(const float* x, int64_t ldx, int64_t rows, int64_t K, const int32_t* row_adapter,
                       const LoraSegment* segs, int nseg, int64_t ldy, int nthreads) {
    return bgmv_segments(x, ldx, rows, 1, K, row_adapter, segs, nseg, ldy, nthreads);
}

// Lengths count elements: x_len = rows T K, y_len = rows T N, ra_len = rows, A_len = n R K, Bt_len = n R N
// for n adapters (bits 32: fp32 A and Bt; 16: bf16); a row's adapter index must be below n. Checked before y
// is touched: O(rows).
extern "C" int qwenlab_lora_bgmv(const float* x, int64_t x_len, int64_t rows, int64_t T, int64_t K,
                                 const int32_t* row_adapter, int64_t ra_len, const void* A, int64_t A_len,
                                 const void* Bt, int64_t Bt_len, int64_t n_adapters, int64_t R, int64_t N, float* y,
                                 int64_t y_len, int nthreads, int bits) {
    if (R > MAX_RANK) return QWENLAB_NOT_APPLICABLE;
    if (rows < 0 || T < 0 || K < 0 || R < 0 || N < 0 || (bits != 16 && bits != 32) || !has_elems(x_len, {rows, T, K}) ||
        !has_elems(y_len, {rows, T, N}) || !has_elems(ra_len, {rows}) || !has_elems(A_len, {n_adapters, R, K}) ||
        !has_elems(Bt_len, {n_adapters, R, N}) || (x_len && !x) || (y_len && !y) || (ra_len && !row_adapter) ||
        (A_len && !A) || (Bt_len && !Bt))
        return QWENLAB_BAD_SIZES;
    for (int64_t r = 0; r < rows; ++r)
        if (row_adapter[r] >= n_adapters) return QWENLAB_BAD_SIZES;
    const LoraSegment segment{A, Bt, bits, R, N, y};
    return bgmv_segments(x, K, rows, T, K, row_adapter, &segment, 1, N, nthreads);
}

// For decode_stack.cpp, which checks every argument before its first layer: one token per row, strided.
int lora_bgmv_rows(const float* x, int64_t ldx, int64_t rows, int64_t K, const int32_t* row_adapter,
                   const void* A, const void* Bt, int bits, int64_t R, int64_t N, float* y, int64_t ldy,
                   int nthreads) {
    const LoraSegment segment{A, Bt, bits, R, N, y};
    return bgmv_segments(x, ldx, rows, 1, K, row_adapter, &segment, 1, ldy, nthreads);
}
