// Group-wise int8 / int4 weight x dynamic int8 activation matmul for x86 CPUs with AVX-512 VNNI.
//
// y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), with w = s[n, g] * (q[n, k] - z[n, g]) per group g of
// `gs` columns. Activations are quantized on the fly to int8 in blocks of 32 (scale xs = amax / 127,
// the llama.cpp Q8 scheme), so each 32-block contributes xs * (s * dot(q, xq) + m * sum(xq)) with
// m = -s * z for int4; int8 weights are stored as u8 = q + 128 and corrected by 128 * sum(xq).
//
// Weight layout (prepared by qwenlab.quant.native.pack_*): rows in blocks of 16; one 64-byte vector
// holds 4 consecutive k for all 16 rows, so one VNNI instruction (vpdpbusd: u8 x s8 -> int32, 4
// products per lane) advances 16 rows while the activation quad is a broadcast. int4 packs two
// quads per vector (low nibbles k..k+3, high nibbles k+4..k+7). Four row blocks (64 rows) form a
// row group whose vectors are interleaved [32-column block][quad][row block], so a decode step reads
// each row group front to back, one sequential stream the hardware prefetcher follows.
// Scales and m are fp16 laid out [N/64, G, 4, 16].
//
// With act = 1 the input is a fused gate|up output x [M, 2K] and the matmul's input is
// silu(x[:, :K]) * x[:, K:], computed row by row while quantizing (the MLP's down projection):
// no [M, K] intermediate, and two fewer PyTorch ops per layer per decode step.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "pool.h"
#include "vec.h"

#define XB 32  // activation block

static void quantize_row(const float* x, int64_t K, int8_t* xq, float* xs, int32_t* xsum) {
    for (int64_t b = 0; b < K / XB; ++b) {
        __m512 v0 = _mm512_loadu_ps(x + b * XB), v1 = _mm512_loadu_ps(x + b * XB + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float scale = amax / 127.0f;
        __m512 inv = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));  // round to nearest even
        __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
        _mm_storeu_si128((__m128i*)(xq + b * XB), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i*)(xq + b * XB + 16), _mm512_cvtsepi32_epi8(q1));
        xs[b] = scale;
        xsum[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
}

static inline __m512i bcast4(const int8_t* p) { int32_t v; memcpy(&v, p, 4); return _mm512_set1_epi32(v); }

constexpr int RG = 4;  // row blocks per row group
// Decode also prefetches a page ahead of each weight line it reads (the row group is one stream; the
// hardware prefetcher stops at each 4 KiB page), as the float kernel does. Its effect here is unproven: an
// A/B minutes apart gave the 0.5B int4 model 95-101 tok/s without and 113-114 with (int8 65-66 -> 69), but
// benchmarks/decode_bound_bench.py's alternating rounds gave 1.02x (int4) and 0.99x (int8) (AMD EPYC).
constexpr int64_t PREFETCH_BYTES = 4096;

