// The 4-bit linear layer for large batches on x86-64 CPUs without AMX: outer products on decoded
// weight panels (AVX-512, and AVX2 at half the width).
//
// The vector tile kernel (linear.cpp) decodes each weight vector again for every 4 input rows and
// finishes each output with a horizontal sum; past a few dozen rows it trailed torch's dense fp32
// GEMM 1.5-2x. Here 48 weight rows (AVX2: 16) are decoded once per block of input rows into a
// column-major panel (panel[c] = the panel's weights of column c), and 8 input rows (AVX2: 6) at a
// time multiply it as outer products: per column, three (two) panel vectors and the rows' broadcast
// activations feed 24 (12) FMAs into as many accumulators, which hold y's outputs as they are
// stored. (AVX-512, (4096, 4096) fp32, ms, 32 x 12 / 64 x 6 / 48 x 8 rows: batch 64 9.1-9.5 /
// 8.8-9.2 / 8.2, 256 32.1-32.5 / 33.1-34.3 / 31.5-32.4; batch 16 on 48 x 8 2.7 vs the tile kernel's
// 3.4.)
//
// The panel needs no transpose: one gather takes, for a vector of weight rows, the 4 bytes (8
// columns) at a column, and each column is then a shift, a mask, a lookup of the 16 unscaled codes
// and a multiply by the rows' block scales -- code[q] * scale in fp32, the products the
// other kernels use. Sums run over the columns in order, in fp32.
#include "cpu/linear_outer.hpp"

#include <algorithm>
#include <vector>

#include "cpu/avx512_store.hpp"
#include "cpu/isa.hpp"
#include "cpu/parallel.hpp"
#include "cpu/scales.hpp"

namespace fp4::cpu {

#ifdef FP4_X86
namespace {

// Packed fp32 activations per block of input rows (each block decodes every panel once more).
// (4096, 4096) fp32, ms, 256 KB / 512 KB / 1 MB / 2 MB / 4 MB: AVX-512 batch 64 12.5 / 9.7 / 9.2 /
// 8.5 / 8.3-8.8, 256 47.5 / 36.3 / 30.6 / 30.2-30.4 / 29.4-30.8; AVX2 1 MB / 2 MB: 64 21.2 / 19.1,
// 256 77.7 / 72.6.
constexpr int64_t kXBlockBytes = int64_t(2) << 20;
// Column c + i of a gathered 4-byte word: byte i / 2, its high nibble first.
constexpr int kNibbleShift[8] = {4, 0, 12, 8, 20, 16, 28, 24};

// x as groups of R rows, column-interleaved: groups[(g * k + c) * R + r] = x[R g + r][c] (rows past
// m zero), so a pass broadcasts its R activations of a column from one run.
template <int R, typename T>
void pack_groups(const T* x, int64_t m, int64_t k, float* groups) {
  parallel_for((m + R - 1) / R, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      float* out = groups + g * k * R;
      for (int r = 0; r < R; ++r) {
        const int64_t row = g * R + r;
        for (int64_t c = 0; c < k; ++c) out[c * R + r] = row < m ? to_float(x[row * k + c]) : 0.0f;
      }
    }
  });
}

FP4_TARGET_BEGIN("avx512f,avx512bw,avx512vl")
struct Avx512 {
  static constexpr int kPanelRows = 48, kGroupRows = 8, kLanes = 16;  // (24 accumulators)

