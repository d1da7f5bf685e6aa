// The 4-bit linear layer on the CPU: y = x W^T + b with W decoded on the fly, never materialised.
//
// Each thread takes a range of output features. For one weight row it walks the blocks the row
// covers (a block may straddle two rows), builds that block's 16 scaled code values, and decodes 8
// weights at a time into a vector register: AVX2 looks them up with two 8-lane permutes and a blend
// on the code's top bit. The decoded vector is multiplied into up to 8 input rows at once, so the
// decode cost is shared across the batch. The vector functions are compiled for AVX2 and chosen
// at run time (AVX2+FMA when the CPU has it, portable scalar code otherwise; an AVX-512 variant is
// future work -- the AVX2 path runs on AVX-512 machines).
#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FP4_X86 1
#endif

#include "cpu/kernels.hpp"
#include "cpu/parallel.hpp"
#include "cpu/scales.hpp"
#include "dtypes.hpp"
#include "formats.hpp"

namespace fp4::cpu {
namespace {

constexpr int kRowsPerPass = 8;  // input rows sharing one decode

struct Problem {
  const float* x;  // [m, k] fp32
  int64_t m, k, n, blocksize;
  const uint8_t* packed;
  const fp4_scales* scales;
  const Codebook* code;
};

// Portable path: any k (rows may start mid-byte), scalar decode.
void row_dot_generic(const Problem& p, int64_t j, int64_t r0, int rows, float* acc) {
  const int64_t start = j * p.k;
  for (int64_t i = 0; i < p.k;) {
    const int64_t e = start + i;
    const int64_t b = e / p.blocksize;
    const int64_t seg_end = std::min<int64_t>((b + 1) * p.blocksize - start, p.k);
    const float scale = block_scale(*p.scales, b);
    float table[16];
    for (int q = 0; q < 16; ++q) table[q] = (*p.code)[q] * scale;
    for (; i < seg_end; ++i) {
      const int64_t el = start + i;
      const uint8_t byte = p.packed[el >> 1];
      const float w = table[(el & 1) ? (byte & 15) : (byte >> 4)];
      for (int r = 0; r < rows; ++r) acc[r] += w * p.x[(r0 + r) * p.k + i];
    }
  }
}

#ifdef FP4_X86
// 8 weights from 4 bytes: lanes hold codes in element order (high nibble first within a byte).
__attribute__((target("avx2,fma"))) inline __m256 decode8(const uint8_t* bytes, __m256 lo, __m256 hi) {
  uint32_t word;
  std::memcpy(&word, bytes, 4);
  const __m256i b = _mm256_cvtepu8_epi32(_mm_cvtsi32_si128(int(word)));  // byte per lane, duplicated below
  // lanes 0..7 want bytes 0,0,1,1,2,2,3,3: high nibble in even lanes, low in odd lanes
  const __m256i idx = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  const __m256i bytes_dup = _mm256_permutevar8x32_epi32(b, idx);
  const __m256i shift = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);
  const __m256i q = _mm256_and_si256(_mm256_srlv_epi32(bytes_dup, shift), _mm256_set1_epi32(15));
  const __m256 from_lo = _mm256_permutevar8x32_ps(lo, q);
  const __m256 from_hi = _mm256_permutevar8x32_ps(hi, q);
  // code >= 8: take the upper table (bit 3 moved into the sign bit for blendv)
  const __m256 select = _mm256_castsi256_ps(_mm256_slli_epi32(q, 28));
  return _mm256_blendv_ps(from_lo, from_hi, select);
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// Needs k % 8 == 0, so every row and every block segment starts on an 8-element boundary.
template <int R>
__attribute__((target("avx2,fma"))) void row_dot_avx2(const Problem& p, int64_t j, int64_t r0, float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const int64_t start = j * p.k;
  const float* code = p.code->data();
  for (int64_t i = 0; i < p.k;) {
    const int64_t b = (start + i) / p.blocksize;
    const int64_t seg_end = std::min<int64_t>((b + 1) * p.blocksize - start, p.k);
    const __m256 scale = _mm256_set1_ps(block_scale(*p.scales, b));
    const __m256 lo = _mm256_mul_ps(_mm256_loadu_ps(code), scale);
    const __m256 hi = _mm256_mul_ps(_mm256_loadu_ps(code + 8), scale);
    const uint8_t* bytes = p.packed + (start + i) / 2;
    for (; i < seg_end; i += 8, bytes += 4) {
      const __m256 w = decode8(bytes, lo, hi);
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(p.x + (r0 + r) * p.k + i), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}

__attribute__((target("avx2,fma"))) void rows_avx2(const Problem& p, int64_t j, int64_t r0, int rows, float* out) {
  switch (rows) {
    case 1: return row_dot_avx2<1>(p, j, r0, out);
    case 2: return row_dot_avx2<2>(p, j, r0, out);
    case 3: return row_dot_avx2<3>(p, j, r0, out);
    case 4: return row_dot_avx2<4>(p, j, r0, out);
    case 5: return row_dot_avx2<5>(p, j, r0, out);
    case 6: return row_dot_avx2<6>(p, j, r0, out);
    case 7: return row_dot_avx2<7>(p, j, r0, out);
    default: return row_dot_avx2<8>(p, j, r0, out);
  }
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

template <typename T>
void to_fp32(const T* in, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = to_float(in[i]);
}

template <typename T>
void linear_typed(fp4_quant_type type, const T* x, int64_t m, int64_t k, const uint8_t* packed,
                  const fp4_scales& scales, int64_t n, int64_t blocksize, const T* bias, T* y) {
  std::vector<float> xf;
  const float* x32;
  if constexpr (std::is_same_v<T, float>) {
    x32 = x;
  } else {
    xf.resize(size_t(m * k));
    to_fp32(x, m * k, xf.data());
    x32 = xf.data();
  }
  const Problem p{x32, m, k, n, blocksize, packed, &scales, &codebook(type)};
#ifdef FP4_X86
  const bool vector = cpu_has_avx2() && k % 8 == 0;
#else
  const bool vector = false;
#endif
  // Enough output features per task that each thread streams a long run of weight rows.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));
  parallel_for(n, grain, [&](int64_t j0, int64_t j1) {
    float acc[kRowsPerPass];
    for (int64_t r0 = 0; r0 < m; r0 += kRowsPerPass) {
      const int rows = int(std::min<int64_t>(kRowsPerPass, m - r0));
      for (int64_t j = j0; j < j1; ++j) {
#ifdef FP4_X86
        if (vector) {
          rows_avx2(p, j, r0, rows, acc);
        } else
#endif
        {
          std::fill(acc, acc + rows, 0.0f);
          row_dot_generic(p, j, r0, rows, acc);
        }
        const float b = bias ? to_float(bias[j]) : 0.0f;
        for (int r = 0; r < rows; ++r) y[(r0 + r) * n + j] = from_float<T>(acc[r] + b);
      }
    }
  });
}

}  // namespace

void linear_4bit(fp4_quant_type type, const void* x, fp4_dtype dtype, int64_t m, int64_t k, const uint8_t* packed,
                 const fp4_scales& scales, int64_t n, int64_t blocksize, const void* bias, void* y) {
  switch (dtype) {
    case FP4_FLOAT32:
      return linear_typed(type, static_cast<const float*>(x), m, k, packed, scales, n, blocksize,
                          static_cast<const float*>(bias), static_cast<float*>(y));
    case FP4_FLOAT16:
      return linear_typed(type, static_cast<const half_t*>(x), m, k, packed, scales, n, blocksize,
                          static_cast<const half_t*>(bias), static_cast<half_t*>(y));
    case FP4_BFLOAT16:
      return linear_typed(type, static_cast<const bfloat16_t*>(x), m, k, packed, scales, n, blocksize,
                          static_cast<const bfloat16_t*>(bias), static_cast<bfloat16_t*>(y));
  }
}

}  // namespace fp4::cpu
