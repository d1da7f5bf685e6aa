// 16 fp32 results stored as fp32, fp16 or bf16 on AVX-512, the lanes of `live` only, rounded
// exactly as the scalar from_float (dtypes.hpp) rounds them: to nearest even, NaN written as
// torch writes it. (Inlined into the CPU kernels' AVX-512 regions.)
#pragma once

#include "cpu/isa.hpp"
#include "dtypes.hpp"

#ifdef FP4_X86
namespace fp4::cpu::avx512_store {

#define FP4_AVX512_INLINE inline __attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))
FP4_AVX512_INLINE void store16(float* p, __m512 v, __mmask16 live) { _mm512_mask_storeu_ps(p, live, v); }
FP4_AVX512_INLINE void store16(bfloat16_t* p, __m512 v, __mmask16 live) {
  // (integer rounding, not vcvtneps2bf16: that one flushes subnormal inputs to zero)
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i bits = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  bits = _mm512_mask_mov_epi32(bits, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_mask_storeu_epi16(p, live, _mm512_cvtepi32_epi16(bits));
}
FP4_AVX512_INLINE void store16(half_t* p, __m512 v, __mmask16 live) {
  __m256i bits = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // NaN: the sign and a quiet NaN without payload.
  const __m512i nan = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 16),
                                                       _mm512_set1_epi32(0x8000)),
                                      _mm512_set1_epi32(0x7e00));
  bits = _mm256_mask_mov_epi16(bits, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_cvtepi32_epi16(nan));
  _mm256_mask_storeu_epi16(p, live, bits);
}
#undef FP4_AVX512_INLINE

}  // namespace fp4::cpu::avx512_store
#endif
