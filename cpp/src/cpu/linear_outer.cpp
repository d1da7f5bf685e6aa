// The 4-bit linear layer for large batches on AVX-512 CPUs without AMX: outer products on decoded
// weight panels.
//
// The vector tile kernel (linear.cpp) decodes each weight vector again for every 4 input rows and
// finishes each output with a horizontal sum; past a few dozen rows it trailed torch's dense fp32
// GEMM 1.5-2x. Here 32 weight rows are decoded once per block of input rows into a column-major
// panel (panel[c] = the 32 weights of column c), and 12 input rows at a time multiply it as outer
// products: per column, two panel vectors and 12 broadcast activations feed 24 FMAs into 24
// accumulators that hold 12 x 32 outputs of y as they are stored.
//
// The panel needs no transpose: one 16-lane gather takes, for 16 weight rows, the 4 bytes (8
// columns) at a column, and each column is then a shift, a mask, a permute over the 16 unscaled
// codes and a multiply by the 16 rows' block scales -- code[q] * scale in fp32, the products the
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

constexpr int kPanelRows = 32;                      // weight rows per panel: two vectors of features
constexpr int kGroupRows = 12;                      // input rows per outer-product pass: 24 accumulators
constexpr int64_t kXBlockBytes = int64_t(1) << 20;  // packed fp32 activations per block of input rows

FP4_TARGET_BEGIN("avx512f,avx512bw,avx512vl")

// x as groups of 12 rows, column-interleaved: groups[(g * k + c) * 12 + r] = x[12 g + r][c] (rows
// past m zero), so a pass broadcasts its 12 activations of a column from one 48-byte run.
template <typename T>
void pack_groups(const T* x, int64_t m, int64_t k, float* groups) {
  const int64_t count = (m + kGroupRows - 1) / kGroupRows;
  parallel_for(count, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      float* out = groups + g * k * kGroupRows;
      for (int r = 0; r < kGroupRows; ++r) {
        const int64_t row = g * kGroupRows + r;
        for (int64_t c = 0; c < k; ++c) out[c * kGroupRows + r] = row < m ? to_float(x[row * k + c]) : 0.0f;
      }
    }
  });
}

// panel[c * 32 + f] = weight (j0 + f, c) for c < k and f < features; rows past `features` zero.
// row_scales: room for 16 rows' block scales.
void decode_panel(const uint8_t* packed, const fp4_scales& scales, int64_t k, int64_t blocksize, const float* code,
                  int64_t j0, int features, float* row_scales, float* panel) {
  const int64_t blocks_per_row = k / blocksize;
  const __m512 codes = _mm512_loadu_ps(code);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // Column c + i of a gathered word: byte i / 2, its high nibble first.
  constexpr int kShift[8] = {4, 0, 12, 8, 20, 16, 28, 24};
  for (int half = 0; half < 2; ++half) {
    const int rows = std::clamp(features - 16 * half, 0, 16);
    float* const out = panel + 16 * half;
    if (rows == 0) {
      for (int64_t c = 0; c < k; ++c) _mm512_store_ps(out + c * kPanelRows, _mm512_setzero_ps());
      continue;
    }
    const int64_t row0 = j0 + 16 * half;
    for (int f = 0; f < rows; ++f)
      fill_block_scales(scales, (row0 + f) * blocks_per_row, int(blocks_per_row), row_scales + f * blocks_per_row);
    const __mmask16 live = __mmask16((1u << rows) - 1);  // (dead lanes gather nothing: zero weights)
    const __m512i byte_offsets = _mm512_mullo_epi32(lane, _mm512_set1_epi32(int(k / 2)));
    const __m512i scale_offsets = _mm512_mullo_epi32(lane, _mm512_set1_epi32(int(blocks_per_row)));
    const uint8_t* const base = packed + row0 * (k / 2);
    __m512 scale = _mm512_setzero_ps();
    for (int64_t c = 0; c < k; c += 8) {
      if (c % blocksize == 0)
        scale = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live,
                                         _mm512_add_epi32(scale_offsets, _mm512_set1_epi32(int(c / blocksize))),
                                         row_scales, 4);
      const __m512i words = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, byte_offsets, base + c / 2, 1);
      for (int i = 0; i < 8; ++i) {
        const __m512i q = _mm512_and_si512(_mm512_srlv_epi32(words, _mm512_set1_epi32(kShift[i])), _mm512_set1_epi32(15));
        _mm512_store_ps(out + (c + i) * kPanelRows, _mm512_mul_ps(_mm512_permutexvar_ps(q, codes), scale));
      }
    }
  }
}

