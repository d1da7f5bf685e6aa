// 4-bit dequantization on CUDA: out[i] = code[q_i] * scale(block) rounded to the output dtype.
// Each thread expands 4 packed bytes (8 outputs) per step; a 16-byte-aligned output gets vector stores.
#include "common.cuh"
#include "kernels.hpp"

namespace fp4::cuda {
namespace {

template <typename T>
__global__ void dequantize_4bit_kernel(const uint8_t* __restrict__ packed, fp4_scales scales, int64_t n,
                                       int blocksize_log2, Code16 code, T* __restrict__ out) {
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = code.v[threadIdx.x];
  __syncthreads();
  const int64_t groups = (n + 7) / 8;  // 8 elements = 4 bytes; blocks hold >= 32 elements, so a group
                                       // never straddles two blocks
  const bool aligned = (reinterpret_cast<uintptr_t>(out) % 16 == 0) && (reinterpret_cast<uintptr_t>(packed) % 4 == 0);
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups; g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t first = g * 8;
    const float scale = block_scale(scales, first >> blocksize_log2);
    if (aligned && first + 8 <= n) {
      const uint32_t word = *reinterpret_cast<const uint32_t*>(packed + first / 2);
      alignas(16) T vals[8];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t byte = (word >> (8 * j)) & 0xffu;
        vals[2 * j] = store_from_float<T>(mul_ftz(table[byte >> 4], scale));
        vals[2 * j + 1] = store_from_float<T>(mul_ftz(table[byte & 15], scale));
      }
      constexpr int kVectors = sizeof(T) * 8 / 16;
#pragma unroll
      for (int v = 0; v < kVectors; ++v)
        reinterpret_cast<uint4*>(out + first)[v] = reinterpret_cast<const uint4*>(vals)[v];
    } else {
      for (int64_t i = first; i < min(first + 8, n); ++i) {
        const uint8_t byte = packed[i / 2];
        const uint8_t q = (i % 2 == 0) ? byte >> 4 : byte & 15;
        out[i] = store_from_float<T>(mul_ftz(table[q], scale));
      }
    }
  }
}

}  // namespace

void dequantize_4bit(const fp4_exec& exec, fp4_quant_type type, const uint8_t* packed, const fp4_scales& scales,
                     int64_t n, int64_t blocksize, void* out, fp4_dtype dtype) {
  const Code16 code = code16_of(type);
  const int log2 = log2_of(blocksize);
  constexpr int kThreads = 256;
  // A bounded grid that strides: one 256-thread CTA per 2048 outputs meant ~900k CTAs for a
  // (28672, 8192) weight, and launching them, not moving bytes, set the time (measured 620 us).
  constexpr int64_t kMaxCtas = 132 * 16;
  const unsigned grid = grid_for((n + 7) / 8, kThreads, kMaxCtas);
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dequantize_4bit_kernel<T><<<grid, kThreads, 0, stream_of(exec)>>>(packed, scales, n, log2, code,
                                                                       static_cast<T*>(out));
  });
  check_launch("dequantize_4bit kernel");
}

}  // namespace fp4::cuda