  // out[c * kPanelRows + f] = weight (f, c) of the `rows` (<= 16) weight rows at `base` (rows past them
  // zero), row_scales holding their block scales ([row][block]).
  static void decode_rows(const uint8_t* base, int64_t k, int64_t blocksize, const float* code, int rows,
                          const float* row_scales, float* out) {
    const int64_t blocks_per_row = k / blocksize;
    const __m512 codes = _mm512_loadu_ps(code);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __mmask16 live = __mmask16((1u << rows) - 1);  // (dead lanes gather nothing: zero weights)
    const __m512i byte_offsets = _mm512_mullo_epi32(lane, _mm512_set1_epi32(int(k / 2)));
    const __m512i scale_offsets = _mm512_mullo_epi32(lane, _mm512_set1_epi32(int(blocks_per_row)));
    __m512 scale = _mm512_setzero_ps();
    for (int64_t c = 0; c < k; c += 8) {
      if (c % blocksize == 0)
        scale = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live,
                                         _mm512_add_epi32(scale_offsets, _mm512_set1_epi32(int(c / blocksize))),
                                         row_scales, 4);
      const __m512i words = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, byte_offsets, base + c / 2, 1);
      for (int i = 0; i < 8; ++i) {
        const __m512i q =
            _mm512_and_si512(_mm512_srlv_epi32(words, _mm512_set1_epi32(kNibbleShift[i])), _mm512_set1_epi32(15));
        _mm512_store_ps(out + (c + i) * kPanelRows, _mm512_mul_ps(_mm512_permutexvar_ps(q, codes), scale));
      }
    }
  }

  // y rows [row0, row0 + rows) x features [j0, j0 + features) = one group of x times the panel
  // (+ bias32).
  template <typename T>
  static void multiply_group(const float* group, int64_t k, const float* panel, const float* bias32, int64_t row0,
                             int rows, int64_t j0, int features, T* y, int64_t n) {
    constexpr int V = kPanelRows / 16;
    __m512 acc[kGroupRows][V];
    for (int r = 0; r < kGroupRows; ++r)
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
    for (int64_t c = 0; c < k; ++c) {
      __m512 w[V];
      for (int v = 0; v < V; ++v) w[v] = _mm512_load_ps(panel + c * kPanelRows + 16 * v);
      const float* column = group + c * kGroupRows;
      for (int r = 0; r < kGroupRows; ++r) {
        const __m512 xv = _mm512_set1_ps(column[r]);
        for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(xv, w[v], acc[r][v]);
      }
    }
    for (int v = 0; v < V; ++v) {
      const int live_features = std::clamp(features - 16 * v, 0, 16);
      if (live_features == 0) break;
      const __mmask16 live = __mmask16((1u << live_features) - 1);
      const __m512 b = _mm512_load_ps(bias32 + 16 * v);
      for (int r = 0; r < rows; ++r)
        avx512_store::store16(y + (row0 + r) * n + j0 + 16 * v, _mm512_add_ps(acc[r][v], b), live);
    }
  }
};
FP4_TARGET_END

FP4_TARGET_BEGIN("avx2,fma")
struct Avx2 {
  static constexpr int kPanelRows = 16, kGroupRows = 6, kLanes = 8;

  // As Avx512::decode_rows for up to 8 rows; the 16 codes looked up as two halves of 8 and a blend
  // on the code's top bit.
  static void decode_rows(const uint8_t* base, int64_t k, int64_t blocksize, const float* code, int rows,
                          const float* row_scales, float* out) {
    const int64_t blocks_per_row = k / blocksize;
    const __m256 codes_low = _mm256_loadu_ps(code), codes_high = _mm256_loadu_ps(code + 8);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(rows), lane);  // (dead lanes gather nothing)
    const __m256i byte_offsets = _mm256_mullo_epi32(lane, _mm256_set1_epi32(int(k / 2)));
    const __m256i scale_offsets = _mm256_mullo_epi32(lane, _mm256_set1_epi32(int(blocks_per_row)));
    __m256 scale = _mm256_setzero_ps();
    for (int64_t c = 0; c < k; c += 8) {
      if (c % blocksize == 0)
        scale = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), row_scales,
                                         _mm256_add_epi32(scale_offsets, _mm256_set1_epi32(int(c / blocksize))),
                                         _mm256_castsi256_ps(live), 4);
      const __m256i words = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), reinterpret_cast<const int*>(base + c / 2),
                                                        byte_offsets, live, 1);
      for (int i = 0; i < 8; ++i) {
        const __m256i q =
            _mm256_and_si256(_mm256_srlv_epi32(words, _mm256_set1_epi32(kNibbleShift[i])), _mm256_set1_epi32(15));
        const __m256 weight = _mm256_blendv_ps(_mm256_permutevar8x32_ps(codes_low, q),
                                               _mm256_permutevar8x32_ps(codes_high, q),
                                               _mm256_castsi256_ps(_mm256_slli_epi32(q, 28)));
        _mm256_store_ps(out + (c + i) * kPanelRows, _mm256_mul_ps(weight, scale));
      }
    }
  }

  template <typename T>
  static void multiply_group(const float* group, int64_t k, const float* panel, const float* bias32, int64_t row0,
                             int rows, int64_t j0, int features, T* y, int64_t n) {
    __m256 acc[kGroupRows][2];
    for (int r = 0; r < kGroupRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t c = 0; c < k; ++c) {
      const __m256 low = _mm256_load_ps(panel + c * kPanelRows), high = _mm256_load_ps(panel + c * kPanelRows + 8);
      const float* column = group + c * kGroupRows;
      for (int r = 0; r < kGroupRows; ++r) {
        const __m256 xv = _mm256_broadcast_ss(column + r);
        acc[r][0] = _mm256_fmadd_ps(xv, low, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(xv, high, acc[r][1]);
      }
    }
    alignas(32) float sums[kPanelRows];
    for (int r = 0; r < rows; ++r) {
      _mm256_store_ps(sums, acc[r][0]);
      _mm256_store_ps(sums + 8, acc[r][1]);
      T* out = y + (row0 + r) * n + j0;
      for (int f = 0; f < features; ++f) out[f] = from_float<T>(sums[f] + bias32[f]);
    }
  }
};
FP4_TARGET_END

