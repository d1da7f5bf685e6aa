// The CPU linear layer for large batches on AVX-512 without AMX (linear_outer.cpp).
#pragma once

#include <cstdint>

#include "dtypes.hpp"
#include "formats.hpp"
#include "fp4/fp4.h"

namespace fp4::cpu {

// The smallest batch linear_outer serves (below it the vector tile kernel of linear.cpp is faster).
int64_t outer_min_batch();

// y[m, n] = x[m, k] W^T (+ bias), x, bias and y of one type; needs AVX-512 (F, BW, VL) and k %
// blocksize == 0.
template <typename T>
void linear_outer(const T* x, int64_t m, int64_t k, const uint8_t* packed, const fp4_scales& scales, int64_t n,
                  int64_t blocksize, const Codebook& code, const T* bias, T* y);

}  // namespace fp4::cpu
