#!/usr/bin/env bash
# Prints the CMAKE_ARGS that build llama.cpp portably for this host: GGML_NATIVE off, AMX off, and
# each x86 instruction set on only when /proc/cpuinfo advertises it AND a probe program that executes
# one of its instructions runs here (a hypervisor can advertise what the OS never enabled).
# Why not GGML_NATIVE: -march=native turns on llama.cpp's AMX path, which dies with SIGILL on hosts
# whose AMX torch's oneDNN runs fine (issue 18).
set -euo pipefail
CC=${CC:-gcc}
probe_dir=$(mktemp -d)
trap 'rm -rf "$probe_dir"' EXIT
cpuinfo=$(cat /proc/cpuinfo 2>/dev/null || true)

advertised() {  # every named /proc/cpuinfo flag present
  local flag
  for flag in "$@"; do grep -qw -- "$flag" <<<"$cpuinfo" || return 1; done
}

runs() {  # runs NAME CFLAGS BODY: compile BODY with CFLAGS, execute it in a child, succeed on exit 0
  local name=$1 cflags=$2 body=$3
  printf '#include <immintrin.h>\n#include <stdio.h>\nint main(int argc, char **argv) { volatile int n = argc; %s return 0; }\n' "$body" \
    >"$probe_dir/$name.c"
  "$CC" -O0 $cflags "$probe_dir/$name.c" -o "$probe_dir/$name" 2>/dev/null || return 1
  timeout 10 "$probe_dir/$name" >/dev/null 2>&1
}

args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_CPU_ALL_VARIANTS=OFF"
enable() { args="$args -D$1=$2"; }

if [ "$(uname -m)" != x86_64 ]; then
  echo "$args"  # non-x86: GGML_NATIVE=OFF alone; the x86 switches below do not apply
  exit 0
fi

feature() {  # feature CMAKE_OPTION "cpuinfo flags" CFLAGS BODY
  if advertised $2 && runs "$1" "$3" "$4"; then enable "$1" ON; else enable "$1" OFF; fi
}
feature GGML_SSE42 "sse4_2" "-msse4.2" 'volatile unsigned r = _mm_crc32_u32(n, 7); (void)r;'
feature GGML_F16C "f16c" "-mf16c" '__m128 v = _mm_cvtph_ps(_mm_set1_epi16(n)); volatile float r = _mm_cvtss_f32(v); (void)r;'
feature GGML_FMA "fma" "-mfma" '__m256 a = _mm256_set1_ps(n); volatile float r = _mm256_cvtss_f32(_mm256_fmadd_ps(a, a, a)); (void)r;'
feature GGML_BMI2 "bmi2" "-mbmi2" 'volatile unsigned r = _pdep_u32(n, 0xF0F0u); (void)r;'
feature GGML_AVX "avx" "-mavx" '__m256 a = _mm256_set1_ps(n); volatile float r = _mm256_cvtss_f32(_mm256_add_ps(a, a)); (void)r;'
feature GGML_AVX2 "avx2" "-mavx2" '__m256i a = _mm256_set1_epi32(n); volatile int r = _mm256_extract_epi32(_mm256_add_epi32(a, a), 0); (void)r;'
feature GGML_AVX_VNNI "avx_vnni" "-mavxvnni" '__m256i a = _mm256_set1_epi32(n); volatile int r = _mm256_extract_epi32(_mm256_dpbusd_avx_epi32(a, a, a), 0); (void)r;'
feature GGML_AVX512 "avx512f avx512cd avx512vl avx512dq avx512bw" "-mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw" \
  '__m512i a = _mm512_set1_epi16(n); __m512i c = _mm512_conflict_epi32(_mm512_add_epi16(a, a)); __m256 d = _mm256_and_ps(_mm256_set1_ps(n), _mm256_set1_ps(1)); volatile int r = _mm512_reduce_add_epi32(c) + (int)_mm256_cvtss_f32(d); (void)r;'
feature GGML_AVX512_VBMI "avx512vbmi" "-mavx512f -mavx512vbmi" '__m512i a = _mm512_set1_epi8(n); volatile int r = _mm512_reduce_add_epi32(_mm512_permutexvar_epi8(a, a)); (void)r;'
feature GGML_AVX512_VNNI "avx512_vnni" "-mavx512f -mavx512vnni" '__m512i a = _mm512_set1_epi32(n); volatile int r = _mm512_reduce_add_epi32(_mm512_dpbusd_epi32(a, a, a)); (void)r;'
feature GGML_AVX512_BF16 "avx512_bf16" "-mavx512f -mavx512bf16" '__m512 a = _mm512_set1_ps(n); volatile float r = _mm512_reduce_add_ps(_mm512_dpbf16_ps(a, (__m512bh)_mm512_set1_epi16(n), (__m512bh)_mm512_set1_epi16(n))); (void)r;'
echo "$args"
