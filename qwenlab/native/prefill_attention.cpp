// Attention for a prompt (T new tokens per row) for one layer, fused: RoPE on q and k, the new k/v written into
// the KV cache, and causal softmax(q kᵀ / √D) v over each row's cached slots, in fp32 on the kernels' threads.
//
// PyTorch's path for the same work is ~12 ops (the rotate-half RoPE, two cache copies, SDPA, transposes); on the
// 0.5B shape at 512 tokens its SDPA alone took 254 of a 630 ms int8 prefill (the quantized models run PyTorch's
// ops on one thread). Here the attention is blocked flash-style: a job is one (row, kv head, block of QB query
// positions), i.e. the H / Hkv query heads that share a kv head (GQA) times QB positions, so each packed key block
// serves every query head of its group. Scores for KB keys at a time go through an online softmax (running max
// and sum per query), so memory stays O(job) at any context length.
//
// Inputs: q [B T, Hq D], k and v [B T, Hkv D], each with its own row stride (they may be slices of one fused
// q|k|v output); cos/sin [B, T, D] in HF's rotate-half layout; caches [B, Hkv, cap, D]. Row b's new tokens go
// to slots start .. start + T - 1. A query at slot p attends to slots lo .. p, where lo = starts[b] (the row's
// leading padding slots, never read; NULL: 0), except that a padding query (p < starts[b]) attends to itself
// only, as the model core's mask has it. out is [B, T, Hq D].
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>

#include "pool.h"
#include "vec.h"

namespace {
constexpr int64_t QB = 16;  // query positions per job
constexpr int64_t KB = 64;  // keys per block (4 vectors of scores per query)
constexpr int64_t RT = 4;   // query rows per register tile

// out = x * cos + rotate_half(x) * sin, the model core's formula, 16 lanes at a time where the half allows.
static inline void rope_row(const float* x, const float* cos, const float* sin, int64_t D, float scale, float* out) {
    const int64_t half = D / 2;
    int64_t i = 0;
    const __m512 s = _mm512_set1_ps(scale);
    for (; i + 16 <= half; i += 16) {
        const __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + half + i);
        const __m512 lo = _mm512_sub_ps(_mm512_mul_ps(a, _mm512_loadu_ps(cos + i)), _mm512_mul_ps(b, _mm512_loadu_ps(sin + i)));
        const __m512 hi = _mm512_add_ps(_mm512_mul_ps(b, _mm512_loadu_ps(cos + half + i)),
                                        _mm512_mul_ps(a, _mm512_loadu_ps(sin + half + i)));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(lo, s));
        _mm512_storeu_ps(out + half + i, _mm512_mul_ps(hi, s));
    }
    for (; i < half; ++i) {
        out[i] = (x[i] * cos[i] - x[half + i] * sin[i]) * scale;
        out[half + i] = (x[half + i] * cos[half + i] + x[i] * sin[half + i]) * scale;
    }
}

struct PrefillJob {
    const float *q, *k, *v;  // the projections' rows (strides q_ld, k_ld, v_ld)
    int64_t q_ld, k_ld, v_ld;
    const float *cos, *sin;
    float *kcache, *vcache;
    float* qr;  // [B, Hq, T, D]: q with RoPE, times 1/√D
    float* out;
    const int64_t* starts;
    int64_t B, T, Hq, Hkv, D, cap, start, nqb;
    float scale;
    mutable std::atomic<bool> out_of_memory{false};  // set by a job whose scratch could not be allocated
};

// RoPE and the cache write for token row `chunk` (= b T + t).
void rope_chunk(const void* p, int64_t chunk) {
    const PrefillJob& j = *(const PrefillJob*)p;
    const int64_t b = chunk / j.T, t = chunk % j.T, D = j.D, slot = j.start + t;
    const float *c = j.cos + chunk * D, *s = j.sin + chunk * D;
    for (int64_t h = 0; h < j.Hq; ++h)
        rope_row(j.q + chunk * j.q_ld + h * D, c, s, D, j.scale, j.qr + ((b * j.Hq + h) * j.T + t) * D);
    for (int64_t g = 0; g < j.Hkv; ++g) {
        const int64_t at = ((b * j.Hkv + g) * j.cap + slot) * D;
        rope_row(j.k + chunk * j.k_ld + g * D, c, s, D, 1.0f, j.kcache + at);
        memcpy(j.vcache + at, j.v + chunk * j.v_ld + g * D, sizeof(float) * D);
    }
}

