// lora_bgmv.cpp's entry points for the decode stack (decode_stack.cpp), which checks every argument first.
#pragma once
#include <stdint.h>

// One linear's adapter stacks (A [n, R, K], Bt [n, R, N]; bits 32: fp32, 16: bf16) and where its delta goes.
struct LoraSegment {
    const void* A;
    const void* Bt;
    int bits;
    int64_t R, N;
    float* y;
};

#define LORA_MAX_SEGMENTS 4

// One token per row: y (row stride ldy) += each row's adapter delta of x (row stride ldx).
int lora_bgmv_rows(const float* x, int64_t ldx, int64_t rows, int64_t K, const int32_t* row_adapter,
                   const void* A, const void* Bt, int bits, int64_t R, int64_t N, float* y, int64_t ldy,
                   int nthreads);

// Several linears that read the same x (q, k and v; gate and up), one pool job; nseg <= LORA_MAX_SEGMENTS.
int lora_bgmv_segments(const float* x, int64_t ldx, int64_t rows, int64_t K, const int32_t* row_adapter,
                       const LoraSegment* segs, int nseg, int64_t ldy, int nthreads);
