// bf16 and fp32 weight x fp32 activation matmul for decode (a few rows), row-major weights as stored.
//
// y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), w [N, K] row-major (the checkpoint's own layout, so
// prefill can hand the same tensor to oneDNN and nothing is repacked or copied). Decode reads every
// weight once per token, so the kernel's job is to stream w at memory bandwidth: each thread takes
// chunks of 64 rows (one contiguous run of memory) and, for one token, reads them front to back as one
// stream; for several tokens it walks 4 rows x 4 tokens, so a row is read from memory once per call.
// Three paths, chosen at run time:
//   bf16:avx512bf16  vdpbf16ps: x rounded to bf16 (as PyTorch's bf16 model does), 32 products per
//                    instruction, fp32 accumulation. Only where a child process ran the instruction
//                    (qwenlab_probe_bf16), never because the compiler was told it may.
//   bf16:avx512f     widening: each 32-bit lane holds w[2i] (low half) and w[2i+1] (high half); a shift
//                    and a mask make both fp32 exactly, multiplied by x deinterleaved once per call.
//   fp32:avx512f     plain FMA.
// K needs no alignment (the last block is a masked load) and N none (any row count).
// A call may name up to 3 weight matrices that read the same x (q|k|v, gate|up): their rows are one
// job for the pool, so a layer waits for the pool's threads once per input, not once per matrix.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"
#include "vec.h"

namespace {
using qwenlab_pool::pool;

enum Path { FP32 = 0, BF16_WIDEN = 1, BF16_DOT = 2 };
std::atomic<int> use_bf16_dot{0};  // set through qwenlab_float_path once the probe ran vdpbf16ps

constexpr int64_t XB = 32;             // x is padded to whole blocks of 32 values
constexpr int64_t ROWS_PER_CHUNK = 64;  // rows a thread claims at a time
constexpr int MAX_SEGMENTS = 3;

struct Segment {
    const void* w;       // [N, K] bf16 (uint16) or fp32
    const float* bias;   // [N] or null
    float* y;            // y[m * ldy + n]
    int64_t N, chunks;
};

struct FloatJob {
    int path, nseg;
    int64_t M, K, Kp, ldy;
    const void* xp;  // prepared x: bf16 [M, Kp] (dot), fp32 deinterleaved per 32 [M, Kp] (widen), fp32 [M, Kp]
    Segment seg[MAX_SEGMENTS];
};

static inline __mmask32 tail32(int64_t n) { return n >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << n) - 1); }
static inline __mmask16 tail16(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

template <int T, int RB>
static inline void store_rows(__m512 (&acc)[RB][T], int64_t n0, float* y, int64_t ldy, const float* bias) {
    for (int r = 0; r < RB; ++r)
        for (int t = 0; t < T; ++t)
            y[t * ldy + n0 + r] = _mm512_reduce_add_ps(acc[r][t]) + (bias ? bias[n0 + r] : 0.0f);
}

// Rows n0..n0+RB-1 for tokens 0..T-1 (x and y already offset to the first token). Each path is one step
// per block of k, called with TAIL false for every whole block and true once for a last partial block:
// a masked load in every step (one loop for both) ran the 4 x 4 tiles at 40% of their speed (AMD EPYC).
template <int T, int RB, bool TAIL>
__attribute__((target("avx512bf16"), always_inline)) static inline void step_bf16_dot(
        __m512 (&acc)[RB][T], const uint16_t* w, int64_t K, const uint16_t* x, int64_t Kp, int64_t n0, int64_t k,
        bool ahead) {
    __m512bh xv[T];
    for (int t = 0; t < T; ++t) xv[t] = (__m512bh)_mm512_loadu_si512(x + t * Kp + k);  // zero-padded
    for (int r = 0; r < RB; ++r) {
        if (ahead) _mm_prefetch((const char*)(w + (n0 + RB + r) * K + k), _MM_HINT_T1);
        const uint16_t* wr = w + (n0 + r) * K + k;
        const __m512bh wv = (__m512bh)(TAIL ? _mm512_maskz_loadu_epi16(tail32(K - k), wr) : _mm512_loadu_si512(wr));
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv, xv[t]);
    }
}

