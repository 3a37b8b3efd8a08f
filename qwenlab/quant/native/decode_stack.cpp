// A whole decode step through every decoder layer in one call, for quantized and float (bf16, fp32) models.
//
// Per layer, for B rows of one new token each (a plain KV cache; a row's leading padding slots skipped):
//   h = rms_norm(x, norm1); qkv = h Wqkvᵀ + b; a = attention(qkv) (RoPE, cache write, softmax·V);
//   x += a Woᵀ; h = rms_norm(x, norm2); gu = h Wguᵀ; x += (silu(gate) * up) Wdownᵀ
// with the same kernels the per-op path calls (qmatmul.cpp, decode_attention.cpp), so the results
// are identical. What it removes is the Python between them: ~100 µs per layer of module calls,
// ctypes argument conversion, tensor allocation and residual adds, which on the 0.5B int4 shape was
// 2.4 of a decode step's 11.4 ms while the kernel's threads sat idle.
//
// A quantized layer has fused q|k|v and gate|up weights (one packed matrix each), or separate ones where
// adapters wrap them. A float layer keeps the checkpoint's separate q, k, v, gate and up matrices (so LoRA
// can still wrap them), given as `qkv` = q, `k`, `v`, `gate_up` = gate and `up`; float rows run as one
// pool job (float_matmul.cpp's segments). Optionally each row adds its own LoRA adapter's delta to every
// linear's output (`lora`, `row_adapter`: serve's per-row adapters, lora_bgmv.cpp).
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#include <initializer_list>
#include <utility>

#include "lora_bgmv.h"
#include "vec.h"

extern "C" {
int qwenlab_gemm_int8(const float* x, int64_t x_len, int64_t M, int64_t K, const uint8_t* w, int64_t w_len,
                      const uint16_t* s, int64_t s_len, int64_t N, int64_t gs, const float* bias, int64_t bias_len,
                      float* y, int64_t y_len, int nthreads, int act);
int qwenlab_gemm_int4(const float* x, int64_t x_len, int64_t M, int64_t K, const uint8_t* w, int64_t w_len,
                      const uint16_t* s, int64_t s_len, const uint16_t* mz, int64_t mz_len, int64_t N, int64_t gs,
                      const float* bias, int64_t bias_len, float* y, int64_t y_len, int nthreads, int act);
int qwenlab_decode_attention(const float* qkv, int64_t qkv_len, int64_t B, int64_t Hq, int64_t Hkv, int64_t D,
                             const float* cos, const float* sin, int64_t cs_len, float* kcache, float* vcache,
                             int64_t kv_len, int64_t cap, int64_t pos, float* out, int64_t out_len,
                             const int64_t* starts, int nthreads);
int qwenlab_rms_norm(const float* x, int64_t x_len, int64_t rows, int64_t n, const float* w, int64_t w_len, float eps,
                     float* out, int64_t out_len);
}
int run_quant_linears(const float* x, int64_t M, int64_t K, int bits, int nseg, const uint8_t* const* w,
                      const uint16_t* const* s, const uint16_t* const* mz, const float* const* bias,
                      const int64_t* N, const int64_t* gs, float* const* y, int64_t ldy, int nthreads);
int run_float_linears(const float* x, int64_t M, int64_t K, int bits, int nseg, const void* const* w,
                           const float* const* bias, float* const* y, const int64_t* N, int64_t ldy, int nthreads,
                           int act);

// One packed quantized linear (qwenlab.quant.native's layout; N is its packed, padded row count), or a
// float one (bits 16: bf16, 32: fp32; w [N, K] row-major, no s or mz, N exact).
// The lengths count elements of each buffer (w: bytes or float values, s and mz: fp16 values, bias: floats).
struct QLinear {
    const uint8_t* w;
    const uint16_t* s;
    const uint16_t* mz;  // int4 only
    const float* bias;   // padded to N, or null
    int64_t N, K, gs, bits;
    int64_t w_len, s_len, mz_len, bias_len;
};

