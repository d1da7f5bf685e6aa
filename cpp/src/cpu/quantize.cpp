// 4-bit blockwise quantization on the CPU, bit-exact with bitsandbytes' CPU path
// (backends/default quantize_4bit):
//   absmax  = max |x| over the block (x read as fp32);
//   scaled  = clamp(x * (1 / max(absmax, 1e-38)), -1, 1) for a full block, and
//             clamp(x / max(absmax, 1e-38), -1, 1) for the partial last block (bnb divides there);
//   bucket  = number of midpoints strictly below `scaled` (ties to the lower bucket);
//   code    = sorted_to_code[bucket].
// An odd element count pads the last byte's low nibble with the code of 0.0, as bnb does.
// Full blocks run 16 elements at a time on AVX-512 (the same fp32 operations, so the same bytes).
#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <vector>

#include "cpu/avx512_load.hpp"
#include "cpu/isa.hpp"
#include "cpu/kernels.hpp"
#include "cpu/parallel.hpp"
#include "dtypes.hpp"
#include "error.hpp"
#include "formats.hpp"

namespace fp4::cpu {
namespace {

constexpr float kMinAbsmax = 1e-38f;  // bnb's clamp(min=1e-38) before taking the reciprocal

struct Quantizer {
  std::array<float, 15> bounds;
  std::array<uint8_t, 16> to_code;

  explicit Quantizer(fp4_quant_type type) : bounds(bucket_bounds(type)), to_code(sorted_to_code(type)) {}