// y rows [row0, row0 + rows) x features [j0, j0 + features) = one group of x times the panel (+ bias32).
template <typename T>
void multiply_group(const float* group, int64_t k, const float* panel, const float* bias32, int64_t row0, int rows,
                    int64_t j0, int features, T* y, int64_t n) {
  __m512 acc[kGroupRows][2];
  for (int r = 0; r < kGroupRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t c = 0; c < k; ++c) {
    const __m512 low = _mm512_load_ps(panel + c * kPanelRows), high = _mm512_load_ps(panel + c * kPanelRows + 16);
    const float* column = group + c * kGroupRows;
    for (int r = 0; r < kGroupRows; ++r) {
      const __m512 xv = _mm512_set1_ps(column[r]);
      acc[r][0] = _mm512_fmadd_ps(xv, low, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xv, high, acc[r][1]);
    }
  }
  const __mmask16 live_low = __mmask16((1u << std::min(features, 16)) - 1);
  const __mmask16 live_high = __mmask16((1u << std::max(features - 16, 0)) - 1);
  const __m512 bias_low = _mm512_load_ps(bias32), bias_high = _mm512_load_ps(bias32 + 16);
  for (int r = 0; r < rows; ++r) {
    T* out = y + (row0 + r) * n + j0;
    avx512_store::store16(out, _mm512_add_ps(acc[r][0], bias_low), live_low);
    if (live_high) avx512_store::store16(out + 16, _mm512_add_ps(acc[r][1], bias_high), live_high);
  }
}

FP4_TARGET_END

}  // namespace

int64_t outer_min_batch() { return 32; }

template <typename T>
void linear_outer(const T* x, int64_t m, int64_t k, const uint8_t* packed, const fp4_scales& scales, int64_t n,
                  int64_t blocksize, const Codebook& code, const T* bias, T* y) {
  const int64_t group_count = (m + kGroupRows - 1) / kGroupRows;
  std::vector<float> group_storage(size_t(group_count * k * kGroupRows) + 16);
  float* const groups =
      group_storage.data() + (16 - reinterpret_cast<uintptr_t>(group_storage.data()) / 4 % 16) % 16;
  pack_groups(x, m, k, groups);
  // Groups per block of input rows: a block's activations and a panel (k x 128 bytes) share the L2.
  const int64_t block_groups = std::max<int64_t>(1, kXBlockBytes / (k * kGroupRows * int64_t(sizeof(float))));
  const int64_t blocks_per_row = k / blocksize;
  parallel_for((n + kPanelRows - 1) / kPanelRows, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> panel_storage(size_t(k * kPanelRows) + 16), row_scales(size_t(16 * blocks_per_row));
    float* const panel =
        panel_storage.data() + (16 - reinterpret_cast<uintptr_t>(panel_storage.data()) / 4 % 16) % 16;
    alignas(64) float bias32[kPanelRows];
    for (int64_t g0 = 0; g0 < group_count; g0 += block_groups) {
      const int64_t g1 = std::min(group_count, g0 + block_groups);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t j0 = p * kPanelRows;
        const int features = int(std::min<int64_t>(kPanelRows, n - j0));
        decode_panel(packed, scales, k, blocksize, code.data(), j0, features, row_scales.data(), panel);
        for (int f = 0; f < kPanelRows; ++f) bias32[f] = bias && f < features ? to_float(bias[j0 + f]) : 0.0f;
        for (int64_t g = g0; g < g1; ++g)
          multiply_group(groups + g * k * kGroupRows, k, panel, bias32, g * kGroupRows,
                         int(std::min<int64_t>(kGroupRows, m - g * kGroupRows)), j0, features, y, n);
      }
    }
  });
}

#else
int64_t outer_min_batch() { return INT64_MAX; }
template <typename T>
void linear_outer(const T*, int64_t, int64_t, const uint8_t*, const fp4_scales&, int64_t, int64_t, const Codebook&,
                  const T*, T*) {}
#endif

template void linear_outer(const float*, int64_t, int64_t, const uint8_t*, const fp4_scales&, int64_t, int64_t,
                           const Codebook&, const float*, float*);
template void linear_outer(const half_t*, int64_t, int64_t, const uint8_t*, const fp4_scales&, int64_t, int64_t,
                           const Codebook&, const half_t*, half_t*);
template void linear_outer(const bfloat16_t*, int64_t, int64_t, const uint8_t*, const fp4_scales&, int64_t, int64_t,
                           const Codebook&, const bfloat16_t*, bfloat16_t*);

}  // namespace fp4::cpu