struct DecodeLayer {
    const float* norm1;
    const float* norm2;
    QLinear qkv, o, gate_up, down;
    float* keys;    // [B, Hkv, cap, D]
    float* values;  // [B, Hkv, cap, D]
    int64_t norm1_len, norm2_len, kv_len;  // floats: H, H, B Hkv cap D (keys and values each)
    QLinear k, v, up;  // float layers: k, v and up apart from q (in qkv) and gate (in gate_up); else w null
};

// One linear's LoRA adapters for the batch, in lora_bgmv.cpp's layout: A [n, R, K], Bt [n, R, N] (B
// transposed, scaling folded in, ranks zero-padded to R), fp32 (bits 32) or bf16 (bits 16). A null: none.
struct LoraLinear {
    const void* A;
    const void* Bt;
    int64_t A_len, Bt_len, R, n, bits;
};

// Per layer, the deltas of the rows' own adapters (serve's per-row adapters, lora_bgmv): added to each
// linear's output before it is used, so a step with adapters stays one call.
struct LoraLayer {
    LoraLinear q, k, v, o, gate, up, down;
};

static bool is_float(const QLinear& l) { return l.bits == 16 || l.bits == 32; }

// Float linears that read the same x, their rows one pool job: y_i [B, N_i] at column offset sum N_<i of y.
static int float_linears(std::initializer_list<const QLinear*> ls, const float* x, int64_t B, float* y,
                         int nthreads, int act) {
    const void* w[3];
    const float* bias[3];
    float* out[3];
    int64_t N[3], ldy = 0;
    int n = 0;
    for (const QLinear* l : ls) {
        w[n] = l->w, bias[n] = l->bias, out[n] = y + ldy, N[n] = l->N;
        ldy += l->N, ++n;
    }
    return run_float_linears(x, B, (*ls.begin())->K, (int)(*ls.begin())->bits, n, w, bias, out, N, ldy,
                                  nthreads, act);
}

// x [B, K] (act 1: gate|up [B, 2K]) -> y [B, N]
static int linear(const QLinear& l, const float* x, int64_t B, float* y, int nthreads, int act) {
    if (is_float(l)) return float_linears({&l}, x, B, y, nthreads, act);
    const int64_t x_len = B * l.K * (act ? 2 : 1), y_len = B * l.N;
    if (l.bits == 8)
        return qwenlab_gemm_int8(x, x_len, B, l.K, l.w, l.w_len, l.s, l.s_len, l.N, l.gs, l.bias, l.bias_len, y,
                                 y_len, nthreads, act);
    return qwenlab_gemm_int4(x, x_len, B, l.K, l.w, l.w_len, l.s, l.s_len, l.mz, l.mz_len, l.N, l.gs, l.bias,
                             l.bias_len, y, y_len, nthreads, act);
}

// The sizes a linear's buffers must have (what qwenlab_gemm_* checks again per call): checked for every
// layer before the first one runs, so that a bad buffer cannot stop the stack half-way with x updated.
static bool linear_ok(const QLinear& l) {
    const int64_t limit = (int64_t)1 << 31;
    if (is_float(l))
        return l.N > 0 && l.N < limit && l.K > 0 && l.K < limit && l.w && has_elems(l.w_len, {l.N, l.K}) &&
               (!l.bias || has_elems(l.bias_len, {l.N}));
    if ((l.bits != 8 && l.bits != 4) || l.N <= 0 || l.N >= limit || l.K <= 0 || l.K >= limit || l.gs <= 0 ||
        l.K % 32 || l.gs % 32 || l.K % l.gs || l.N % 64 || !l.w || !l.s || (l.bits == 4 && !l.mz))
        return false;
    return has_elems(l.w_len, {l.N, l.bits == 8 ? l.K : l.K / 2}) && has_elems(l.s_len, {l.N, l.K / l.gs}) &&
           (l.bits == 8 || has_elems(l.mz_len, {l.N, l.K / l.gs})) && (!l.bias || has_elems(l.bias_len, {l.N}));
}

