// One decode step of attention for one layer, fused: RoPE on q and k, the new k/v written into the
// KV cache, and softmax(q kᵀ / √D) v over every cached slot, per query head (GQA: query head h reads
// kv head h / (Hq / Hkv)). It replaces ~15 small PyTorch ops per layer (views, the rotate-half RoPE,
// two cache copies, SDPA, the output transpose), which cost more than the attention arithmetic
// itself at decode (one new token per row).
//
// qkv [B, (Hq + 2 Hkv) D] is the fused projection output (q heads, then k heads, then v heads);
// cos/sin [B, D] the row's RoPE angles in HF's rotate-half layout; the caches are [B, Hkv, cap, D];
// every row writes slot `pos` and attends to slots starts[b]..pos: starts [B] (NULL: all 0) counts each
// row's leading padding slots, which are never read. out is [B, Hq D].
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"
#include "vec.h"

static inline void rope(const float* x, const float* cos, const float* sin, int64_t D, float* out) {
    const int64_t half = D / 2;
    for (int64_t i = 0; i < half; ++i) {
        out[i] = x[i] * cos[i] - x[i + half] * sin[i];
        out[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
    }
}

namespace {
struct AttentionJob {
    const float* q;  // [B, Hq, D], RoPE applied
    const float *kcache, *vcache;
    float* out;      // [B, Hq D]
    float* scores;   // [B Hq, S]: each (row, head) its own
    const int64_t* starts;
    int64_t Hq, Hkv, D, cap, S;
    float scale;
};

// softmax(q kᵀ / √D) v for one (row, query head) pair: chunk = b Hq + h.
void attend(const void* p, int64_t chunk) {
    const AttentionJob& j = *(const AttentionJob*)p;
    const int64_t b = chunk / j.Hq, h = chunk % j.Hq, g = h / (j.Hq / j.Hkv), D = j.D;
    const int64_t first = j.starts ? j.starts[b] : 0;  // the row's slots first..pos; sc[t] for t in that range
    const float* K = j.kcache + (b * j.Hkv + g) * j.cap * D;
    const float* V = j.vcache + (b * j.Hkv + g) * j.cap * D;
    const float* qh = j.q + chunk * D;
    float* sc = j.scores + chunk * j.S;
    float top = -INFINITY;
    for (int64_t t = first; t < j.S; ++t) {
        sc[t] = dot_f32(qh, K + t * D, D) * j.scale;
        if (sc[t] > top) top = sc[t];
    }
    float total = 0.0f;
    for (int64_t t = first; t < j.S; ++t) total += (sc[t] = expf(sc[t] - top));
    const float inv = 1.0f / total;
    float* o = j.out + chunk * D;
    memset(o, 0, sizeof(float) * D);
    for (int64_t t = first; t < j.S; ++t) {
        const float w = sc[t] * inv;
        const float* v = V + t * D;
        int64_t i = 0;
        const __m512 wv = _mm512_set1_ps(w);
        for (; i + 16 <= D; i += 16)
            _mm512_storeu_ps(o + i, _mm512_fmadd_ps(wv, _mm512_loadu_ps(v + i), _mm512_loadu_ps(o + i)));
        for (; i < D; ++i) o[i] += w * v[i];
    }
}
// softmax(q kᵀ / √D) v for all Hq / Hkv (<= 16) query heads that read kv head g of row b: chunk = b Hkv + g.
// The group's heads sit in the lanes of one vector, so a key's scores for all of them are D fused multiply-adds
// with the key's elements broadcast (no horizontal sums), and its softmax weights one vector exp; 64 keys at a
// time, with a running max and sum per head (online softmax), so any cache length needs no score buffer. Each
// key is read once for the group instead of once per head. The 0.5B shape (14 heads of 64, 2 kv heads, one row,
// 2 threads) at 128 / 512 / 2048 cached slots: 7 / 14 / 44 µs a layer, where the per-head path took 17 / 40 / 148.
constexpr int64_t GROUP_KEYS = 64, GROUP_MAX_D = 256;

void attend_group(const void* p, int64_t chunk) {
    const AttentionJob& j = *(const AttentionJob*)p;
    const int64_t b = chunk / j.Hkv, g = chunk % j.Hkv, G = j.Hq / j.Hkv, D = j.D;
    const int64_t first = j.starts ? j.starts[b] : 0;
    const float* K = j.kcache + (b * j.Hkv + g) * j.cap * D;
    const float* V = j.vcache + (b * j.Hkv + g) * j.cap * D;
    alignas(64) float qt[GROUP_MAX_D][16];  // qt[d][h]: the group's queries, scaled, heads in lanes (zero past G)
    alignas(64) float sc[GROUP_KEYS][16];   // a block's scores, then its weights
    alignas(64) float o[16][GROUP_MAX_D];   // per head, the weighted sum of values so far
    for (int64_t d = 0; d < D; ++d)
        for (int64_t h = 0; h < 16; ++h) qt[d][h] = h < G ? j.q[(b * j.Hq + g * G + h) * D + d] * j.scale : 0.0f;
    for (int64_t h = 0; h < G; ++h) memset(o[h], 0, sizeof(float) * D);
    __m512 m = _mm512_set1_ps(-INFINITY), l = _mm512_setzero_ps();
    for (int64_t k0 = first; k0 < j.S; k0 += GROUP_KEYS) {
        const int64_t kn = j.S - k0 < GROUP_KEYS ? j.S - k0 : GROUP_KEYS;
        const float* kb = K + k0 * D;
        __m512 top = _mm512_set1_ps(-INFINITY);
        int64_t c = 0;
        for (; c + 8 <= kn; c += 8) {  // 8 keys at once: 8 independent chains hide the FMA latency
            __m512 a[8];
            for (int i = 0; i < 8; ++i) a[i] = _mm512_setzero_ps();
            for (int64_t d = 0; d < D; ++d) {
                const __m512 qd = _mm512_load_ps(qt[d]);
                for (int i = 0; i < 8; ++i) a[i] = _mm512_fmadd_ps(qd, _mm512_set1_ps(kb[(c + i) * D + d]), a[i]);
            }
            for (int i = 0; i < 8; ++i) {
                _mm512_store_ps(sc[c + i], a[i]);
                top = _mm512_max_ps(top, a[i]);
            }
        }
        for (; c < kn; ++c) {
            __m512 a = _mm512_setzero_ps();
            for (int64_t d = 0; d < D; ++d) a = _mm512_fmadd_ps(_mm512_load_ps(qt[d]), _mm512_set1_ps(kb[c * D + d]), a);
            _mm512_store_ps(sc[c], a);
            top = _mm512_max_ps(top, a);
        }
        const __m512 m_new = _mm512_max_ps(m, top);
        // exp(-inf - m_new) on the first block: exp_ps clamps to e^-87 (~1e-38), against o and l still 0
        alignas(64) float alpha[16];
        _mm512_store_ps(alpha, exp_ps(_mm512_sub_ps(m, m_new)));
        l = _mm512_mul_ps(l, _mm512_load_ps(alpha));
        for (c = 0; c < kn; ++c) {
            const __m512 w = exp_ps(_mm512_sub_ps(_mm512_load_ps(sc[c]), m_new));
            _mm512_store_ps(sc[c], w);
            l = _mm512_add_ps(l, w);
        }
        m = m_new;
        const float* vb = V + k0 * D;
        for (int64_t h = 0; h < G; ++h) {
            for (int64_t d0 = 0; d0 < D; d0 += 64) {  // 4 vectors of the head's output at a time (D % 16 == 0)
                const int nv = D - d0 >= 64 ? 4 : (int)((D - d0) / 16);
                __m512 acc[4];
                const __m512 scale = _mm512_set1_ps(alpha[h]);
                for (int i = 0; i < nv; ++i) acc[i] = _mm512_mul_ps(_mm512_loadu_ps(o[h] + d0 + 16 * i), scale);
                for (c = 0; c < kn; ++c) {
                    const __m512 w = _mm512_set1_ps(sc[c][h]);
                    for (int i = 0; i < nv; ++i)
                        acc[i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vb + c * D + d0 + 16 * i), acc[i]);
                }
                for (int i = 0; i < nv; ++i) _mm512_storeu_ps(o[h] + d0 + 16 * i, acc[i]);
            }
        }
    }
    alignas(64) float total[16];
    _mm512_store_ps(total, l);
    for (int64_t h = 0; h < G; ++h) {
        float* dst = j.out + (b * j.Hq + g * G + h) * D;
        const __m512 inv = _mm512_set1_ps(1.0f / total[h]);
        for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(dst + d, _mm512_mul_ps(_mm512_loadu_ps(o[h] + d), inv));
    }
}
}  // namespace