template <int T, int RB>
__attribute__((target("avx512bf16"))) static void rows_bf16_dot(const uint16_t* w, int64_t K, const uint16_t* x,
                                                                  int64_t Kp, int64_t n0, float* y, int64_t ldy,
                                                                  const float* bias, bool ahead) {
    __m512 acc[RB][T];
    for (int r = 0; r < RB; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + XB <= K; k += XB) step_bf16_dot<T, RB, false>(acc, w, K, x, Kp, n0, k, ahead);
    if (k < K) step_bf16_dot<T, RB, true>(acc, w, K, x, Kp, n0, k, ahead);
    store_rows<T, RB>(acc, n0, y, ldy, bias);
}

template <int T, int RB, bool TAIL>
static inline void step_bf16_widen(__m512 (&acc)[RB][T], const uint16_t* w, int64_t K, const float* x, int64_t Kp,
                                   int64_t n0, int64_t k, bool ahead) {
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int r = 0; r < RB; ++r) {
        if (ahead) _mm_prefetch((const char*)(w + (n0 + RB + r) * K + k), _MM_HINT_T1);
        const uint16_t* wr = w + (n0 + r) * K + k;
        const __m512i v = TAIL ? _mm512_maskz_loadu_epi16(tail32(K - k), wr) : _mm512_loadu_si512(wr);
        const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));  // w[k + 2i]
        const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(v, high));  // w[k + 2i + 1]
        for (int t = 0; t < T; ++t) {
            acc[r][t] = _mm512_fmadd_ps(even, _mm512_loadu_ps(x + t * Kp + k), acc[r][t]);
            acc[r][t] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(x + t * Kp + k + 16), acc[r][t]);
        }
    }
}

template <int T, int RB>
static void rows_bf16_widen(const uint16_t* w, int64_t K, const float* x, int64_t Kp, int64_t n0, float* y,
                            int64_t ldy, const float* bias, bool ahead) {
    __m512 acc[RB][T];
    for (int r = 0; r < RB; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + XB <= K; k += XB) step_bf16_widen<T, RB, false>(acc, w, K, x, Kp, n0, k, ahead);
    if (k < K) step_bf16_widen<T, RB, true>(acc, w, K, x, Kp, n0, k, ahead);
    store_rows<T, RB>(acc, n0, y, ldy, bias);
}

template <int T, int RB, bool TAIL>
static inline void step_fp32(__m512 (&acc)[RB][T], const float* w, int64_t K, const float* x, int64_t Kp, int64_t n0,
                             int64_t k, bool ahead) {
    for (int r = 0; r < RB; ++r) {
        if (ahead) _mm_prefetch((const char*)(w + (n0 + RB + r) * K + k), _MM_HINT_T1);
        const float* wr = w + (n0 + r) * K + k;
        const __m512 wv = TAIL ? _mm512_maskz_loadu_ps(tail16(K - k), wr) : _mm512_loadu_ps(wr);
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + t * Kp + k), acc[r][t]);
    }
}

template <int T, int RB>
static void rows_fp32(const float* w, int64_t K, const float* x, int64_t Kp, int64_t n0, float* y, int64_t ldy,
                      const float* bias, bool ahead) {
    __m512 acc[RB][T];
    for (int r = 0; r < RB; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) step_fp32<T, RB, false>(acc, w, K, x, Kp, n0, k, ahead);
    if (k < K) step_fp32<T, RB, true>(acc, w, K, x, Kp, n0, k, ahead);
    store_rows<T, RB>(acc, n0, y, ldy, bias);
}

// ahead: also prefetch (into L2) the next RB rows, which this thread reads next. A row of a decode
// matrix is only 28-152 cache lines, too short for the hardware prefetcher to get ahead of 8 of them.
template <int PATH, int T, int RB>
static inline void rows(const FloatJob& j, const Segment& s, int64_t n0, int64_t m, bool ahead = false) {
    float* y = s.y + m * j.ldy;
    if (PATH == BF16_DOT)
        rows_bf16_dot<T, RB>((const uint16_t*)s.w, j.K, (const uint16_t*)j.xp + m * j.Kp, j.Kp, n0, y, j.ldy, s.bias,
                             ahead);
    else if (PATH == BF16_WIDEN)
        rows_bf16_widen<T, RB>((const uint16_t*)s.w, j.K, (const float*)j.xp + m * j.Kp, j.Kp, n0, y, j.ldy, s.bias,
                               ahead);
    else
        rows_fp32<T, RB>((const float*)s.w, j.K, (const float*)j.xp + m * j.Kp, j.Kp, n0, y, j.ldy, s.bias, ahead);
}

