// CPU implementations behind the C API. Arguments are already validated by api.cpp.
#pragma once

#include <cstdint>

#include "fp4/fp4.h"

namespace fp4::cpu {

void quantize_4bit(fp4_quant_type type, const void* input, fp4_dtype dtype, int64_t n, int64_t blocksize,
                   uint8_t* packed, float* absmax);

void dequantize_4bit(fp4_quant_type type, const uint8_t* packed, const fp4_scales& scales, int64_t n,
                     int64_t blocksize, void* out, fp4_dtype dtype);

void linear_4bit(fp4_quant_type type, const void* x, fp4_dtype dtype, int64_t m, int64_t k, const uint8_t* packed,
                 const fp4_scales& scales, int64_t n, int64_t blocksize, const void* bias, void* y);
// What fp4_cpu_kernels reports (a static string).
const char* linear_kernels();

void compress_absmax(const float* absmax, int64_t num_blocks, const float* code, int64_t nested_blocksize,
                     float* offset, bool offset_is_input, uint8_t* codes_out, float* absmax2_out);

void expand_absmax(const fp4_scales& scales, int64_t num_blocks, float* absmax_out);

}  // namespace fp4::cpu
