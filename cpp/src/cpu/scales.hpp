// Reading one block's scale from plain or nested statistics (shared by every CPU kernel).
#pragma once

#include <cstdint>

#include "fp4/fp4.h"

namespace fp4::cpu {

inline bool is_nested(const fp4_scales& s) { return s.nested_codes != nullptr; }

// bitsandbytes computes a nested scale in two separate fp32 operations (a dequantize kernel, then
// `absmax += offset`); keeping them separate (no fused multiply-add: this library is built with
// -ffp-contract=off) reproduces its values bit for bit.
inline float block_scale(const fp4_scales& s, int64_t block) {
  if (!is_nested(s)) return s.absmax[block];
  const float scaled = s.nested_code[s.nested_codes[block]] * s.absmax[block / s.nested_blocksize];
  return scaled + *s.nested_offset;
}

}  // namespace fp4::cpu
