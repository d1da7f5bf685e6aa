// 4-bit dequantization on the CPU: out[i] = code[q_i] * scale(block), an fp32 product rounded to the
// output dtype (round to nearest even) -- the arithmetic of bitsandbytes on CPU and CUDA alike. Each
// block's 16 values are rounded once into a table; AVX-512 then looks up 32 codes per instruction.
#include <algorithm>
#include <type_traits>

#include "cpu/avx512_store.hpp"
#include "cpu/isa.hpp"
#include "cpu/kernels.hpp"
#include "cpu/parallel.hpp"
#include "cpu/scales.hpp"
#include "dtypes.hpp"
#include "formats.hpp"

namespace fp4::cpu {
namespace {

#ifdef FP4_X86
FP4_TARGET_BEGIN("avx512f,avx512bw,avx512vl")
// The block's 16 values, code[q] * scale rounded as from_float rounds them.
template <typename T>
void fill_table(const float* code, float scale, T (&table)[16]) {
  avx512_store::store16(table, _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(scale)), 0xffff);
}

// Elements [0, count) of a block (count % 32 == 0) from its table, 32 at a time: 16 bytes widened
// to dwords, each dword's two nibbles made the two words [high, low] (element order), and the
// words looked up in the table's 16 entries.
template <typename T>
void lookup_block(const uint8_t* in, int64_t count, const T (&table)[16], T* dst) {
  // (the 16 entries in one register: fp32 as floats, fp16 / bf16 as words in its low half)
  __m512 table_ps = _mm512_setzero_ps();
  __m512i table_16 = _mm512_setzero_si512();
  if constexpr (std::is_same_v<T, float>)
    table_ps = _mm512_loadu_ps(table);
  else
    table_16 = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(table)));
  for (int64_t i = 0; i < count; i += 32) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i / 2)));
    const __m512i index = _mm512_or_si512(_mm512_srli_epi32(bytes, 4),
                                          _mm512_slli_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(15)), 16));
    if constexpr (std::is_same_v<T, float>) {
      _mm512_storeu_ps(dst + i, _mm512_permutexvar_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(index)), table_ps));
      _mm512_storeu_ps(dst + i + 16,
                       _mm512_permutexvar_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(index, 1)), table_ps));
    } else {
      _mm512_storeu_si512(dst + i, _mm512_permutexvar_epi16(index, table_16));
    }
  }
}
FP4_TARGET_END
#endif

template <typename T>
void dequantize_typed(fp4_quant_type type, const uint8_t* packed, const fp4_scales& scales, int64_t n,
                      int64_t blocksize, T* out) {
  const Codebook& code = codebook(type);
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  const int64_t grain = std::max<int64_t>(1, 16384 / blocksize);
#ifdef FP4_X86
  const bool vector = cpu_isa() == Isa::kAvx512;
#endif
  parallel_for(blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float scale = block_scale(scales, b);
      // Per-block table of the 16 scaled values: one multiply per code, not per element.
      T table[16];
#ifdef FP4_X86
      if (vector)
        fill_table(code.data(), scale, table);
      else
#endif
        for (int q = 0; q < 16; ++q) table[q] = from_float<T>(code[q] * scale);
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      const uint8_t* in = packed + start / 2;
      T* dst = out + start;
      int64_t done = 0;  // (elements written 32 at a time)
#ifdef FP4_X86
      if (vector) lookup_block(in, done = len / 32 * 32, table, dst);
#endif
      const int64_t pairs = len / 2;
      for (int64_t i = done / 2; i < pairs; ++i) {
        const uint8_t byte = in[i];
        dst[2 * i] = table[byte >> 4];
        dst[2 * i + 1] = table[byte & 15];
      }
      if (len % 2) dst[len - 1] = table[in[pairs] >> 4];
    }
  });
}

}  // namespace

void dequantize_4bit(fp4_quant_type type, const uint8_t* packed, const fp4_scales& scales, int64_t n,
                     int64_t blocksize, void* out, fp4_dtype dtype) {
  switch (dtype) {
    case FP4_FLOAT32: return dequantize_typed(type, packed, scales, n, blocksize, static_cast<float*>(out));
    case FP4_FLOAT16: return dequantize_typed(type, packed, scales, n, blocksize, static_cast<half_t*>(out));
    case FP4_BFLOAT16:
      return dequantize_typed(type, packed, scales, n, blocksize, static_cast<bfloat16_t*>(out));
  }
}

}  // namespace fp4::cpu
