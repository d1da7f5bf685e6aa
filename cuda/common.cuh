// Device helpers shared by the CUDA kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>

#include "error.hpp"
#include "formats.hpp"
#include "fp4/fp4.h"

// Caps one kernel's registers per thread (__maxnreg__, CUDA 12.4+); older toolkits build without the cap.
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 4))
#define FP4_MAX_REGISTERS(n) __maxnreg__(n)
#else
#define FP4_MAX_REGISTERS(n)
#endif

namespace fp4::cuda {

// A kernel switch's setting (FP4_CUDA_*, README: for tests and measurements): the digit it is set
// to, or -1 where it is unset or not one digit (then the measured default holds). Read at every
// launch, so a test may change it between calls.
inline int switch_setting(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] >= '0' && value[0] <= '9' && value[1] == '\0' ? value[0] - '0' : -1;
}

// A format's 16 code values, passed to kernels by value (they copy it to shared memory).
struct Code16 {
  float v[16];
};
inline Code16 code16_of(fp4_quant_type type) {
  Code16 code;
  for (int i = 0; i < 16; ++i) code.v[i] = codebook(type)[i];
  return code;
}

// Blocksizes are powers of two: kernels shift instead of dividing.
inline int log2_of(int64_t blocksize) {
  int log2 = 0;
  while ((int64_t(1) << log2) < blocksize) ++log2;
  return log2;
}

inline cudaStream_t stream_of(const fp4_exec& exec) { return static_cast<cudaStream_t>(exec.stream); }

// Throws with the CUDA error string when the last launch (or `status`) failed.
inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) fail(FP4_ERROR_CUDA, what, ": ", cudaGetErrorString(status));
}
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

inline unsigned grid_for(int64_t work_items, int threads_per_block, int64_t max_blocks = 65535LL * 8) {
  int64_t blocks = (work_items + threads_per_block - 1) / threads_per_block;
  if (blocks < 1) blocks = 1;
  return unsigned(blocks < max_blocks ? blocks : max_blocks);
}

// bitsandbytes builds its kernels with --use_fast_math; these reproduce the instructions that
// flag selects (flush-to-zero arithmetic, approximate reciprocal), so quantization codes match it
// bit for bit while the rest of libfp4 keeps IEEE arithmetic.
__device__ __forceinline__ float mul_ftz(float a, float b) {
  float r;
  asm("mul.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float add_ftz(float a, float b) {
  float r;
  asm("add.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float rcp_approx_ftz(float a) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
}
__device__ __forceinline__ float abs_ftz(float a) {
  float r;
  asm("abs.ftz.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
}
__device__ __forceinline__ float max_ftz(float a, float b) {
  float r;
  asm("max.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

template <typename T>
__device__ __forceinline__ float load_as_float(const T* p);
template <>
__device__ __forceinline__ float load_as_float<float>(const float* p) {
  return *p;
}
template <>
__device__ __forceinline__ float load_as_float<__half>(const __half* p) {
  return __half2float(*p);
}
template <>
__device__ __forceinline__ float load_as_float<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

template <typename T>
__device__ __forceinline__ T store_from_float(float v);
template <>
__device__ __forceinline__ float store_from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half store_from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 store_from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// One block's scale from plain or nested statistics: the nested form is an fp32 multiply then an
// fp32 add, two operations as in bitsandbytes (never contracted into one FMA).
__device__ __forceinline__ float block_scale(const fp4_scales& s, int64_t block) {
  if (s.nested_codes == nullptr) return s.absmax[block];
  const float scaled = mul_ftz(s.nested_code[s.nested_codes[block]], s.absmax[block / s.nested_blocksize]);
  return __fadd_rn(scaled, *s.nested_offset);
}

// Runs `launch(T*)` with the CUDA element type for `dtype`.
template <typename Launch>
void dispatch_dtype(fp4_dtype dtype, Launch&& launch) {
  switch (dtype) {
    case FP4_FLOAT32: launch(static_cast<float*>(nullptr)); break;
    case FP4_FLOAT16: launch(static_cast<__half*>(nullptr)); break;
    case FP4_BFLOAT16: launch(static_cast<__nv_bfloat16*>(nullptr)); break;
  }
}

}  // namespace fp4::cuda
