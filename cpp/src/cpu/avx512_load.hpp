// 16 activations as fp32 on AVX-512, from fp32, fp16 or bf16 (shared by the CPU kernels; inlined
// into their AVX-512 regions).
#pragma once

#include "cpu/isa.hpp"
#include "dtypes.hpp"

#ifdef FP4_X86
namespace fp4::cpu::avx512_load {

#define FP4_AVX512_INLINE inline __attribute__((target("avx512f,avx512bw"), always_inline))
FP4_AVX512_INLINE __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
FP4_AVX512_INLINE __m512 load16(const half_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
FP4_AVX512_INLINE __m512 load16(const bfloat16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
#undef FP4_AVX512_INLINE

}  // namespace fp4::cpu::avx512_load
#endif
