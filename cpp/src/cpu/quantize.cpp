// 4-bit blockwise quantization on the CPU, bit-exact with bitsandbytes' CPU path
// (backends/default quantize_4bit):
//   absmax  = max |x| over the block (x read as fp32);
//   scaled  = clamp(x * (1 / max(absmax, 1e-38)), -1, 1) for a full block, and
//             clamp(x / max(absmax, 1e-38), -1, 1) for the partial last block (bnb divides there);
//   bucket  = number of midpoints strictly below `scaled` (ties to the lower bucket);
//   code    = sorted_to_code[bucket].
// An odd element count pads the last byte's low nibble with the code of 0.0, as bnb does.
#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

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

template <typename T>
void quantize_blocks(const Quantizer& quantize, const T* x, int64_t n, int64_t blocksize, uint8_t* packed,
                     float* absmax, int64_t first_block, int64_t last_block) {
  std::vector<float> scaled(static_cast<size_t>(blocksize) + 1);
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
