// The 4-bit linear layer on the CPU: y = x W^T + b with W decoded on the fly, never materialised.
//
// Each thread takes a range of output features; each block's 16 code values are scaled once and
// weights decoded a vector at a time (AVX2: 8 lanes, two permutes and a blend on the code's top bit;
// AVX-512: 16 lanes, one permute over all 16 codes). Four kernels, chosen per call:
//  - AMX tiles (linear_amx.cpp) for batches from kAmxMinBatch where the CPU has them;
//  - without AMX, from batch outer_min_batch() (k % blocksize == 0): outer products on weight
//    panels decoded once per block of input rows (linear_outer.cpp);
//  - vector tiles (linear_simd.inc: tile_dot) when rows start on a block boundary (k % blocksize
//    == 0): 4 weight rows x 4 input rows (AVX2 2 x 3) per pass, so each activation vector serves
//    several weight rows and each decoded weight vector several input rows;
//  - otherwise one weight row x up to 8 input rows (row_dot), walking the blocks the row covers (a
//    block may straddle two rows), or scalar code without AVX2.
// The vector kernels are compiled for AVX-512 and for AVX2; the best the CPU has runs.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/avx512_load.hpp"
#include "cpu/isa.hpp"
#include "cpu/kernels.hpp"
#include "cpu/linear_amx.hpp"
#include "cpu/linear_outer.hpp"
#include "cpu/parallel.hpp"
#include "cpu/scales.hpp"
#include "dtypes.hpp"
#include "formats.hpp"

namespace fp4::cpu {
namespace {

constexpr int kRowsPerPass = 8;  // input rows sharing one decode
// The tile kernel's fp32 activations per block of input rows (see linear_tiled). (4096, 4096) fp32,
// AVX-512 tiles, ms, one block / 256 / 512 / 1024 KB: batch 128 29.7 / 25.4 / 25.1 / 26.7, 256 76.6
// / 50.5 / 49.3 / 53.8.
constexpr int64_t kXBlockBytes = int64_t(512) << 10;
// The smallest batches that take AMX tiles, per activation type (see linear_amx.cpp). Measured on a
// 2-core Sapphire Rapids VM, (4096, 4096), us, AMX / vector kernel: bf16 batch 4 840 / 951; fp16
// 4 1328 / 913, 8 1397 / 1599, 16 1626 / 3111; fp32 8 1824 / 1661, 16 2340 / 3089, 64 5489 / 12085
// (fp16 and fp32 split into 2 and 3 bf16 parts: more decode per weight and 3 or 6 tile products).
template <typename T>
constexpr int64_t kAmxMinBatch = std::is_same_v<T, bfloat16_t> ? 4 : std::is_same_v<T, half_t> ? 8 : 16;

struct Problem {
  const float* x;       // [m, k] fp32
  const float* x_tile;  // the same in the tile kernel's lane order (Vec::kTileLane), or null
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
// Each ISA gets a small vector policy (width, 16-entry table, decode, fma, horizontal sum) and its
// own copy of the kernel in linear_simd.inc, compiled for that ISA (cpu/isa.hpp).
FP4_TARGET_BEGIN("avx2,fma")
namespace avx2 {
struct Vec {
  static constexpr int kWidth = 8;
  using V = __m256;
  struct Table {
    __m256 lo, hi;  // scaled codes 0..7 and 8..15
  };
  static Table table(const float* code, float scale) {
    const __m256 s = _mm256_set1_ps(scale);
    return {_mm256_mul_ps(_mm256_loadu_ps(code), s), _mm256_mul_ps(_mm256_loadu_ps(code + 8), s)};
  }
  // 8 weights from 4 bytes, in element order (high nibble first within a byte): two 8-lane
  // permutes and a blend on the code's top bit.
  static V decode(const uint8_t* bytes, const Table& t) {
    uint32_t word;
    std::memcpy(&word, bytes, 4);
    const __m256i b = _mm256_cvtepu8_epi32(_mm_cvtsi32_si128(int(word)));
    const __m256i dup = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
    const __m256i q = _mm256_and_si256(_mm256_srlv_epi32(dup, _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0)),
                                       _mm256_set1_epi32(15));
    const __m256 select = _mm256_castsi256_ps(_mm256_slli_epi32(q, 28));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, q), _mm256_permutevar8x32_ps(t.hi, q), select);
  }
  // The same from one broadcast word: each lane shifts its own nibble down (the permutes read only
  // an index's low 3 bits, the blend its top bit), in element order.
  static constexpr int kTileFeatures = 2, kTileRows = 3;  // (16 registers)
  static constexpr int kTileLane[kWidth] = {0, 1, 2, 3, 4, 5, 6, 7};
  static V decode_tile(const uint8_t* bytes, const Table& t) {
    int word;
    std::memcpy(&word, bytes, 4);
    const __m256i q = _mm256_srlv_epi32(_mm256_set1_epi32(word), _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24));
    const __m256 select = _mm256_castsi256_ps(_mm256_slli_epi32(q, 28));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, q), _mm256_permutevar8x32_ps(t.hi, q), select);
  }
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(V v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
  }
};
#include "cpu/linear_simd.inc"
}  // namespace avx2
FP4_TARGET_END