// One token over rows [begin, end): the rows are one contiguous run of memory, read front to back as a
// single stream, a row at a time with two accumulators, prefetching a page ahead (into the next rows
// where this one ends): the hardware prefetcher stops at each 4 KiB page, the software one runs on.
// Walking 8 rows side by side instead (8 streams of 28-152 lines each) decoded the 0.5B shape in bf16
// at 30.9 tok/s, against 38.3 for one stream (AMD EPYC, 2 threads, the same machine minutes apart).
constexpr int64_t PREFETCH_BYTES = 4096;

// The rows' own loop, with the tiles' steps at one row and one token (T = RB = 1): the same loads and products
// per block as several tokens take. WT/XT: the weight's and the prepared x's element types; E: k per step. A
// macro because the bf16 dot loop must sit in a function marked target.
#define QWENLAB_ROWS_ONE_TOKEN(STEP, WT, XT, E)                                                           \
    const int64_t K = j.K;                                                                                \
    const WT* w = (const WT*)s.w;                                                                         \
    const XT* x = (const XT*)j.xp;                                                                        \
    for (int64_t n = begin; n < end; ++n) {                                                               \
        const char* wrow = (const char*)(w + n * K);                                                      \
        __m512 a0[1][1] = {{_mm512_setzero_ps()}}, a1[1][1] = {{_mm512_setzero_ps()}};                    \
        int64_t k = 0;                                                                                    \
        for (; k + 2 * (E) <= K; k += 2 * (E)) {                                                          \
            _mm_prefetch(wrow + k * sizeof(WT) + PREFETCH_BYTES, _MM_HINT_T0);                            \
            _mm_prefetch(wrow + k * sizeof(WT) + PREFETCH_BYTES + 64, _MM_HINT_T0);                       \
            STEP<1, 1, false>(a0, w, K, x, j.Kp, n, k, false);                                            \
            STEP<1, 1, false>(a1, w, K, x, j.Kp, n, k + (E), false);                                      \
        }                                                                                                 \
        for (; k + (E) <= K; k += (E)) STEP<1, 1, false>(a0, w, K, x, j.Kp, n, k, false);                 \
        if (k < K) STEP<1, 1, true>(a0, w, K, x, j.Kp, n, k, false);                                      \
        s.y[n] = _mm512_reduce_add_ps(_mm512_add_ps(a0[0][0], a1[0][0])) + (s.bias ? s.bias[n] : 0.0f);   \
    }

__attribute__((target("avx512bf16"))) static void rows_one_token_dot(const FloatJob& j, const Segment& s,
                                                                     int64_t begin, int64_t end) {
    QWENLAB_ROWS_ONE_TOKEN(step_bf16_dot, uint16_t, uint16_t, XB)
}

static void rows_one_token_widen(const FloatJob& j, const Segment& s, int64_t begin, int64_t end) {
    QWENLAB_ROWS_ONE_TOKEN(step_bf16_widen, uint16_t, float, XB)
}

static void rows_one_token_fp32(const FloatJob& j, const Segment& s, int64_t begin, int64_t end) {
    QWENLAB_ROWS_ONE_TOKEN(step_fp32, float, float, 16)
}

// One chunk: up to ROWS_PER_CHUNK rows of one segment, every token. Decode (1 token) streams the rows
// (rows_one_token); several tokens walk 4 rows x 4 tokens, re-reading the rows from L1 for each group of
// 4 tokens, and the last 1-3 tokens 8 rows at a time.
template <int PATH>
void float_chunk(const void* p, int64_t chunk) {
    const FloatJob& j = *(const FloatJob*)p;
    int s = 0;
    while (chunk >= j.seg[s].chunks) chunk -= j.seg[s++].chunks;
    const Segment& seg = j.seg[s];
    const int64_t begin = chunk * ROWS_PER_CHUNK, end = begin + ROWS_PER_CHUNK < seg.N ? begin + ROWS_PER_CHUNK : seg.N;
    if (j.M == 1) {
        if (PATH == BF16_DOT) rows_one_token_dot(j, seg, begin, end);
        else if (PATH == BF16_WIDEN) rows_one_token_widen(j, seg, begin, end);
        else rows_one_token_fp32(j, seg, begin, end);
        return;
    }
    int64_t m = 0;
    for (; m + 4 <= j.M; m += 4) {
        int64_t n = begin;
        for (; n + 4 <= end; n += 4) rows<PATH, 4, 4>(j, seg, n, m);
        for (; n < end; ++n) rows<PATH, 4, 1>(j, seg, n, m);
    }
    for (; m < j.M; ++m) {
        int64_t n = begin;
        for (; n + 8 <= end; n += 8) rows<PATH, 1, 8>(j, seg, n, m, n + 16 <= end);
        for (; n < end; ++n) rows<PATH, 1, 1>(j, seg, n, m);
    }
}