// s[r][0..KB) = q_r · kt[.][0..KB) for n (<= RT) rows.
template <int N>
static inline void scores_tile(const float* const* q, const float* kt, int64_t D, float* s) {
    __m512 acc[N][4];
    for (int r = 0; r < N; ++r)
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
        const float* kd = kt + d * KB;
        const __m512 k0 = _mm512_loadu_ps(kd), k1 = _mm512_loadu_ps(kd + 16), k2 = _mm512_loadu_ps(kd + 32),
                     k3 = _mm512_loadu_ps(kd + 48);
        for (int r = 0; r < N; ++r) {
            const __m512 x = _mm512_set1_ps(q[r][d]);
            acc[r][0] = _mm512_fmadd_ps(x, k0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(x, k1, acc[r][1]);
            acc[r][2] = _mm512_fmadd_ps(x, k2, acc[r][2]);
            acc[r][3] = _mm512_fmadd_ps(x, k3, acc[r][3]);
        }
    }
    for (int r = 0; r < N; ++r)
        for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + r * KB + c * 16, acc[r][c]);
}

// o[r][d0 .. d0 + 16 NV) += sum_c p[r][c] v[c][d0 .. d0 + 16 NV) for N (<= RT) rows and kn keys.
template <int N, int NV>
static inline void values_tile(const float* p, const float* v, int64_t v_stride, int64_t kn, float* const* o,
                               int64_t d0) {
    __m512 acc[N][NV];
    for (int r = 0; r < N; ++r)
        for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_loadu_ps(o[r] + d0 + c * 16);
    for (int64_t c = 0; c < kn; ++c) {
        const float* vc = v + c * v_stride + d0;
        __m512 vv[NV];
        for (int i = 0; i < NV; ++i) vv[i] = _mm512_loadu_ps(vc + i * 16);
        for (int r = 0; r < N; ++r) {
            const __m512 w = _mm512_set1_ps(p[r * KB + c]);
            for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_fmadd_ps(w, vv[i], acc[r][i]);
        }
    }
    for (int r = 0; r < N; ++r)
        for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o[r] + d0 + c * 16, acc[r][c]);
}

template <int N>
static inline void tile_rows(const float* const* q, const float* kt, int64_t D, float* s, const float* p,
                             const float* v, int64_t kn, float* const* o, bool scores) {
    if (scores) {
        scores_tile<N>(q, kt, D, s);
        return;
    }
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) values_tile<N, 4>(p, v, D, kn, o, d0);
    switch ((D - d0) / 16) {  // D is a multiple of 16
        case 3: values_tile<N, 3>(p, v, D, kn, o, d0); break;
        case 2: values_tile<N, 2>(p, v, D, kn, o, d0); break;
        case 1: values_tile<N, 1>(p, v, D, kn, o, d0); break;
        default: break;
    }
}

// Runs `scores` (s = q kᵀ) or the values update (o += p v) over all `rows`, RT rows at a time.
static void over_tiles(int64_t rows, const float* const* q, const float* kt, int64_t D, float* s, const float* v,
                       int64_t kn, float* const* o, bool scores) {
    int64_t r = 0;
    for (; r + RT <= rows; r += RT) tile_rows<RT>(q + r, kt, D, s + r * KB, s + r * KB, v, kn, o + r, scores);
    switch (rows - r) {
        case 3: tile_rows<3>(q + r, kt, D, s + r * KB, s + r * KB, v, kn, o + r, scores); break;
        case 2: tile_rows<2>(q + r, kt, D, s + r * KB, s + r * KB, v, kn, o + r, scores); break;
        case 1: tile_rows<1>(q + r, kt, D, s + r * KB, s + r * KB, v, kn, o + r, scores); break;
        default: break;
    }
}