// Row blocks r0..r0+RB-1 of one row group, for T tokens: RB*T independent accumulator chains
// hide the VNNI latency.
template <int BITS, int T, int RB>
static inline void row_blocks(const uint8_t* w, const uint16_t* s, const uint16_t* mz, int r0, int64_t K, int64_t gs,
                              const int8_t* xq, const float* xs, const int32_t* xsum, float* y, int64_t N,
                              const float* bias) {
    constexpr int BPB = BITS == 8 ? 512 : 256;  // bytes per 16 rows x 32 columns
    const int64_t KB = K / XB;
    __m512 acc[RB][T];
    for (int r = 0; r < RB; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int64_t b = 0; b < KB; ++b) {
        const uint8_t* wb = w + b * RG * BPB;  // this 32-column block of the row group: [quad][row block][64 B]
        __m512i ia[RB][T];
        for (int r = 0; r < RB; ++r)
            for (int t = 0; t < T; ++t) ia[r][t] = _mm512_setzero_si512();
        if (BITS == 8) {
            for (int q = 0; q < 8; ++q) {
                __m512i xv[T];
                for (int t = 0; t < T; ++t) xv[t] = bcast4(xq + t * K + b * XB + q * 4);
                for (int r = 0; r < RB; ++r) {
                    if (T == 1) _mm_prefetch((const char*)wb + (q * RG + r0 + r) * 64 + PREFETCH_BYTES, _MM_HINT_T0);
                    __m512i wv = _mm512_loadu_si512(wb + (q * RG + r0 + r) * 64);
                    for (int t = 0; t < T; ++t) ia[r][t] = _mm512_dpbusd_epi32(ia[r][t], wv, xv[t]);
                }
            }
        } else {
            for (int o = 0; o < 4; ++o) {
                __m512i xl[T], xh[T];
                for (int t = 0; t < T; ++t) {
                    xl[t] = bcast4(xq + t * K + b * XB + o * 8);
                    xh[t] = bcast4(xq + t * K + b * XB + o * 8 + 4);
                }
                for (int r = 0; r < RB; ++r) {
                    if (T == 1) _mm_prefetch((const char*)wb + (o * RG + r0 + r) * 64 + PREFETCH_BYTES, _MM_HINT_T0);
                    __m512i v = _mm512_loadu_si512(wb + (o * RG + r0 + r) * 64);
                    __m512i lo = _mm512_and_si512(v, low);
                    __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                    for (int t = 0; t < T; ++t) {
                        ia[r][t] = _mm512_dpbusd_epi32(ia[r][t], lo, xl[t]);
                        ia[r][t] = _mm512_dpbusd_epi32(ia[r][t], hi, xh[t]);
                    }
                }
            }
        }
        const int64_t g = (b * XB) / gs;
        for (int r = 0; r < RB; ++r) {
            const int64_t p = (g * RG + r0 + r) * 16;
            __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s + p)));
            if (BITS == 8) {
                for (int t = 0; t < T; ++t) {
                    __m512i c = _mm512_sub_epi32(ia[r][t], _mm512_set1_epi32(128 * xsum[t * KB + b]));
                    __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(c), sv);
                    acc[r][t] = _mm512_fmadd_ps(f, _mm512_set1_ps(xs[t * KB + b]), acc[r][t]);
                }
            } else {
                __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(mz + p)));
                for (int t = 0; t < T; ++t) {
                    __m512 f = _mm512_fmadd_ps(mv, _mm512_set1_ps((float)xsum[t * KB + b]),
                                               _mm512_mul_ps(_mm512_cvtepi32_ps(ia[r][t]), sv));
                    acc[r][t] = _mm512_fmadd_ps(f, _mm512_set1_ps(xs[t * KB + b]), acc[r][t]);
                }
            }
        }
    }
    for (int r = 0; r < RB; ++r) {
        __m512 bv = bias ? _mm512_loadu_ps(bias + (r0 + r) * 16) : _mm512_setzero_ps();
        for (int t = 0; t < T; ++t) _mm512_storeu_ps(y + t * N + (r0 + r) * 16, _mm512_add_ps(acc[r][t], bv));
    }
}

namespace {
using qwenlab_pool::pool;

struct GemmJob {
    const float* x;
    int64_t M, K, N, gs, KB, G, rows_per_chunk;
    int act;  // 0: x is the input [M, K]; 1: x is gate|up [M, 2K] and the input is silu(gate) * up
    const uint8_t* w;
    const uint16_t *s, *mz;
    const float* bias;
    float* y;
    int64_t ldy;  // y's row stride: N, or more when y is a column slice of a wider output (side by side)
    int8_t* xq;
    float* xs;
    int32_t* xsum;
    mutable std::atomic<bool> out_of_memory{false};  // set by a chunk whose buffer could not be allocated
};

void quantize_chunk(const void* p, int64_t chunk) {
    const GemmJob& j = *(const GemmJob*)p;
    const int64_t end = (chunk + 1) * j.rows_per_chunk < j.M ? (chunk + 1) * j.rows_per_chunk : j.M;
    float* row = j.act ? (float*)aligned_alloc(64, ((j.K * sizeof(float) + 63) / 64) * 64) : nullptr;
    if (j.act && !row) {
        j.out_of_memory.store(true);
        return;
    }
    for (int64_t m = chunk * j.rows_per_chunk; m < end; ++m) {
        const float* in = j.x + m * j.K;
        if (j.act) {
            silu_mul_row(j.x + m * 2 * j.K, j.x + m * 2 * j.K + j.K, j.K, row);
            in = row;
        }
        quantize_row(in, j.K, j.xq + m * j.K, j.xs + m * j.KB, j.xsum + m * j.KB);
    }
    free(row);
}

constexpr int64_t GROUPS_PER_CHUNK = 2;  // 128 rows: small enough to balance, large enough to stream

template <int BITS>
void gemm_chunk(const void* p, int64_t chunk) {
    const GemmJob& j = *(const GemmJob*)p;
    const int64_t K = j.K, N = j.N, KB = j.KB, NG = N / (16 * RG);
    const int64_t wgroup = (BITS == 8 ? 16 : 8) * K * RG;  // bytes per row group
    const int64_t pgroup = j.G * 16 * RG;                  // scales (and mins) per row group
    const int64_t last = (chunk + 1) * GROUPS_PER_CHUNK < NG ? (chunk + 1) * GROUPS_PER_CHUNK : NG;
    for (int64_t i = chunk * GROUPS_PER_CHUNK; i < last; ++i) {
        const uint8_t* wg = j.w + i * wgroup;
        const uint16_t* sg = j.s + i * pgroup;
        const uint16_t* mg = j.mz ? j.mz + i * pgroup : nullptr;
        const float* bg = j.bias ? j.bias + i * 16 * RG : nullptr;
        float* yg = j.y + i * 16 * RG;
        int64_t m = 0;
        for (; m + 4 <= j.M; m += 4)  // prefill: 4 tokens x 2 row blocks, weights re-read from L1/L2
            for (int r0 = 0; r0 < RG; r0 += 2)
                row_blocks<BITS, 4, 2>(wg, sg, mg, r0, K, j.gs, j.xq + m * K, j.xs + m * KB, j.xsum + m * KB,
                                       yg + m * j.ldy, j.ldy, bg);
        for (; m < j.M; ++m)  // decode: 1 token x 4 row blocks
            row_blocks<BITS, 1, RG>(wg, sg, mg, 0, K, j.gs, j.xq + m * K, j.xs + m * KB, j.xsum + m * KB,
                                    yg + m * j.ldy, j.ldy, bg);
    }
}
}  // namespace

