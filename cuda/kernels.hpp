// CUDA implementations behind the C API (host functions; compiled only when FP4_WITH_CUDA).
// Arguments are already validated by api.cpp; every launch goes on exec.stream.
#pragma once

#include <cstddef>
#include <cstdint>

#include "fp4/fp4.h"

namespace fp4::cuda {

int device_count();

// Makes exec.device_index current for its lifetime and restores the previous device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device_index);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// Throws fp4::Error(FP4_ERROR_INVALID_ARGUMENT) when `ptr` is not memory the device can address.
void check_device_pointer(const void* ptr, int device_index, const char* name);

void quantize_4bit(const fp4_exec& exec, fp4_quant_type type, const void* input, fp4_dtype dtype, int64_t n,
                   int64_t blocksize, uint8_t* packed, float* absmax);

void dequantize_4bit(const fp4_exec& exec, fp4_quant_type type, const uint8_t* packed, const fp4_scales& scales,
                     int64_t n, int64_t blocksize, void* out, fp4_dtype dtype);

int64_t gemv_max_batch();
void linear_4bit(const fp4_exec& exec, fp4_quant_type type, const void* x, fp4_dtype dtype, int64_t m, int64_t k,
                 const uint8_t* packed, const fp4_scales& scales, int64_t n, int64_t blocksize, const void* bias,
                 void* y);

size_t gemm_4bit_workspace_size(int64_t m, int64_t n);
void gemm_4bit(const fp4_exec& exec, fp4_quant_type type, const void* x, fp4_dtype dtype, int64_t m, int64_t k,
               const uint8_t* packed, const fp4_scales& scales, int64_t n, int64_t blocksize, const void* bias,
               void* y, void* workspace);

// Whether gemm_4bit can run its Hopper warpgroup-MMA kernel on this device (an sm_90 GPU and a
// library built for sm_90a).
bool gemm_4bit_wgmma_available(int device_index);

void compress_absmax(const fp4_exec& exec, const float* absmax, int64_t num_blocks, const float* code,
                     int64_t nested_blocksize, float* offset, bool offset_is_input, uint8_t* codes_out,
                     float* absmax2_out);

void expand_absmax(const fp4_exec& exec, const fp4_scales& scales, int64_t num_blocks, float* absmax_out);

}  // namespace fp4::cuda
