// A whole decode step through every decoder layer in one call, for fused quantized models.
//
// Per layer, for B rows of one new token each (no padding, a plain KV cache):
//   h = rms_norm(x, norm1); qkv = h Wqkvᵀ + b; a = attention(qkv) (RoPE, cache write, softmax·V);
//   x += a Woᵀ; h = rms_norm(x, norm2); gu = h Wguᵀ; x += (silu(gate) * up) Wdownᵀ
// with the same kernels the per-op path calls (qmatmul.cpp, decode_attention.cpp), so the results
// are identical. What it removes is the Python between them: ~100 µs per layer of module calls,
// ctypes argument conversion, tensor allocation and residual adds, which on the 0.5B int4 shape was
// 2.4 of a decode step's 11.4 ms while the kernel's threads sat idle.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
void qwenlab_gemm_int8(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* s, int64_t N,
                       int64_t gs, const float* bias, float* y, int nthreads, int act);
void qwenlab_gemm_int4(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* s, const uint16_t* mz,
                       int64_t N, int64_t gs, const float* bias, float* y, int nthreads, int act);
int qwenlab_decode_attention(const float* qkv, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, const float* cos,
                             const float* sin, float* kcache, float* vcache, int64_t cap, int64_t pos, float* out);
int qwenlab_rms_norm(const float* x, int64_t rows, int64_t n, const float* w, float eps, float* out);
}

// One packed quantized linear (qwenlab.quant.native's layout); N is its packed (padded) row count.
struct QLinear {
    const uint8_t* w;
    const uint16_t* s;
    const uint16_t* mz;  // int4 only
    const float* bias;   // padded to N, or null
    int64_t N, K, gs, bits;
};

struct DecodeLayer {
    const float* norm1;
    const float* norm2;
    QLinear qkv, o, gate_up, down;
    float* keys;    // [B, Hkv, cap, D]
    float* values;  // [B, Hkv, cap, D]
};

static void linear(const QLinear& l, const float* x, int64_t B, float* y, int nthreads, int act) {
    if (l.bits == 8) qwenlab_gemm_int8(x, B, l.K, l.w, l.s, l.N, l.gs, l.bias, y, nthreads, act);
    else qwenlab_gemm_int4(x, B, l.K, l.w, l.s, l.mz, l.N, l.gs, l.bias, y, nthreads, act);
}

static void add_into(float* x, const float* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

// x [B, H] is updated in place. cos/sin [B, D]. Returns 0, or -1 when a shape does not fit (the caller
// then takes the per-op path): every linear's packed rows must equal its real output width here.
extern "C" int qwenlab_decode_stack(float* x, int64_t B, int64_t H, const DecodeLayer* layers, int64_t n_layers,
                                    int64_t Hq, int64_t Hkv, int64_t D, const float* cos, const float* sin,
                                    int64_t cap, int64_t pos, float eps, int nthreads) {
    // Checked here so that decode_attention cannot fail half-way through the stack (x updated in place).
    if (n_layers <= 0 || pos < 0 || pos >= cap || Hkv <= 0 || Hq % Hkv != 0 || D % 2 != 0) return -1;
    const int64_t qkv_n = (Hq + 2 * Hkv) * D, I = layers[0].down.K;
    for (int64_t i = 0; i < n_layers; ++i) {
        const DecodeLayer& L = layers[i];
        if (L.qkv.N != qkv_n || L.qkv.K != H || L.o.N != H || L.o.K != Hq * D || L.gate_up.N != 2 * I ||
            L.gate_up.K != H || L.down.N != H || L.down.K != I)
            return -1;
    }
    float* h = (float*)malloc(sizeof(float) * B * H);
    float* qkv = (float*)malloc(sizeof(float) * B * qkv_n);
    float* att = (float*)malloc(sizeof(float) * B * Hq * D);
    float* gu = (float*)malloc(sizeof(float) * B * 2 * I);
    float* y = (float*)malloc(sizeof(float) * B * H);
    int status = 0;
    for (int64_t i = 0; i < n_layers && status == 0; ++i) {
        const DecodeLayer& L = layers[i];
        qwenlab_rms_norm(x, B, H, L.norm1, eps, h);
        linear(L.qkv, h, B, qkv, nthreads, 0);
        status = qwenlab_decode_attention(qkv, B, Hq, Hkv, D, cos, sin, L.keys, L.values, cap, pos, att);
        if (status != 0) break;
        linear(L.o, att, B, y, nthreads, 0);
        add_into(x, y, B * H);
        qwenlab_rms_norm(x, B, H, L.norm2, eps, h);
        linear(L.gate_up, h, B, gu, nthreads, 0);
        linear(L.down, gu, B, y, nthreads, 1);  // act 1: silu(gate) * up, applied while quantizing
        add_into(x, y, B * H);
    }
    free(h); free(qkv); free(att); free(gu); free(y);
    return status;
}
