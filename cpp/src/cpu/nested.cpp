// Nested ("double quant") statistics on the CPU, bit-exact with bitsandbytes' CPU
// quantize_blockwise: the normalised value is mapped to one of 65536 evenly spaced grid points,
//   index = (uint16)((clamp(v, -1, 1) + 1) * 0.5 * 65535 + 0.5),
// and a lookup table built once per codebook gives the nearest code for each grid point (the first
// code whose upper midpoint is not below the grid value).
#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

#include "cpu/kernels.hpp"
#include "cpu/parallel.hpp"
#include "cpu/scales.hpp"
#include "error.hpp"

namespace fp4::cpu {
namespace {

constexpr int kGrid = 65536;

std::vector<uint8_t> build_grid_table(const float* code) {
  float mid[255];
  for (int i = 0; i < 255; ++i) mid[i] = 0.5f * (code[i] + code[i + 1]);
  std::vector<uint8_t> table(kGrid);
  int c = 0;
  for (int i = 0; i < kGrid; ++i) {
    const float v = -1.0f + (2.0f * float(i)) / float(kGrid - 1);
    while (c < 255 && mid[c] < v) ++c;
    table[i] = uint8_t(c);
  }
  return table;
}

inline uint16_t grid_index(float v) {
  v = std::clamp(v, -1.0f, 1.0f);
  const float t = (v + 1.0f) * 0.5f;
  return uint16_t(t * float(kGrid - 1) + 0.5f);
}

}  // namespace

void compress_absmax(const float* absmax, int64_t num_blocks, const float* code, int64_t nested_blocksize,
                     float* offset, bool offset_is_input, uint8_t* codes_out, float* absmax2_out) {
  if (!offset_is_input) {
    double sum = 0.0;
    for (int64_t i = 0; i < num_blocks; ++i) sum += absmax[i];
    *offset = float(sum / double(num_blocks));
  }
  const float mean = *offset;
  if (!std::isfinite(mean)) invalid_argument("offset: the mean of absmax must be finite, got ", mean);
  const std::vector<uint8_t> table = build_grid_table(code);
  const int64_t blocks2 = (num_blocks + nested_blocksize - 1) / nested_blocksize;
  parallel_for(blocks2, 64, [&](int64_t b0, int64_t b1) {
    std::vector<float> centred(static_cast<size_t>(nested_blocksize));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * nested_blocksize;
      const int64_t len = std::min(nested_blocksize, num_blocks - start);
      float amax = 0.0f;
      for (int64_t i = 0; i < len; ++i) {
        centred[i] = absmax[start + i] - mean;
        amax = std::max(amax, std::fabs(centred[i]));
      }
      absmax2_out[b] = amax;
      if (amax == 0.0f) {
        std::fill(codes_out + start, codes_out + start + len, uint8_t(0));
        continue;
      }
      const float inv = 1.0f / amax;
      for (int64_t i = 0; i < len; ++i) codes_out[start + i] = table[grid_index(centred[i] * inv)];
    }
  });
}

void expand_absmax(const fp4_scales& scales, int64_t num_blocks, float* absmax_out) {
  parallel_for(num_blocks, 16384, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) absmax_out[b] = block_scale(scales, b);
  });
}

}  // namespace fp4::cpu
