// Nested ("double quant") statistics on CUDA, bit-exact with bitsandbytes' CUDA quantize_blockwise:
// the centred absmax is scaled by an approximate reciprocal of its block max and coded by bnb's
// binary search over the sorted 256-entry code (ties stay at the pivot).
#include "common.cuh"
#include "kernels.hpp"

namespace fp4::cuda {
namespace {

// One CTA; fp64 accumulation so the mean does not depend on the launch shape.
__global__ void mean_kernel(const float* __restrict__ x, int64_t n, float* __restrict__ mean) {
  __shared__ double partial[1024 / 32];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
  for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xffffffffu, s, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < int(blockDim.x / 32); ++w) total += partial[w];
    *mean = float(total / double(n));
  }
}

// bnb's 8-bit search: seven halving steps from the middle of the code, then a choice between the
// final pivot and its neighbour on the side of x, by the fp32 midpoint.
__device__ uint8_t code_8bit(const float* code, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = code[pivot];
  for (int step = 64; step > 0; step >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += step;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= step;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > val) return x > (upper + val) * 0.5f ? upper_pivot : pivot;
  return x < (lower + val) * 0.5f ? lower_pivot : pivot;
}

constexpr int kCompressThreads = 256;

// One CTA per nested block (at most kCompressThreads values each).
__global__ void compress_kernel(const float* __restrict__ absmax, int64_t num_blocks, const float* __restrict__ code,
                                int64_t nested_blocksize, const float* __restrict__ offset,
                                uint8_t* __restrict__ codes_out, float* __restrict__ absmax2_out) {
  __shared__ float smem_code[256];
  __shared__ float scratch[kCompressThreads / 32];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) smem_code[i] = code[i];
  const int64_t b = blockIdx.x;
  const int64_t i = b * nested_blocksize + threadIdx.x;
  const bool valid = threadIdx.x < nested_blocksize && i < num_blocks;
  const float centred = valid ? __fsub_rn(absmax[i], *offset) : 0.0f;
  float m = valid ? abs_ftz(centred) : 0.0f;
  for (int o = 16; o > 0; o >>= 1) m = max_ftz(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = m;
  __syncthreads();
  m = scratch[0];
  for (int w = 1; w < kCompressThreads / 32; ++w) m = max_ftz(m, scratch[w]);
  if (threadIdx.x == 0) absmax2_out[b] = m;
  if (valid) codes_out[i] = code_8bit(smem_code, mul_ftz(centred, rcp_approx_ftz(m)));
}

__global__ void expand_kernel(fp4_scales scales, int64_t num_blocks, float* __restrict__ out) {
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < num_blocks; b += int64_t(gridDim.x) * blockDim.x)
    out[b] = block_scale(scales, b);
}

}  // namespace

void compress_absmax(const fp4_exec& exec, const float* absmax, int64_t num_blocks, const float* code,
                     int64_t nested_blocksize, float* offset, bool offset_is_input, uint8_t* codes_out,
                     float* absmax2_out) {
  if (nested_blocksize > kCompressThreads)
    fail(FP4_ERROR_NOT_SUPPORTED, "nested_blocksize: CUDA supports up to ", kCompressThreads, ", got ",
         nested_blocksize);
  if (!offset_is_input) {
    mean_kernel<<<1, 1024, 0, stream_of(exec)>>>(absmax, num_blocks, offset);
    check_launch("mean kernel");
  }
  const int64_t blocks2 = (num_blocks + nested_blocksize - 1) / nested_blocksize;
  compress_kernel<<<unsigned(blocks2), kCompressThreads, 0, stream_of(exec)>>>(
      absmax, num_blocks, code, nested_blocksize, offset, codes_out, absmax2_out);
  check_launch("compress_absmax kernel");
}

void expand_absmax(const fp4_exec& exec, const fp4_scales& scales, int64_t num_blocks, float* absmax_out) {
  expand_kernel<<<grid_for(num_blocks, 256), 256, 0, stream_of(exec)>>>(scales, num_blocks, absmax_out);
  check_launch("expand_absmax kernel");
}

}  // namespace fp4::cuda