// The dimensions and buffer lengths (in elements) a matmul needs, checked once per call before any work:
// N a multiple of 64 (the Python side pads rows), K a multiple of 32 and of gs, and every buffer exactly
// as long as those imply. Anything else (a bug, or a crafted model file that got past the loader) is
// refused instead of read past its end. Each dimension stays under 2^31, so the kernel's own index
// arithmetic cannot overflow either.
static bool gemm_args_ok(int bits, const float* x, int64_t x_len, int64_t M, int64_t K, const uint8_t* w,
                         int64_t w_len, const uint16_t* s, int64_t s_len, const uint16_t* mz, int64_t mz_len,
                         int64_t N, int64_t gs, const float* bias, int64_t bias_len, const float* y, int64_t y_len,
                         int act) {
    const int64_t limit = (int64_t)1 << 31;
    if (M < 0 || M >= limit || K <= 0 || K >= limit || N <= 0 || N >= limit || gs <= 0 || gs >= limit) return false;
    if (K % XB || gs % XB || K % gs || N % (16 * RG) || (act != 0 && act != 1)) return false;
    if (!x || !w || !s || !y || (bits == 4 && !mz)) return false;
    return has_elems(x_len, {M, K, act ? 2 : 1}) && has_elems(y_len, {M, N}) &&
           has_elems(w_len, {N, bits == 8 ? K : K / 2}) && has_elems(s_len, {N, K / gs}) &&
           (bits == 8 || has_elems(mz_len, {N, K / gs})) && (!bias || has_elems(bias_len, {N}));
}

// Jobs that share x, M, K and act (each its own weights, output columns y and stride ldy): x is quantized
// once, into jobs[0]'s buffers, and every job's row groups are chunks of one pool job. One job is a plain
// matmul; several are the decode stack's q, k, v (or gate, up) kept apart for adapters, written side by
// side. As separate calls, each paid its own quantization of x, allocations and two pool hand-offs (k and
// v too small for a second thread) plus a copy into place: the adapter server's decode step ran ~20%
// slower than the fused base's.
struct JobList {
    GemmJob* jobs;
    int64_t first[4];  // first[i]: job i's first chunk; first[n]: the total
    int n;
};

template <int BITS>
void job_list_chunk(const void* p, int64_t chunk) {
    const JobList& j = *(const JobList*)p;
    int i = 0;
    while (i + 1 < j.n && chunk >= j.first[i + 1]) ++i;
    gemm_chunk<BITS>(&j.jobs[i], chunk - j.first[i]);
}