// panel[c * P + f] = weight (j0 + f, c) for c < k and f < features (rows past them zero), a vector
// of rows at a time. row_scales: room for a vector of rows' block scales.
template <typename Kernel>
void decode_panel(const uint8_t* packed, const fp4_scales& scales, int64_t k, int64_t blocksize, const float* code,
                  int64_t j0, int features, float* row_scales, float* panel) {
  constexpr int L = Kernel::kLanes, P = Kernel::kPanelRows;
  const int64_t blocks_per_row = k / blocksize;
  for (int part = 0; part < P / L; ++part) {
    const int rows = std::clamp(features - L * part, 0, L);
    float* const out = panel + L * part;
    if (rows == 0) {
      for (int64_t c = 0; c < k; ++c) std::fill_n(out + c * P, L, 0.0f);
      continue;
    }
    const int64_t row0 = j0 + L * part;
    for (int f = 0; f < rows; ++f)
      fill_block_scales(scales, (row0 + f) * blocks_per_row, int(blocks_per_row), row_scales + f * blocks_per_row);
    Kernel::decode_rows(packed + row0 * (k / 2), k, blocksize, code, rows, row_scales, out);
  }
}

template <typename Kernel, typename T>
void run(const T* x, int64_t m, int64_t k, const uint8_t* packed, const fp4_scales& scales, int64_t n, int64_t blocksize,
         const Codebook& code, const T* bias, T* y) {
  constexpr int P = Kernel::kPanelRows, R = Kernel::kGroupRows;
  const int64_t group_count = (m + R - 1) / R;
  std::vector<float> group_storage(size_t(group_count * k * R) + 16);
  float* const groups = group_storage.data() + (16 - reinterpret_cast<uintptr_t>(group_storage.data()) / 4 % 16) % 16;
  pack_groups<R>(x, m, k, groups);
  // Groups per block of input rows (see kXBlockBytes); a task's panels are decoded once per block.
  const int64_t block_groups = std::max<int64_t>(1, kXBlockBytes / (k * R * int64_t(sizeof(float))));
  const int64_t blocks_per_row = k / blocksize;
  parallel_for((n + P - 1) / P, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> panel_storage(size_t(k * P) + 16), row_scales(size_t(Kernel::kLanes * blocks_per_row));
    float* const panel = panel_storage.data() + (16 - reinterpret_cast<uintptr_t>(panel_storage.data()) / 4 % 16) % 16;
    alignas(64) float bias32[64];
    for (int64_t g0 = 0; g0 < group_count; g0 += block_groups) {
      const int64_t g1 = std::min(group_count, g0 + block_groups);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t j0 = p * P;
        const int features = int(std::min<int64_t>(P, n - j0));
        decode_panel<Kernel>(packed, scales, k, blocksize, code.data(), j0, features, row_scales.data(), panel);
        for (int f = 0; f < P; ++f) bias32[f] = bias && f < features ? to_float(bias[j0 + f]) : 0.0f;
        for (int64_t g = g0; g < g1; ++g)
          Kernel::multiply_group(groups + g * k * R, k, panel, bias32, g * R, int(std::min<int64_t>(R, m - g * R)), j0,
                                 features, y, n);
      }
    }
  });
}

}  // namespace

// Two whole passes. (4096, 4096) fp32, ms, vector tiles / outer: AVX-512 (12-row passes then) 16
// 3.29 / 3.37, 24 4.67 / 3.44, (8-row passes) 16 3.34-3.46 / 2.66-2.75; AVX2 8 4.08 / 4.54, 12 5.59
// / 4.36, 16 8.06 / 5.77.
int64_t outer_min_batch(Isa isa) {
  return 2 * (isa == Isa::kAvx512 ? Avx512::kGroupRows : Avx2::kGroupRows);
}

template <typename T>
void linear_outer(Isa isa, const T* x, int64_t m, int64_t k, const uint8_t* packed, const fp4_scales& scales, int64_t n,
                  int64_t blocksize, const Codebook& code, const T* bias, T* y) {
  if (isa == Isa::kAvx512) return run<Avx512>(x, m, k, packed, scales, n, blocksize, code, bias, y);
  run<Avx2>(x, m, k, packed, scales, n, blocksize, code, bias, y);
}

template void linear_outer(Isa, const float*, int64_t, int64_t, const uint8_t*, const fp4_scales&, int64_t, int64_t,
                           const Codebook&, const float*, float*);
template void linear_outer(Isa, const half_t*, int64_t, int64_t, const uint8_t*, const fp4_scales&, int64_t, int64_t,
                           const Codebook&, const half_t*, half_t*);
template void linear_outer(Isa, const bfloat16_t*, int64_t, int64_t, const uint8_t*, const fp4_scales&, int64_t,
                           int64_t, const Codebook&, const bfloat16_t*, bfloat16_t*);
#endif

}  // namespace fp4::cpu