FP4_TARGET_BEGIN("avx512f,avx512bw,avx2,fma")
namespace avx512 {
struct Vec {
  static constexpr int kWidth = 16;
  using V = __m512;
  using Table = __m512;  // all 16 scaled codes in one register
  static Table table(const float* code, float scale) {
    return _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(scale));
  }
  // 16 weights from 8 bytes: duplicate each byte into two lanes, shift the even lanes' copy down a
  // nibble, and look all 16 codes up with one permute.
  static V decode(const uint8_t* bytes, const Table& t) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
    const __m128i dup = _mm_shuffle_epi8(b, _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7));
    const __m512i lanes = _mm512_cvtepu8_epi32(dup);
    const __m512i shift = _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
    const __m512i q = _mm512_and_si512(_mm512_srlv_epi32(lanes, shift), _mm512_set1_epi32(15));
    return _mm512_permutexvar_ps(q, t);
  }
  // 16 weights from 8 bytes in three instructions: the bytes broadcast to every 64-bit lane, lane L
  // shifted to nibble L / 2 of its dword (L % 2), and the permute, which reads only an index's low 4
  // bits. Lane L then holds element kTileLane[L] of the 16, the order x_tile is laid out in.
  static constexpr int kTileFeatures = 4, kTileRows = 4;  // 16 accumulators of 32 registers
  static constexpr int kTileLane[kWidth] = {1, 9, 0, 8, 3, 11, 2, 10, 5, 13, 4, 12, 7, 15, 6, 14};
  static V decode_tile(const uint8_t* bytes, const Table& t) {
    long long word;
    std::memcpy(&word, bytes, 8);
    const __m512i q = _mm512_srlv_epi32(_mm512_set1_epi64(word),
                                        _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28));
    return _mm512_permutexvar_ps(q, t);
  }
  // A row of k activations (k % 16 == 0) as fp32 in kTileLane order.
  template <typename T>
  static void tile_order(const T* in, int64_t k, float* out) {
    const __m512i lanes = _mm512_loadu_si512(kTileLane);
    for (int64_t c = 0; c < k; c += kWidth)
      _mm512_store_ps(out + c, _mm512_permutexvar_ps(lanes, avx512_load::load16(in + c)));
  }
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }
};
#include "cpu/linear_simd.inc"
}  // namespace avx512
FP4_TARGET_END

// The ISA a call uses: cpu_isa() lowered until its vector width divides k (the vector kernels
// need every row and block segment to start on a vector boundary).
Isa chosen_isa(int64_t k) {
  Isa isa = cpu_isa();
  if (isa == Isa::kAvx512 && k % 16 != 0) isa = Isa::kAvx2;
  if (isa == Isa::kAvx2 && k % 8 != 0) isa = Isa::kGeneric;
  return isa;
}
#endif

template <typename T>
void to_fp32(const T* in, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = to_float(in[i]);
}

#ifdef FP4_X86
// x[m, k] as fp32 in the tile kernel's lane order: within each chunk of Vec::kWidth columns, lane L
// holds column kTileLane[L]. 64-byte aligned: with a std::vector's 16-byte alignment every load
// splits two cache lines (17-22% slower at batch 16, measured).
template <typename Vec, typename T>
float* tile_activations(const T* x, int64_t m, int64_t k, std::vector<float>& storage) {
  storage.resize(size_t(m * k) + 16);
  float* out = storage.data() + (16 - reinterpret_cast<uintptr_t>(storage.data()) / 4 % 16) % 16;
  for (int64_t row = 0; row < m; ++row) {
    if constexpr (std::is_same_v<Vec, avx512::Vec>) {
      Vec::tile_order(x + row * k, k, out + row * k);  // (16 at a time: converting one by one took
    } else {                                           // 200 us of a (4096, 4096) fp16 batch-16 call)
      for (int64_t c = 0; c < k; c += Vec::kWidth)
        for (int lane = 0; lane < Vec::kWidth; ++lane)
          out[row * k + c + lane] = to_float(x[row * k + c + Vec::kTileLane[lane]]);
    }
  }
  return out;
}