// Linears that read the same x whose outputs sit side by side in y [B, sum N_i]: float ones in one pool
// job, quantized ones of one kind too (run_quant_linears: x quantized once, written in place); a mix of
// kinds each into `tmp`, then copied into place.
static int side_by_side(std::initializer_list<const QLinear*> ls, const float* x, int64_t B, float* y, float* tmp,
                        int nthreads) {
    if (is_float(**ls.begin())) return float_linears(ls, x, B, y, nthreads, 0);
    bool same = ls.size() <= 3;
    for (const QLinear* l : ls) same = same && l->bits == (*ls.begin())->bits && l->K == (*ls.begin())->K;
    if (same) {
        const uint8_t* w[3];
        const uint16_t *s[3], *mz[3];
        const float* bias[3];
        int64_t N[3], gs[3], ldy = 0;
        float* out[3];
        int n = 0;
        for (const QLinear* l : ls) {
            w[n] = l->w, s[n] = l->s, mz[n] = l->mz, bias[n] = l->bias, N[n] = l->N, gs[n] = l->gs;
            out[n] = y + ldy, ldy += l->N, ++n;
        }
        return run_quant_linears(x, B, (*ls.begin())->K, (int)(*ls.begin())->bits, n, w, s, mz, bias, N, gs, out,
                                 ldy, nthreads);
    }
    int64_t ldy = 0, offset = 0;
    for (const QLinear* l : ls) ldy += l->N;
    for (const QLinear* l : ls) {
        int status = linear(*l, x, B, tmp, nthreads, 0);
        if (status != QWENLAB_OK) return status;
        for (int64_t b = 0; b < B; ++b) memcpy(y + b * ldy + offset, tmp + b * l->N, sizeof(float) * l->N);
        offset += l->N;
    }
    return QWENLAB_OK;
}

// y (row stride ldy) += each row's adapter delta of x (row stride ldx); nothing where the linear has none.
static int lora_add(const LoraLinear& a, const int32_t* row_adapter, const float* x, int64_t ldx, int64_t B,
                    int64_t K, float* y, int64_t N, int64_t ldy, int nthreads) {
    if (!a.A || !row_adapter) return QWENLAB_OK;
    return lora_bgmv_rows(x, ldx, B, K, row_adapter, a.A, a.Bt, (int)a.bits, a.R, N, y, ldy, nthreads);
}

// The deltas of linears that read the same x (row stride ldx), linear i's added into columns y_i (row stride
// ldy) of N_i columns: one pool job for all of them (lora_bgmv_segments); linears without adapters are skipped.
static int lora_add_side_by_side(std::initializer_list<std::pair<const LoraLinear*, float*>> linears,
                                 std::initializer_list<int64_t> widths, const int32_t* row_adapter, const float* x,
                                 int64_t ldx, int64_t B, int64_t K, int64_t ldy, int nthreads) {
    LoraSegment segs[LORA_MAX_SEGMENTS];
    int n = 0;
    auto width = widths.begin();
    for (const auto& [a, y] : linears) {
        if (a->A && row_adapter) segs[n++] = LoraSegment{a->A, a->Bt, (int)a->bits, a->R, *width, y};
        ++width;
    }
    return lora_bgmv_segments(x, ldx, B, K, row_adapter, segs, n, ldy, nthreads);
}

static bool lora_ok(const LoraLinear& a, int64_t K, int64_t N) {
    return !a.A || (a.Bt && (a.bits == 16 || a.bits == 32) && a.R > 0 && a.R <= 256 && a.n > 0 && has_elems(a.A_len, {a.n, a.R, K}) &&
                    has_elems(a.Bt_len, {a.n, a.R, N}));
}

