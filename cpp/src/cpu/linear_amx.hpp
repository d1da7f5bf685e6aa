// The CPU linear layer on Intel AMX tiles (linear_amx.cpp).
#pragma once

#include <cstdint>

#include "dtypes.hpp"
#include "formats.hpp"
#include "fp4/fp4.h"

namespace fp4::cpu {

// Whether this CPU has AMX-BF16 (with AVX512-BW/VBMI) and the OS granted this process the tile state
// (asked once).
bool amx_bf16_usable();

// y[m, n] = x[m, k] W^T (+ bias), x, bias and y of one type; needs k % 32 == 0, k % blocksize == 0 and
// amx_bf16_usable(). fp16 and fp32 activations and weights are split into exact bf16 parts.
void linear_amx(const bfloat16_t* x, int64_t m, int64_t k, const uint8_t* packed, const fp4_scales& scales, int64_t n,
                int64_t blocksize, const Codebook& code, const bfloat16_t* bias, bfloat16_t* y);
void linear_amx(const half_t* x, int64_t m, int64_t k, const uint8_t* packed, const fp4_scales& scales, int64_t n,
                int64_t blocksize, const Codebook& code, const half_t* bias, half_t* y);
void linear_amx(const float* x, int64_t m, int64_t k, const uint8_t* packed, const fp4_scales& scales, int64_t n,
                int64_t blocksize, const Codebook& code, const float* bias, float* y);

}  // namespace fp4::cpu
