// The 4-bit codebooks and the constants that make quantization bit-exact with bitsandbytes.
#pragma once

#include <array>
#include <cstdint>

#include "fp4/fp4.h"

namespace fp4 {

using Codebook = std::array<float, 16>;

// bitsandbytes' "fp4": index bit 3 is the sign, the low 3 bits an e2m1 pattern in bnb's own order
// (000->0, 001->0.0625, 010->8, 011->12, 100->4, 101->6, 110->2, 111->3), normalised by 12.
// Index 8 is +0 (bnb writes the integer -0, which is 0), so both zeros are positive.
constexpr Codebook kFp4Code = {
    0.0f / 12.0f,  0.0625f / 12.0f,  8.0f / 12.0f,  12.0f / 12.0f,  4.0f / 12.0f,  6.0f / 12.0f,
    2.0f / 12.0f,  3.0f / 12.0f,     0.0f / 12.0f,  -0.0625f / 12.0f, -8.0f / 12.0f, -12.0f / 12.0f,
    -4.0f / 12.0f, -6.0f / 12.0f,    -2.0f / 12.0f, -3.0f / 12.0f};

// NormalFloat4: 16 quantiles of N(0, 1), not symmetric (0 at index 7). Values as bnb stores them.
constexpr Codebook kNf4Code = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f};

inline const Codebook& codebook(fp4_quant_type type) { return type == FP4_QUANT_NF4 ? kNf4Code : kFp4Code; }

// bitsandbytes' CPU quantizer sorts the codebook (argsort), buckets a normalised value by the fp32
// midpoints of neighbours (torch.bucketize: a value equal to a midpoint goes to the lower bucket),
// then maps the sorted position back to a code index. NF4 is already sorted; for FP4 this is the
// order torch's argsort returns (its two zeros: index 0 before index 8).
constexpr std::array<uint8_t, 16> kFp4SortedToCode = {11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3};
constexpr std::array<uint8_t, 16> kNf4SortedToCode = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

inline const std::array<uint8_t, 16>& sorted_to_code(fp4_quant_type type) {
  return type == FP4_QUANT_NF4 ? kNf4SortedToCode : kFp4SortedToCode;
}

// The 15 fp32 midpoints between consecutive sorted code values, computed as torch does:
// (a + b) / 2 in fp32.
inline std::array<float, 15> bucket_bounds(fp4_quant_type type) {
  const Codebook& code = codebook(type);
  const auto& order = sorted_to_code(type);
  std::array<float, 15> bounds{};
  for (int i = 0; i < 15; ++i) bounds[i] = (code[order[i]] + code[order[i + 1]]) / 2.0f;
  return bounds;
}

// The signed dynamic 8-bit code (bitsandbytes.functional.create_dynamic_map()) used for nested absmax.
extern const std::array<float, 256> kDynamicCode;

constexpr bool valid_blocksize(int64_t b) {
  return b == 32 || b == 64 || b == 128 || b == 256 || b == 512 || b == 1024 || b == 2048 || b == 4096;
}

}  // namespace fp4