template <int BITS>
static int run_jobs(GemmJob* jobs, int n, int nthreads) {
    GemmJob& lead = jobs[0];
    const int64_t M = lead.M, K = lead.K;
    if (M == 0) return QWENLAB_OK;  // no rows: nothing to compute (and malloc(0) may return null)
    lead.xq = (int8_t*)aligned_alloc(64, ((M * K + 63) / 64) * 64);
    lead.xs = (float*)malloc(sizeof(float) * M * lead.KB);
    lead.xsum = (int32_t*)malloc(sizeof(int32_t) * M * lead.KB);
    int status = QWENLAB_NO_MEMORY;
    if (lead.xq && lead.xs && lead.xsum) {
        pool().run(quantize_chunk, &lead, (M + lead.rows_per_chunk - 1) / lead.rows_per_chunk, nthreads);
        if (!lead.out_of_memory.load()) {
            JobList list{jobs, {0, 0, 0, 0}, n};
            for (int i = 0; i < n; ++i) {
                jobs[i].xq = lead.xq, jobs[i].xs = lead.xs, jobs[i].xsum = lead.xsum;
                const int64_t NG = jobs[i].N / (16 * RG);
                list.first[i + 1] = list.first[i] + (NG + GROUPS_PER_CHUNK - 1) / GROUPS_PER_CHUNK;
            }
            pool().run(job_list_chunk<BITS>, &list, list.first[n], nthreads);
            status = QWENLAB_OK;
        }
    }
    free(lead.xq); free(lead.xs); free(lead.xsum);
    return status;
}

template <int BITS>
static int gemm(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* s, const uint16_t* mz,
                int64_t N, int64_t gs, const float* bias, float* y, int nthreads, int act) {
    if ((double)M * N * K < (1 << 18)) nthreads = 1;  // tiny layers: waking a second thread costs more than it saves
    GemmJob job{x, M, K, N, gs, K / XB, K / gs, 16, act, w, s, mz, bias, y, N, nullptr, nullptr, nullptr};
    return run_jobs<BITS>(&job, 1, nthreads);
}

// The decode stack's side-by-side linears (run_jobs above); arguments already checked there (linear_ok):
// every segment shares bits and K, and y[i] is segment i's first column in y [M, ldy].
int run_quant_linears(const float* x, int64_t M, int64_t K, int bits, int nseg, const uint8_t* const* w,
                      const uint16_t* const* s, const uint16_t* const* mz, const float* const* bias,
                      const int64_t* N, const int64_t* gs, float* const* y, int64_t ldy, int nthreads) {
    if (nseg < 1 || nseg > 3 || (bits != 8 && bits != 4)) return QWENLAB_BAD_SIZES;
    if ((double)M * ldy * K < (1 << 18)) nthreads = 1;
    GemmJob jobs[3] = {};
    for (int i = 0; i < nseg; ++i) {
        GemmJob& j = jobs[i];
        j.x = x, j.M = M, j.K = K, j.N = N[i], j.gs = gs[i], j.KB = K / XB, j.G = K / gs[i], j.rows_per_chunk = 16;
        j.act = 0, j.w = w[i], j.s = s[i], j.mz = mz[i], j.bias = bias[i], j.y = y[i], j.ldy = ldy;
    }
    return bits == 8 ? run_jobs<8>(jobs, nseg, nthreads) : run_jobs<4>(jobs, nseg, nthreads);
}

extern "C" {

// Lengths count elements of each buffer's type (x, y, bias: floats; w: bytes; s, mz: fp16 values).
int qwenlab_gemm_int8(const float* x, int64_t x_len, int64_t M, int64_t K, const uint8_t* w, int64_t w_len,
                      const uint16_t* s, int64_t s_len, int64_t N, int64_t gs, const float* bias, int64_t bias_len,
                      float* y, int64_t y_len, int nthreads, int act) {
    if (!gemm_args_ok(8, x, x_len, M, K, w, w_len, s, s_len, nullptr, 0, N, gs, bias, bias_len, y, y_len, act))
        return QWENLAB_BAD_SIZES;
    return gemm<8>(x, M, K, w, s, nullptr, N, gs, bias, y, nthreads, act);
}

int qwenlab_gemm_int4(const float* x, int64_t x_len, int64_t M, int64_t K, const uint8_t* w, int64_t w_len,
                      const uint16_t* s, int64_t s_len, const uint16_t* mz, int64_t mz_len, int64_t N, int64_t gs,
                      const float* bias, int64_t bias_len, float* y, int64_t y_len, int nthreads, int act) {
    if (!gemm_args_ok(4, x, x_len, M, K, w, w_len, s, s_len, mz, mz_len, N, gs, bias, bias_len, y, y_len, act))
        return QWENLAB_BAD_SIZES;
    return gemm<4>(x, M, K, w, s, mz, N, gs, bias, y, nthreads, act);
}
}

// ---- prefill through bf16 matmuls: the packed weight dequantized, transposed, to bf16 wt [K, N] ----------------
// A long prompt is compute-bound, and where the CPU has AMX-BF16, PyTorch's oneDNN bf16 matmul runs ~3x faster
// than the VNNI loop above. One pass over the packed layout writes wt[k, n] = w[n, k] in bf16: a 64-byte vector
// holds k..k+3 of 16 consecutive rows, so byte j of every lane is column k+j of those rows, 16 contiguous
// outputs in wt. Rounding to bf16 is to nearest even (8 bits of mantissa, well under int4's step).
namespace {
struct DequantJob {
    const uint8_t* w;
    const uint16_t *s, *mz;
    int64_t N, K, gs, G;
    uint16_t* wt;
    int bits;
};

static inline __m256i to_bf16(__m512 v) {
    __m512i b = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    b = _mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16));
}