  uint8_t operator()(float scaled) const {
    int bucket = 0;
    for (int i = 0; i < 15; ++i) bucket += scaled > bounds[i];
    return to_code[bucket];
  }
};

#ifdef FP4_X86
FP4_TARGET_BEGIN("avx512f,avx512bw")
namespace avx512 {
using avx512_load::load16;

// Quantizes the full blocks [first, last) (blocksize % 16 == 0), 16 elements at a time with the
// scalar path's fp32 operations. Returns the first block holding NaN or Inf (left for the scalar
// path to report), or `last`.
template <typename T>
int64_t quantize_full_blocks(const Quantizer& q, const T* x, int64_t blocksize, uint8_t* packed, float* absmax,
                             int64_t first, int64_t last) {
  __m512 bounds[15];
  for (int i = 0; i < 15; ++i) bounds[i] = _mm512_set1_ps(q.bounds[i]);
  alignas(64) int32_t to_code[16];
  for (int i = 0; i < 16; ++i) to_code[i] = q.to_code[i];
  const __m512i code_of = _mm512_load_si512(to_code), one = _mm512_set1_epi32(1);
  for (int64_t b = first; b < last; ++b) {
    const T* block = x + b * blocksize;
    __m512 amax = _mm512_setzero_ps();
    __mmask16 not_finite = 0;
    for (int64_t i = 0; i < blocksize; i += 16) {
      const __m512 a = _mm512_abs_ps(load16(block + i));
      not_finite |= _mm512_cmp_ps_mask(a, _mm512_set1_ps(FLT_MAX), _CMP_NLE_UQ);  // (NaN or Inf)
      amax = _mm512_max_ps(amax, a);
    }
    if (not_finite) return b;
    const float block_max = _mm512_reduce_max_ps(amax);
    absmax[b] = block_max;
    const __m512 inv = _mm512_set1_ps(1.0f / std::max(block_max, kMinAbsmax));
    for (int64_t i = 0; i < blocksize; i += 16) {
      // clamp(x * inv, -1, 1), then the number of midpoints strictly below it, then its code.
      const __m512 s = _mm512_max_ps(_mm512_min_ps(_mm512_mul_ps(load16(block + i), inv), _mm512_set1_ps(1.0f)),
                                     _mm512_set1_ps(-1.0f));
      __m512i bucket = _mm512_setzero_si512();
      for (int j = 0; j < 15; ++j)
        bucket = _mm512_mask_add_epi32(bucket, _mm512_cmp_ps_mask(s, bounds[j], _CMP_GT_OQ), bucket, one);
      // Element pairs (2e, 2e + 1) share a 64-bit lane: its low byte becomes code(2e) << 4 | code(2e + 1).
      const __m512i codes = _mm512_permutexvar_epi32(bucket, code_of);
      const __m512i pairs = _mm512_or_si512(_mm512_slli_epi64(codes, 4), _mm512_srli_epi64(codes, 32));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(packed + (b * blocksize + i) / 2), _mm512_cvtepi64_epi8(pairs));
    }
  }
  return last;
}

}  // namespace avx512
FP4_TARGET_END

// AVX-512 for full blocks (unless FP4_CPU_ISA forces a lower ISA: see cpu_isa).
bool vector_quantize(int64_t blocksize) { return cpu_isa() == Isa::kAvx512 && blocksize % 16 == 0; }
#endif

template <typename T>
void quantize_blocks(const Quantizer& quantize, const T* x, int64_t n, int64_t blocksize, uint8_t* packed,
                     float* absmax, int64_t first_block, int64_t last_block) {
  std::vector<float> scaled(static_cast<size_t>(blocksize) + 1);
#ifdef FP4_X86
  // (up to the first block with NaN or Inf, which the scalar path below reports)
  if (const int64_t whole_end = std::min(last_block, n / blocksize); vector_quantize(blocksize) && first_block < whole_end)
    first_block = avx512::quantize_full_blocks(quantize, x, blocksize, packed, absmax, first_block, whole_end);
#endif
  for (int64_t b = first_block; b < last_block; ++b) {
    const int64_t start = b * blocksize;
    const int64_t len = std::min(blocksize, n - start);
    float amax = 0.0f;
    bool finite = true;
    for (int64_t i = 0; i < len; ++i) {
      const float v = to_float(x[start + i]);
      finite &= std::isfinite(v);
      amax = std::max(amax, std::fabs(v));
    }
    if (!finite)
      invalid_argument("input: block ", b, " (elements ", start, "..", start + len - 1,
                       ") holds NaN or Inf; 4-bit quantization needs finite values");
    absmax[b] = amax;
    const float denom = std::max(amax, kMinAbsmax);
    if (len == blocksize) {
      const float inv = 1.0f / denom;
      for (int64_t i = 0; i < len; ++i) scaled[i] = std::clamp(to_float(x[start + i]) * inv, -1.0f, 1.0f);
    } else {
      for (int64_t i = 0; i < len; ++i) scaled[i] = std::clamp(to_float(x[start + i]) / denom, -1.0f, 1.0f);
    }
    if (len % 2) scaled[len] = 0.0f;  // pad nibble of an odd element count
    uint8_t* out = packed + start / 2;
    for (int64_t i = 0; i < len; i += 2) out[i / 2] = uint8_t(quantize(scaled[i]) << 4 | quantize(scaled[i + 1]));
  }
}

template <typename T>
void quantize_typed(fp4_quant_type type, const T* x, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax) {
  const Quantizer quantize(type);
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  const int64_t grain = std::max<int64_t>(1, 16384 / blocksize);
  parallel_for(blocks, grain, [&](int64_t b0, int64_t b1) {
    quantize_blocks(quantize, x, n, blocksize, packed, absmax, b0, b1);
  });
}

}  // namespace

void quantize_4bit(fp4_quant_type type, const void* input, fp4_dtype dtype, int64_t n, int64_t blocksize,
                   uint8_t* packed, float* absmax) {
  switch (dtype) {
    case FP4_FLOAT32: return quantize_typed(type, static_cast<const float*>(input), n, blocksize, packed, absmax);
    case FP4_FLOAT16: return quantize_typed(type, static_cast<const half_t*>(input), n, blocksize, packed, absmax);
    case FP4_BFLOAT16:
      return quantize_typed(type, static_cast<const bfloat16_t*>(input), n, blocksize, packed, absmax);
  }
}

}  // namespace fp4::cpu
