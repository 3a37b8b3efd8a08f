// Executes one instruction of each set the kernels are compiled for (AVX-512 F/BW/VL, VNNI, F16C, FMA).
// build.py calls it in a child process before the library is loaded into the caller's process: a host
// that advertises these sets but cannot execute them (a hypervisor that hides the state) kills only the
// child with SIGILL, and qwenlab falls back to PyTorch's kernels.
#include <immintrin.h>
#include <cstdint>

extern "C" int qwenlab_probe(int seed) {
    __m512i a = _mm512_set1_epi32(seed);
    __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), a, a);             // VNNI
    __m512i sum = _mm512_add_epi16(dot, a);                                       // BW
    __m256i half = _mm256_add_epi32(_mm512_castsi512_si256(sum), _mm256_set1_epi32(1));  // VL (AVX2 width)
    __m128 h = _mm_cvtph_ps(_mm_set1_epi16((short)seed));                          // F16C
    __m256 f = _mm256_fmadd_ps(_mm256_set1_ps(1.0f), _mm256_set1_ps(2.0f), _mm256_set1_ps(3.0f));  // FMA
    return _mm256_extract_epi32(half, 0) + (int)_mm_cvtss_f32(h) + (int)_mm256_cvtss_f32(f);
}