void dequant_chunk(const void* p, int64_t i) {  // row group i: rows 64i .. 64i+63, every column
    const DequantJob& j = *(const DequantJob*)p;
    const int64_t KB = j.K / XB, wgroup = (j.bits == 8 ? 16 : 8) * j.K * RG, pgroup = j.G * 16 * RG;
    const uint8_t* wg = j.w + i * wgroup;
    const uint16_t* sg = j.s + i * pgroup;
    const uint16_t* mg = j.mz ? j.mz + i * pgroup : nullptr;
    const __m512i byte = _mm512_set1_epi32(0xFF), nib = _mm512_set1_epi32(0x0F);
    const int BPB = j.bits == 8 ? 512 : 256;
    for (int64_t b = 0; b < KB; ++b) {
        const uint8_t* wb = wg + b * RG * BPB;
        const int64_t g = (b * XB) / j.gs;
        __m512 sv[RG], mv[RG];  // the 4 row blocks' scales (and int4 mins, int8 offsets) for this group
        for (int r = 0; r < RG; ++r) {
            sv[r] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sg + (g * RG + r) * 16)));
            mv[r] = j.bits == 8 ? _mm512_mul_ps(sv[r], _mm512_set1_ps(-128.0f))  // u8 = q + 128
                                : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(mg + (g * RG + r) * 16)));
        }
        // The row blocks innermost: each column's 64 rows are one 128-byte run of wt, two whole cache lines.
        uint16_t* out = j.wt + (b * XB) * j.N + i * 16 * RG;
        if (j.bits == 8) {
            for (int q = 0; q < 8; ++q)
                for (int c = 0; c < 4; ++c)
                    for (int r = 0; r < RG; ++r) {
                        const __m512i v = _mm512_loadu_si512(wb + (q * RG + r) * 64);
                        __m512 f = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 8 * c), byte));
                        _mm256_storeu_si256((__m256i*)(out + (q * 4 + c) * j.N + r * 16),
                                            to_bf16(_mm512_fmadd_ps(f, sv[r], mv[r])));
                    }
        } else {
            for (int o = 0; o < 4; ++o)
                for (int c = 0; c < 4; ++c)
                    for (int r = 0; r < RG; ++r) {
                        const __m512i v = _mm512_loadu_si512(wb + (o * RG + r) * 64);
                        __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 8 * c), nib));
                        __m512 hi = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 8 * c + 4), nib));
                        _mm256_storeu_si256((__m256i*)(out + (o * 8 + c) * j.N + r * 16),
                                            to_bf16(_mm512_fmadd_ps(lo, sv[r], mv[r])));
                        _mm256_storeu_si256((__m256i*)(out + (o * 8 + 4 + c) * j.N + r * 16),
                                            to_bf16(_mm512_fmadd_ps(hi, sv[r], mv[r])));
                    }
        }
    }
}
}  // namespace

extern "C" {
// wt [K, N] bf16 (N the packed, padded rows) from a packed int8 (mz null) or int4 weight; lengths in elements.
int qwenlab_dequant_bf16(int bits, const uint8_t* w, int64_t w_len, const uint16_t* s, int64_t s_len,
                         const uint16_t* mz, int64_t mz_len, int64_t N, int64_t K, int64_t gs, uint16_t* wt,
                         int64_t wt_len, int nthreads) {
    const int64_t limit = (int64_t)1 << 31;
    if ((bits != 8 && bits != 4) || K <= 0 || K >= limit || N <= 0 || N >= limit || gs <= 0 || gs >= limit ||
        K % XB || gs % XB || K % gs || N % (16 * RG) || !w || !s || !wt || (bits == 4 && !mz))
        return QWENLAB_BAD_SIZES;
    if (!has_elems(w_len, {N, bits == 8 ? K : K / 2}) || !has_elems(s_len, {N, K / gs}) ||
        (bits == 4 && !has_elems(mz_len, {N, K / gs})) || !has_elems(wt_len, {K, N}))
        return QWENLAB_BAD_SIZES;
    DequantJob job{w, s, bits == 4 ? mz : nullptr, N, K, gs, K / gs, wt, bits};
    pool().run(dequant_chunk, &job, N / (16 * RG), nthreads);
    return QWENLAB_OK;
}
}
