// 4-bit blockwise quantization on CUDA, bit-exact with bitsandbytes' CUDA kernel: absmax = max |x|,
// x is scaled by an approximate reciprocal of absmax (bnb's --use_fast_math) and coded with bnb's
// decision trees (strict '>' against its thresholds). One CTA quantizes one block at a time.
#include <algorithm>

#include "common.cuh"
#include "kernels.hpp"

namespace fp4::cuda {
namespace {

// FP4: the sign goes to bit 3 (x < 0; -0 and NaN count as positive), |x| picks the e2m1 pattern.
__device__ __forceinline__ uint8_t code_fp4(float x) {
  const uint8_t sign = x < 0.0f ? 8 : 0;
  x = fabsf(x);
  uint8_t c;
  if (x > 0.29166667f)
    c = x > 0.583333f ? (x > 0.8333333f ? 0b011 : 0b010) : (x > 0.4166667f ? 0b101 : 0b100);
  else if (x > 0.0859375f)
    c = x > 0.20833333f ? 0b111 : 0b110;
  else
    c = x > 0.00260417f ? 0b001 : 0b000;
  return c + sign;
}

// NF4: a balanced search over the 15 thresholds bnb uses (each a midpoint of neighbouring codes).
__device__ __forceinline__ uint8_t code_nf4(float x) {
  if (x > 0.03979014977812767f) {
    if (x > 0.3893125355243683f) {
      if (x > 0.6427869200706482f) return x > 0.8614784181118011f ? 15 : 14;
      return x > 0.5016634166240692f ? 13 : 12;
    }
    if (x > 0.2035212516784668f) return x > 0.2920137718319893f ? 11 : 10;
    return x > 0.1202552504837513f ? 9 : 8;
  }
  if (x > -0.33967943489551544f) {
    if (x > -0.13791173323988914f) return x > -0.045525018125772476f ? 7 : 6;
    return x > -0.23460740596055984f ? 5 : 4;
  }
  if (x > -0.6106329262256622f) return x > -0.4599952697753906f ? 3 : 2;
  return x > -0.8480964004993439f ? 1 : 0;
}

template <fp4_quant_type kType>
__device__ __forceinline__ uint8_t code_of(float scaled) {
  return kType == FP4_QUANT_NF4 ? code_nf4(scaled) : code_fp4(scaled);
}

// Max over the CTA; every thread gets the result.
__device__ float block_max(float v, float* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) v = max_ftz(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = (blockDim.x + 31) / 32;
  __syncthreads();  // scratch may still be read from the previous block
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float m = scratch[0];
  for (int w = 1; w < warps; ++w) m = max_ftz(m, scratch[w]);
  return m;
}

template <typename T, fp4_quant_type kType>
__global__ void quantize_4bit_kernel(const T* __restrict__ x, int64_t n, int64_t blocksize, int64_t num_blocks,
                                     uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  __shared__ float scratch[32];
  for (int64_t b = blockIdx.x; b < num_blocks; b += gridDim.x) {
    const int64_t start = b * blocksize;
    const int64_t len = min(blocksize, n - start);
    float m = 0.0f;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) m = max_ftz(m, abs_ftz(load_as_float(x + start + i)));
    m = block_max(m, scratch);
    if (threadIdx.x == 0) absmax[b] = m;
    const float inv = rcp_approx_ftz(m);
    // Elements past the end read as 0, as bnb's block load fills them.
    for (int64_t p = threadIdx.x; 2 * p < len; p += blockDim.x) {
      const float lo = load_as_float(x + start + 2 * p);
      const float hi = 2 * p + 1 < len ? load_as_float(x + start + 2 * p + 1) : 0.0f;
      packed[start / 2 + p] = uint8_t(code_of<kType>(mul_ftz(lo, inv)) << 4 | code_of<kType>(mul_ftz(hi, inv)));
    }
  }
}

}  // namespace

void quantize_4bit(const fp4_exec& exec, fp4_quant_type type, const void* input, fp4_dtype dtype, int64_t n,
                   int64_t blocksize, uint8_t* packed, float* absmax) {
  const int64_t num_blocks = (n + blocksize - 1) / blocksize;
  // At least one full warp: the reduction shuffles across all 32 lanes.
  const int threads = int(std::clamp<int64_t>(blocksize / 2, 32, 256));
  const unsigned grid = unsigned(std::min<int64_t>(num_blocks, 65535LL * 16));
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* x = static_cast<const T*>(input);
    if (type == FP4_QUANT_NF4)
      quantize_4bit_kernel<T, FP4_QUANT_NF4>
          <<<grid, threads, 0, stream_of(exec)>>>(x, n, blocksize, num_blocks, packed, absmax);
    else
      quantize_4bit_kernel<T, FP4_QUANT_FP4>
          <<<grid, threads, 0, stream_of(exec)>>>(x, n, blocksize, num_blocks, packed, absmax);
  });
  check_launch("quantize_4bit kernel");
}

}  // namespace fp4::cuda