// y = x W^T + b by tiles of kTileFeatures weight rows x kTileRows input rows (k % blocksize == 0).
using TileKernel = void (*)(const Problem& p, int64_t j0, int features, int64_t r0, int rows, float* out);
template <typename Vec, typename T>
void linear_tiled(const Problem& p, TileKernel tile, const T* bias, T* y) {
  constexpr int F = Vec::kTileFeatures, R = Vec::kTileRows;
  // Enough output features per task that each thread streams a long run of weight rows; a weight
  // row group's bytes stay in L1 while it meets every row group of x.
  const int64_t grain = (std::max<int64_t>(F, 16384 / p.k) + F - 1) / F * F;
  // Input rows in blocks of at most kXBlockBytes of fp32 activations, each block meeting all the
  // task's weight rows before the next: a larger x would come from L3 for every weight row group.
  const int64_t block_rows = std::max<int64_t>(R, kXBlockBytes / int64_t(sizeof(float) * p.k) / R * R);
  parallel_for(p.n, grain, [&](int64_t j_begin, int64_t j_end) {
    float out[F * R];
    for (int64_t block0 = 0; block0 < p.m; block0 += block_rows) {
      const int64_t block1 = std::min(p.m, block0 + block_rows);
      for (int64_t j0 = j_begin; j0 < j_end; j0 += F) {
        const int features = int(std::min<int64_t>(F, j_end - j0));
        for (int64_t r0 = block0; r0 < block1; r0 += R) {
          const int rows = int(std::min<int64_t>(R, block1 - r0));
          tile(p, j0, features, r0, rows, out);
          for (int f = 0; f < features; ++f) {
            const float b = bias ? to_float(bias[j0 + f]) : 0.0f;
            for (int r = 0; r < rows; ++r) y[(r0 + r) * p.n + j0 + f] = from_float<T>(out[f * rows + r] + b);
          }
        }
      }
    }
  });
}
#endif

template <typename T>
void linear_typed(fp4_quant_type type, const T* x, int64_t m, int64_t k, const uint8_t* packed,
                  const fp4_scales& scales, int64_t n, int64_t blocksize, const T* bias, T* y) {
#ifdef FP4_X86
  // Rows that start on a block boundary take a tile kernel: AMX tiles from batch kAmxMinBatch on
  // (where the CPU has them), else vector tiles.
  const Isa tile_isa = chosen_isa(k);
  if (tile_isa == Isa::kAvx512 && m >= kAmxMinBatch<T> && k % 32 == 0 && k % blocksize == 0 && !amx_forced_off() &&
      amx_bf16_usable())
    return linear_amx(x, m, k, packed, scales, n, blocksize, codebook(type), bias, y);
  if (tile_isa != Isa::kGeneric && m >= outer_min_batch(tile_isa) && k % blocksize == 0 &&
      (tile_isa == Isa::kAvx2 || __builtin_cpu_supports("avx512vl")))
    return linear_outer(tile_isa, x, m, k, packed, scales, n, blocksize, codebook(type), bias, y);
  if (tile_isa != Isa::kGeneric && k % blocksize == 0) {
    std::vector<float> storage;
    Problem p{nullptr, nullptr, m, k, n, blocksize, packed, &scales, &codebook(type)};
    if (tile_isa == Isa::kAvx512) {
      p.x_tile = tile_activations<avx512::Vec>(x, m, k, storage);
      return linear_tiled<avx512::Vec>(p, avx512::tile, bias, y);
    }
    p.x_tile = tile_activations<avx2::Vec>(x, m, k, storage);
    return linear_tiled<avx2::Vec>(p, avx2::tile, bias, y);
  }
#endif
  std::vector<float> xf;
  const float* x32;
  if constexpr (std::is_same_v<T, float>) {
    x32 = x;
  } else {
    xf.resize(size_t(m * k));
    to_fp32(x, m * k, xf.data());
    x32 = xf.data();
  }
  const Problem p{x32, nullptr, m, k, n, blocksize, packed, &scales, &codebook(type)};
#ifdef FP4_X86
  const Isa isa = chosen_isa(k);
#endif
  // Enough output features per task that each thread streams a long run of weight rows.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));
  parallel_for(n, grain, [&](int64_t j0, int64_t j1) {
    float acc[kRowsPerPass];
    for (int64_t r0 = 0; r0 < m; r0 += kRowsPerPass) {
      const int rows = int(std::min<int64_t>(kRowsPerPass, m - r0));
      for (int64_t j = j0; j < j1; ++j) {
#ifdef FP4_X86
        if (isa == Isa::kAvx512) {
          avx512::rows(p, j, r0, rows, acc);
        } else if (isa == Isa::kAvx2) {
          avx2::rows(p, j, r0, rows, acc);
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

const char* linear_kernels() {
#ifdef FP4_X86
  switch (chosen_isa(1024)) {
    case Isa::kAvx512: return !amx_forced_off() && amx_bf16_usable() ? "avx512 amx-bf16" : "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kGeneric: break;
  }
#endif
  return "generic";
}

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
