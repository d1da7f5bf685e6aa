// Reading one block's scale from plain or nested statistics (shared by every CPU kernel).
#pragma once

#include <cstdint>

#include "fp4/fp4.h"

namespace fp4::cpu {

inline bool is_nested(const fp4_scales& s) { return s.nested_codes != nullptr; }

// bitsandbytes computes a nested scale in two separate fp32 operations (a dequantize kernel, then
// `absmax += offset`); keeping them separate (no fused multiply-add: this library is built with
// -ffp-contract=off) reproduces its values bit for bit.
inline float nested_scale(const fp4_scales& s, int64_t block, int64_t group) {
  const float scaled = s.nested_code[s.nested_codes[block]] * s.absmax[group];
  return scaled + *s.nested_offset;
}
inline float block_scale(const fp4_scales& s, int64_t block) {
  return is_nested(s) ? nested_scale(s, block, block / s.nested_blocksize) : s.absmax[block];
}

// The scales of blocks [first, first + count), as block_scale gives them, without a division per
// block (one for the first block's nested group, then a countdown).
inline void fill_block_scales(const fp4_scales& s, int64_t first, int count, float* out) {
  if (!is_nested(s)) {
    for (int c = 0; c < count; ++c) out[c] = s.absmax[first + c];
    return;
  }
  int64_t group = first / s.nested_blocksize, left = s.nested_blocksize - first % s.nested_blocksize;
  for (int c = 0; c < count; ++c) {
    if (left == 0) ++group, left = s.nested_blocksize;
    --left;
    out[c] = nested_scale(s, first + c, group);
  }
}

}  // namespace fp4::cpu