// x row (or silu(gate) * up for act 1) -> the layout the path reads, zero-padded to Kp.
static void prepare_row(const float* in, int64_t K, int64_t Kp, int path, void* out) {
    if (path == BF16_DOT) {  // round to nearest even, as PyTorch's float -> bf16 (finite values)
        uint16_t* o = (uint16_t*)out;
        for (int64_t k = 0; k < Kp; k += 16) {
            const __m512i u = _mm512_castps_si512(_mm512_maskz_loadu_ps(tail16(K > k ? K - k : 0), in + k));
            const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
            const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
            _mm256_storeu_si256((__m256i*)(o + k), _mm512_cvtepi32_epi16(r));
        }
        return;
    }
    float* o = (float*)out;
    if (path == FP32) {
        for (int64_t k = 0; k < Kp; k += 16)
            _mm512_storeu_ps(o + k, _mm512_maskz_loadu_ps(tail16(K > k ? K - k : 0), in + k));
        return;
    }
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int64_t k = 0; k < Kp; k += XB) {  // per block of 32: the 16 even-k values, then the 16 odd-k ones
        const __m512 a = _mm512_maskz_loadu_ps(tail16(K > k ? K - k : 0), in + k);
        const __m512 b = _mm512_maskz_loadu_ps(tail16(K > k + 16 ? K - k - 16 : 0), in + k + 16);
        _mm512_storeu_ps(o + k, _mm512_permutex2var_ps(a, even, b));
        _mm512_storeu_ps(o + k + 16, _mm512_permutex2var_ps(a, odd, b));
    }
}

}  // namespace

// The matmul of every float linear, with its checks done by the caller (qwenlab_gemm_float, decode_stack.cpp); C++ linkage, not an entry point.
// x [M, K] (act 1: gate|up [M, 2K], the input being silu(gate) * up); segment s writes y_s[m * ldy + n].
int run_float_linears(const float* x, int64_t M, int64_t K, int bits, int nseg, const void* const* w,
                           const float* const* bias, float* const* y, const int64_t* N, int64_t ldy, int nthreads,
                           int act) {
    if (M == 0) return QWENLAB_OK;
    FloatJob job{};
    job.path = bits == 32 ? FP32 : use_bf16_dot.load() ? BF16_DOT : BF16_WIDEN;
    job.nseg = nseg;
    job.M = M, job.K = K, job.Kp = (K + XB - 1) / XB * XB, job.ldy = ldy;
    int64_t chunks = 0, rows = 0;
    for (int s = 0; s < nseg; ++s) {
        job.seg[s] = {w[s], bias[s], y[s], N[s], (N[s] + ROWS_PER_CHUNK - 1) / ROWS_PER_CHUNK};
        chunks += job.seg[s].chunks, rows += N[s];
    }
    const int64_t elem = job.path == BF16_DOT ? 2 : 4;
    void* xp = aligned_alloc(64, ((M * job.Kp * elem + 63) / 64) * 64);
    float* row = act ? (float*)malloc(sizeof(float) * K) : nullptr;
    if (!xp || (act && !row)) {
        free(xp); free(row);
        return QWENLAB_NO_MEMORY;
    }
    for (int64_t m = 0; m < M; ++m) {
        const float* in = x + m * K;
        if (act) {
            silu_mul_row(x + m * 2 * K, x + m * 2 * K + K, K, row);
            in = row;
        }
        prepare_row(in, K, job.Kp, job.path, (char*)xp + m * job.Kp * elem);
    }
    job.xp = xp;
    if ((double)M * rows * K < (1 << 18)) nthreads = 1;  // tiny layers: waking a second thread costs more
    const qwenlab_pool::ChunkFn fn = job.path == BF16_DOT ? float_chunk<BF16_DOT>
                                    : job.path == BF16_WIDEN ? float_chunk<BF16_WIDEN> : float_chunk<FP32>;
    pool().run(fn, &job, chunks, nthreads);
    free(xp); free(row);
    return QWENLAB_OK;
}

