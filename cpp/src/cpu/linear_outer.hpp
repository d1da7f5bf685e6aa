// The CPU linear layer for large batches on x86-64 without AMX (linear_outer.cpp).
#pragma once

#include <cstdint>

#include "cpu/isa.hpp"
#include "dtypes.hpp"
#include "formats.hpp"
#include "fp4/fp4.h"

#ifdef FP4_X86
namespace fp4::cpu {

// The smallest batch linear_outer serves on `isa` (below it the vector tile kernel of linear.cpp is
// faster).
int64_t outer_min_batch(Isa isa);

// y[m, n] = x[m, k] W^T (+ bias), x, bias and y of one type, on `isa`: kAvx512 (with VL) or kAvx2;
// needs k % 8 == 0 and k % blocksize == 0.
template <typename T>
void linear_outer(Isa isa, const T* x, int64_t m, int64_t k, const uint8_t* packed, const fp4_scales& scales, int64_t n,
                  int64_t blocksize, const Codebook& code, const T* bias, T* y);

}  // namespace fp4::cpu
#endif