// One job: kv head g of row b, query positions qb QB .. +QB, all Hq / Hkv query heads of g. Later blocks (more
// keys) come first, so the last jobs the pool hands out are the short ones.
void attend_chunk(const void* p, int64_t chunk) {
    const PrefillJob& j = *(const PrefillJob*)p;
    const int64_t qb = j.nqb - 1 - chunk % j.nqb, g = (chunk / j.nqb) % j.Hkv, b = chunk / (j.nqb * j.Hkv);
    const int64_t D = j.D, group = j.Hq / j.Hkv, t0 = qb * QB, nt = j.T - t0 < QB ? j.T - t0 : QB;
    const int64_t rows = group * nt, first = j.starts ? j.starts[b] : 0;
    // One allocation: kt [D][KB], s [rows][KB], o [rows][D], m, l [rows]; lo/hi [rows]; row pointers.
    const int64_t floats = D * KB + rows * KB + rows * D + 2 * rows;
    char* mem = (char*)aligned_alloc(64, ((floats * 4 + rows * 32 + 63) / 64) * 64);
    if (!mem) {
        j.out_of_memory.store(true);
        return;
    }
    float* kt = (float*)mem;
    float* s = kt + D * KB;
    float* o = s + rows * KB;
    float *m = o + rows * D, *l = m + rows;
    int64_t* lo = (int64_t*)(l + rows);
    int64_t* hi = lo + rows;
    const float** qrow = (const float**)(hi + rows);
    float** orow = (float**)(qrow + rows);
    int64_t kmin = INT64_MAX, kmax = 0;
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t h = g * group + r / nt, t = t0 + r % nt, slot = j.start + t;
        qrow[r] = j.qr + ((b * j.Hq + h) * j.T + t) * D;
        orow[r] = o + r * D;
        lo[r] = slot < first ? slot : first;  // a padding query sees itself only
        hi[r] = slot;
        kmin = lo[r] < kmin ? lo[r] : kmin;
        kmax = slot > kmax ? slot : kmax;
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    memset(o, 0, sizeof(float) * rows * D);
    const float* K = j.kcache + (b * j.Hkv + g) * j.cap * D;
    const float* V = j.vcache + (b * j.Hkv + g) * j.cap * D;
    for (int64_t k0 = kmin; k0 <= kmax; k0 += KB) {
        const int64_t kn = kmax + 1 - k0 < KB ? kmax + 1 - k0 : KB;
        for (int64_t c = 0; c < KB; ++c)  // kt[d][c] = K[k0 + c][d]; zero past the block's end
            for (int64_t d = 0; d < D; ++d) kt[d * KB + c] = c < kn ? K[(k0 + c) * D + d] : 0.0f;
        over_tiles(rows, qrow, kt, D, s, nullptr, kn, orow, true);
        for (int64_t r = 0; r < rows; ++r) {  // online softmax over this block's allowed keys
            float* sr = s + r * KB;
            const int64_t a = lo[r] > k0 ? lo[r] - k0 : 0, e = hi[r] + 1 - k0 < kn ? hi[r] + 1 - k0 : kn;
            if (a >= e) {
                memset(sr, 0, sizeof(float) * KB);
                continue;
            }
            float top = m[r];
            for (int64_t c = a; c < e; ++c) top = sr[c] > top ? sr[c] : top;
            const float alpha = expf(m[r] - top);  // 0 on the row's first block (m = -inf)
            float total = 0.0f;
            for (int64_t c = 0; c < KB; c += 16) {
                const int64_t from = a > c ? a - c : 0, to = e - c < 16 ? e - c : 16;  // live lanes [from, to)
                const __mmask16 live = to > from ? (__mmask16)(((1u << to) - 1) & ~((1u << from) - 1)) : 0;
                const __m512 pv = _mm512_maskz_mov_ps(live, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(sr + c),
                                                                                   _mm512_set1_ps(top))));
                _mm512_storeu_ps(sr + c, pv);
                total += _mm512_reduce_add_ps(pv);
            }
            l[r] = l[r] * alpha + total;
            m[r] = top;
            if (alpha != 1.0f) {
                const __m512 av = _mm512_set1_ps(alpha);
                for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(orow[r] + d, _mm512_mul_ps(_mm512_loadu_ps(orow[r] + d), av));
            }
        }
        over_tiles(rows, qrow, kt, D, s, V + k0 * D, kn, orow, false);
    }
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t h = g * group + r / nt, t = t0 + r % nt;
        float* dst = j.out + (b * j.T + t) * j.Hq * D + h * D;
        const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
        for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(dst + d, _mm512_mul_ps(_mm512_loadu_ps(orow[r] + d), inv));
    }
    free(mem);
}