extern "C" {

// Lengths count elements (x, y, bias: floats; w: bf16 or fp32 values). bits: 16 (bf16) or 32 (fp32).
int qwenlab_gemm_float(const float* x, int64_t x_len, int64_t M, int64_t K, const void* w, int64_t w_len,
                       int64_t bits, int64_t N, const float* bias, int64_t bias_len, float* y, int64_t y_len,
                       int nthreads, int act) {
    const int64_t limit = (int64_t)1 << 31;
    if (M < 0 || M >= limit || K <= 0 || K >= limit || N <= 0 || N >= limit || (bits != 16 && bits != 32) ||
        (act != 0 && act != 1) || !w || !y || (M > 0 && !x))
        return QWENLAB_BAD_SIZES;
    if (!has_elems(x_len, {M, K, act ? 2 : 1}) || !has_elems(y_len, {M, N}) || !has_elems(w_len, {N, K}) ||
        (bias && !has_elems(bias_len, {N})))
        return QWENLAB_BAD_SIZES;
    return run_float_linears(x, M, K, (int)bits, 1, &w, &bias, &y, &N, N, nthreads, act);
}

// The bf16 path in use: request 1 turns vdpbf16ps on (Python asks only after qwenlab_probe_bf16 ran in a
// child), 0 forces the widening path (tests, QWENLAB_FLOAT_KERNEL=avx512f), -1 only asks.
// Returns 1 for avx512bf16, 0 for the widening path.
int qwenlab_float_path(int request) {
    if (request == 0 || request == 1) use_bf16_dot.store(request);
    return use_bf16_dot.load();
}

// One vdpbf16ps on `seed` in every bf16 slot: each fp32 lane gets 2 * seed * seed. Run in a child process.
__attribute__((target("avx512bf16"))) int qwenlab_probe_bf16(int seed) {
    float f = (float)seed;
    uint32_t bits;
    memcpy(&bits, &f, 4);
    const __m512bh v = (__m512bh)_mm512_set1_epi16((short)(bits >> 16));
    return (int)_mm512_cvtss_f32(_mm512_dpbf16_ps(_mm512_setzero_ps(), v, v));
}

// A STREAM-like read: the sum of x [n] on nthreads threads (the pool the matmuls use), written to *out.
// Python times it to know how fast this machine streams memory (the bound of a decode step).
int qwenlab_read_bandwidth(const float* x, int64_t x_len, int nthreads, double* out) {
    if (!x || !out || x_len <= 0) return QWENLAB_BAD_SIZES;
    struct Job {
        const float* x;
        int64_t n, per;
        double* sums;
    };
    const int64_t per = 1 << 18;  // floats per chunk (1 MiB)
    const int64_t chunks = (x_len + per - 1) / per;
    double* sums = (double*)calloc(chunks, sizeof(double));
    if (!sums) return QWENLAB_NO_MEMORY;
    Job job{x, x_len, per, sums};
    pool().run([](const void* p, int64_t c) {
        const Job& j = *(const Job*)p;
        const int64_t begin = c * j.per, end = begin + j.per < j.n ? begin + j.per : j.n;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t k = begin;
        for (; k + 64 <= end; k += 64) {
            a0 = _mm512_add_ps(a0, _mm512_loadu_ps(j.x + k));
            a1 = _mm512_add_ps(a1, _mm512_loadu_ps(j.x + k + 16));
            a2 = _mm512_add_ps(a2, _mm512_loadu_ps(j.x + k + 32));
            a3 = _mm512_add_ps(a3, _mm512_loadu_ps(j.x + k + 48));
        }
        double s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        for (; k < end; ++k) s += j.x[k];
        j.sums[c] = s;
    }, &job, chunks, nthreads);
    double total = 0;
    for (int64_t c = 0; c < chunks; ++c) total += sums[c];
    free(sums);
    *out = total;
    return QWENLAB_OK;
}
}
