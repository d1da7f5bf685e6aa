// 4-bit dequantization on the CPU: out[i] = code[q_i] * scale(block), an fp32 product rounded to the
// output dtype (round to nearest even) -- the arithmetic of bitsandbytes on CPU and CUDA alike.
#include <algorithm>

#include "cpu/kernels.hpp"
#include "cpu/parallel.hpp"
#include "cpu/scales.hpp"
#include "dtypes.hpp"
#include "formats.hpp"

namespace fp4::cpu {
namespace {

template <typename T>
void dequantize_typed(fp4_quant_type type, const uint8_t* packed, const fp4_scales& scales, int64_t n,
                      int64_t blocksize, T* out) {
  const Codebook& code = codebook(type);
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  const int64_t grain = std::max<int64_t>(1, 16384 / blocksize);
  parallel_for(blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float scale = block_scale(scales, b);
      // Per-block table of the 16 scaled values: one multiply per code, not per element.
      T table[16];
      for (int q = 0; q < 16; ++q) table[q] = from_float<T>(code[q] * scale);
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      const uint8_t* in = packed + start / 2;
      T* dst = out + start;
      const int64_t pairs = len / 2;
      for (int64_t i = 0; i < pairs; ++i) {
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