// A strided [rows, width] view fits in `len` floats from its pointer.
static bool strided_fits(int64_t len, int64_t rows, int64_t ld, int64_t width) {
    if (rows == 0) return len >= 0;
    int64_t last;
    if (ld < width || __builtin_mul_overflow(rows - 1, ld, &last) || __builtin_add_overflow(last, width, &last))
        return false;
    return last <= len;
}
}  // namespace

// Lengths count floats from each pointer; q_ld/k_ld/v_ld are row strides in floats. D must be a multiple of 16
// (Qwen2.5: 64 or 128) and Hq a multiple of Hkv, else QWENLAB_NOT_APPLICABLE (the caller takes PyTorch's path).
// start + T <= cap, each starts[b] in [0, start + T - 1], cos/sin B T D, caches B Hkv cap D, out B T Hq D:
// anything else returns QWENLAB_BAD_SIZES before any access.
extern "C" int qwenlab_prefill_attention(const float* q, int64_t q_len, int64_t q_ld, const float* k, int64_t k_len,
                                         int64_t k_ld, const float* v, int64_t v_len, int64_t v_ld, int64_t B,
                                         int64_t T, int64_t Hq, int64_t Hkv, int64_t D, const float* cos,
                                         const float* sin, int64_t cs_len, float* kcache, float* vcache,
                                         int64_t kv_len, int64_t cap, int64_t start, float* out, int64_t out_len,
                                         const int64_t* starts, int nthreads) {
    if (Hkv <= 0 || Hq <= 0 || Hq % Hkv != 0 || D <= 0 || D % 16 != 0) return QWENLAB_NOT_APPLICABLE;
    if (B < 0 || T < 0 || start < 0 || cap < 0 || start > cap - T || !strided_fits(q_len, B * T, q_ld, Hq * D) ||
        !strided_fits(k_len, B * T, k_ld, Hkv * D) || !strided_fits(v_len, B * T, v_ld, Hkv * D) ||
        !has_elems(cs_len, {B, T, D}) || !has_elems(kv_len, {B, Hkv, cap, D}) || !has_elems(out_len, {B, T, Hq, D}))
        return QWENLAB_BAD_SIZES;
    if (B * T == 0) return QWENLAB_OK;
    if (!q || !k || !v || !cos || !sin || !kcache || !vcache || !out) return QWENLAB_BAD_SIZES;
    if (starts)
        for (int64_t b = 0; b < B; ++b)
            if (starts[b] < 0 || starts[b] > start + T - 1) return QWENLAB_BAD_SIZES;
    float* qr = (float*)aligned_alloc(64, ((B * Hq * T * D * 4 + 63) / 64) * 64);
    if (!qr) return QWENLAB_NO_MEMORY;
    const int64_t nqb = (T + QB - 1) / QB;
    PrefillJob job{q, k, v, q_ld, k_ld, v_ld, cos, sin, kcache, vcache, qr, out, starts,
                   B, T, Hq, Hkv, D, cap, start, nqb, 1.0f / sqrtf((float)D)};
    qwenlab_pool::pool().run(rope_chunk, &job, B * T, nthreads);
    qwenlab_pool::pool().run(attend_chunk, &job, B * Hkv * nqb, nthreads);
    free(qr);
    return job.out_of_memory.load() ? QWENLAB_NO_MEMORY : QWENLAB_OK;
}