// Lengths count floats: qkv_len = B (Hq + 2 Hkv) D, cs_len = B D (cos and sin each), kv_len = B Hkv cap D
// (keys and values each), out_len = B Hq D; starts (if not NULL) has B entries, each in [0, pos]; anything
// else returns QWENLAB_BAD_SIZES before any access. The (row, head) pairs run on the kernels' pool of
// nthreads once the cache is long enough to pay for the hand-off: at 512 cached tokens one thread spent
// ~100 µs a layer here, a tenth of the 0.5B int4 model's decode step.
extern "C" int qwenlab_decode_attention(const float* qkv, int64_t qkv_len, int64_t B, int64_t Hq, int64_t Hkv,
                                        int64_t D, const float* cos, const float* sin, int64_t cs_len, float* kcache,
                                        float* vcache, int64_t kv_len, int64_t cap, int64_t pos, float* out,
                                        int64_t out_len, const int64_t* starts, int nthreads) {
    if (pos < 0 || pos >= cap || Hkv <= 0 || Hq <= 0 || Hq % Hkv != 0 || D <= 0 || D % 2 != 0)
        return QWENLAB_NOT_APPLICABLE;
    if (B < 0 || !has_elems(qkv_len, {B, Hq + 2 * Hkv, D}) || !has_elems(cs_len, {B, D}) ||
        !has_elems(kv_len, {B, Hkv, cap, D}) || !has_elems(out_len, {B, Hq, D}) ||
        (B > 0 && (!qkv || !cos || !sin || !kcache || !vcache || !out)))
        return QWENLAB_BAD_SIZES;
    if (starts)
        for (int64_t b = 0; b < B; ++b)
            if (starts[b] < 0 || starts[b] > pos) return QWENLAB_BAD_SIZES;
    if (B == 0) return QWENLAB_OK;
    const int64_t S = pos + 1, width = (Hq + 2 * Hkv) * D;
    float* q = (float*)malloc(sizeof(float) * B * Hq * (D + S));
    if (!q) return QWENLAB_NO_MEMORY;
    for (int64_t b = 0; b < B; ++b) {  // RoPE on q, and this token's k (RoPE) and v into the cache
        const float* row = qkv + b * width;
        const float *c = cos + b * D, *s = sin + b * D;
        for (int64_t h = 0; h < Hq; ++h) rope(row + h * D, c, s, D, q + (b * Hq + h) * D);
        for (int64_t g = 0; g < Hkv; ++g) {
            float* kslot = kcache + ((b * Hkv + g) * cap + pos) * D;
            rope(row + (Hq + g) * D, c, s, D, kslot);
            memcpy(vcache + ((b * Hkv + g) * cap + pos) * D, row + (Hq + Hkv + g) * D, sizeof(float) * D);
        }
    }
    AttentionJob job{q, kcache, vcache, out, q + B * Hq * D, starts, Hq, Hkv, D, cap, S, 1.0f / sqrtf((float)D)};
    if (Hq / Hkv <= 16 && D % 16 == 0 && D <= GROUP_MAX_D) {  // every Qwen2.5 size: heads in lanes
        if (B * Hq * S * D < (1 << 15)) nthreads = 1;  // a few dozen cached tokens: the hand-off costs more
        qwenlab_pool::pool().run(attend_group, &job, B * Hkv, nthreads);
    } else {
        if (B * Hq * S * D < (1 << 17)) nthreads = 1;  // ~500 cached tokens at 1 row of 14 heads x 64 (0.5B)
        qwenlab_pool::pool().run(attend, &job, B * Hq, nthreads);
    }
    free(q);
    return QWENLAB_OK;
}

// RMSNorm over the last dimension, fp32: out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w. One call in place
// of the ~10 ops torch 2.13's CPU rms_norm decomposes into (two norms per layer per decode step).
// Lengths count floats: x_len = out_len = rows n, w_len = n (a norm weight of another length is refused).
extern "C" int qwenlab_rms_norm(const float* x, int64_t x_len, int64_t rows, int64_t n, const float* w, int64_t w_len,
                                float eps, float* out, int64_t out_len) {
    if (rows < 0 || n <= 0 || !has_elems(x_len, {rows, n}) || !has_elems(out_len, {rows, n}) ||
        !has_elems(w_len, {n}) || !w || (rows > 0 && (!x || !out)))
        return QWENLAB_BAD_SIZES;
    for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * n;
        float* o = out + r * n;
        const float inv = 1.0f / sqrtf(dot_f32(xr, xr, n) / (float)n + eps);
        int64_t i = 0;
        const __m512 s = _mm512_set1_ps(inv);
        for (; i + 16 <= n; i += 16)
            _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(xr + i), s), _mm512_loadu_ps(w + i)));
        for (; i < n; ++i) o[i] = xr[i] * inv * w[i];
    }
    return QWENLAB_OK;
}
