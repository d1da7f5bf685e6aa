// The CPU linear layer for bf16 activations on Intel AMX tiles (linear_amx.cpp).
#pragma once

#include <cstdint>

#include "dtypes.hpp"
#include "formats.hpp"
#include "fp4/fp4.h"

namespace fp4::cpu {

// Whether this CPU has AMX-BF16 (with AVX512-BW/VBMI) and the OS granted this process the tile state
// (asked once).
bool amx_bf16_usable();

// y[m, n] = x[m, k] W^T (+ bias) with bf16 x, bias and y; needs k % 32 == 0, k % blocksize == 0 and
// amx_bf16_usable().
void linear_amx_bf16(const bfloat16_t* x, int64_t m, int64_t k, const uint8_t* packed, const fp4_scales& scales,
                     int64_t n, int64_t blocksize, const Codebook& code, const bfloat16_t* bias, bfloat16_t* y);

}  // namespace fp4::cpu