static void add_into(float* x, const float* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

// x [B, H] is updated in place (x_len = B H floats). cos/sin [B, D] (cs_len = B D each). starts [B] (NULL:
// all 0): row b attends to slots starts[b]..pos only (its leading padding slots are never read). Returns
// QWENLAB_OK; QWENLAB_NOT_APPLICABLE when a shape does not fit this path (the caller then takes the
// per-op path: every linear's packed rows must equal its real output width here); QWENLAB_BAD_SIZES
// when a buffer's length does not fit the dimensions; QWENLAB_NO_MEMORY when a malloc fails.
extern "C" int qwenlab_decode_stack(float* x, int64_t x_len, int64_t B, int64_t H, const DecodeLayer* layers,
                                    int64_t n_layers, int64_t Hq, int64_t Hkv, int64_t D, const float* cos,
                                    const float* sin, int64_t cs_len, int64_t cap, int64_t pos, float eps,
                                    int nthreads, const int64_t* starts, const LoraLayer* lora,
                                    int64_t lora_len, const int32_t* row_adapter, int64_t ra_len) {
    // Checked here so that decode_attention cannot fail half-way through the stack (x updated in place).
    // (Head counts and width bounded so that the products below cannot overflow.)
    if (n_layers <= 0 || !layers || pos < 0 || pos >= cap || Hkv <= 0 || Hq <= 0 || Hq % Hkv != 0 || D <= 0 ||
        D % 2 != 0 || Hq > (1 << 20) || D > (1 << 20))
        return QWENLAB_NOT_APPLICABLE;
    const int64_t qkv_n = (Hq + 2 * Hkv) * D, I = layers[0].down.K;
    for (int64_t i = 0; i < n_layers; ++i) {
        const DecodeLayer& L = layers[i];
        if (L.o.N != H || L.o.K != Hq * D || L.down.N != H || L.down.K != I) return QWENLAB_NOT_APPLICABLE;
        if (L.k.w) {  // q, k, v apart, all of one format (float, or quantized with exact widths)
            if (L.k.bits != L.qkv.bits || L.v.bits != L.qkv.bits || L.qkv.N != Hq * D ||
                L.k.N != Hkv * D || L.v.N != Hkv * D || L.qkv.K != H || L.k.K != H || L.v.K != H)
                return QWENLAB_NOT_APPLICABLE;
        } else if (L.qkv.N != qkv_n || L.qkv.K != H) {
            return QWENLAB_NOT_APPLICABLE;
        }
        if (L.up.w) {  // gate and up apart
            if (L.up.bits != L.gate_up.bits || L.gate_up.N != I || L.up.N != I ||
                L.gate_up.K != H || L.up.K != H)
                return QWENLAB_NOT_APPLICABLE;
        } else if (L.gate_up.N != 2 * I || L.gate_up.K != H) {
            return QWENLAB_NOT_APPLICABLE;
        }
    }
    if (B <= 0 || B >= ((int64_t)1 << 31) || H <= 0 || !x || !cos || !sin || !has_elems(x_len, {B, H}) || !has_elems(cs_len, {B, D}))
        return QWENLAB_BAD_SIZES;
    if (starts)
        for (int64_t b = 0; b < B; ++b)
            if (starts[b] < 0 || starts[b] > pos) return QWENLAB_BAD_SIZES;
    if (lora && row_adapter) {  // adapters: q, k, v, gate and up must be apart to take their own deltas
        if (lora_len != n_layers || !has_elems(ra_len, {B})) return QWENLAB_BAD_SIZES;
        for (int64_t i = 0; i < n_layers; ++i) {
            const LoraLayer& A = lora[i];
            if ((A.q.A || A.k.A || A.v.A) && !layers[i].k.w) return QWENLAB_NOT_APPLICABLE;
            if ((A.gate.A || A.up.A) && !layers[i].up.w) return QWENLAB_NOT_APPLICABLE;
            if (!lora_ok(A.q, H, Hq * D) || !lora_ok(A.k, H, Hkv * D) || !lora_ok(A.v, H, Hkv * D) ||
                !lora_ok(A.o, Hq * D, H) || !lora_ok(A.gate, H, I) || !lora_ok(A.up, H, I) || !lora_ok(A.down, I, H))
                return QWENLAB_BAD_SIZES;
            for (const LoraLinear* a : {&A.q, &A.k, &A.v, &A.o, &A.gate, &A.up, &A.down})
                if (a->A)
                    for (int64_t b = 0; b < B; ++b)
                        if (row_adapter[b] >= a->n) return QWENLAB_BAD_SIZES;
        }
    } else {
        lora = nullptr, row_adapter = nullptr;
    }
    for (int64_t i = 0; i < n_layers; ++i) {
        const DecodeLayer& L = layers[i];
        if (!L.norm1 || !L.norm2 || !L.keys || !L.values || !has_elems(L.norm1_len, {H}) ||
            !has_elems(L.norm2_len, {H}) || !has_elems(L.kv_len, {B, Hkv, cap, D}) || !linear_ok(L.qkv) ||
            !linear_ok(L.o) || !linear_ok(L.gate_up) || !linear_ok(L.down) || (L.k.w && (!linear_ok(L.k) ||
            !linear_ok(L.v))) || (L.up.w && !linear_ok(L.up)))
            return QWENLAB_BAD_SIZES;
    }
    float* h = (float*)malloc(sizeof(float) * B * H);
    float* qkv = (float*)malloc(sizeof(float) * B * qkv_n);
    float* att = (float*)malloc(sizeof(float) * B * Hq * D);
    float* gu = (float*)malloc(sizeof(float) * B * 2 * I);
    float* y = (float*)malloc(sizeof(float) * B * H);
    // quantized linears kept apart (an adapter's model) are written here first; silu(gate) up for down's LoRA
    float* tmp = (float*)malloc(sizeof(float) * B * (qkv_n > I ? qkv_n : I));
    int status = h && qkv && att && gu && y && tmp ? QWENLAB_OK : QWENLAB_NO_MEMORY;
    const int64_t q_n = Hq * D, kv_n = Hkv * D;
    for (int64_t i = 0; i < n_layers && status == QWENLAB_OK; ++i) {
        const DecodeLayer& L = layers[i];
        const LoraLayer* A = lora ? &lora[i] : nullptr;
        qwenlab_rms_norm(x, B * H, B, H, L.norm1, L.norm1_len, eps, h, B * H);
        status = L.k.w ? side_by_side({&L.qkv, &L.k, &L.v}, h, B, qkv, tmp, nthreads) : linear(L.qkv, h, B, qkv, nthreads, 0);
        if (status == QWENLAB_OK && A)
            status = lora_add_side_by_side({{&A->q, qkv}, {&A->k, qkv + q_n}, {&A->v, qkv + q_n + kv_n}},
                                           {q_n, kv_n, kv_n}, row_adapter, h, H, B, H, qkv_n, nthreads);
        if (status != QWENLAB_OK) break;
        status = qwenlab_decode_attention(qkv, B * qkv_n, B, Hq, Hkv, D, cos, sin, cs_len, L.keys, L.values,
                                          L.kv_len, cap, pos, att, B * Hq * D, starts, nthreads);
        if (status != QWENLAB_OK || (status = linear(L.o, att, B, y, nthreads, 0)) != QWENLAB_OK) break;
        if (A && (status = lora_add(A->o, row_adapter, att, q_n, B, q_n, y, H, H, nthreads)) != QWENLAB_OK) break;
        add_into(x, y, B * H);
        qwenlab_rms_norm(x, B * H, B, H, L.norm2, L.norm2_len, eps, h, B * H);
        status = L.up.w ? side_by_side({&L.gate_up, &L.up}, h, B, gu, tmp, nthreads) : linear(L.gate_up, h, B, gu, nthreads, 0);
        if (status == QWENLAB_OK && A)
            status = lora_add_side_by_side({{&A->gate, gu}, {&A->up, gu + I}}, {I, I}, row_adapter, h, H, B, H,
                                           2 * I, nthreads);
        if (status != QWENLAB_OK) break;
        // act 1: silu(gate) * up, applied while quantizing
        if ((status = linear(L.down, gu, B, y, nthreads, 1)) != QWENLAB_OK) break;
        if (A && A->down.A) {  // down's delta reads silu(gate) up itself
            for (int64_t b = 0; b < B; ++b) silu_mul_row(gu + b * 2 * I, gu + b * 2 * I + I, I, tmp + b * I);
            if ((status = lora_add(A->down, row_adapter, tmp, I, B, I, y, H, H, nthreads)) != QWENLAB_OK) break;
        }
        add_into(x, y, B * H);
    }
    free(h); free(qkv); free(att); free(gu); free(y); free(tmp);
    return status;
}
