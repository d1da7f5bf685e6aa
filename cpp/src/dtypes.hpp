// Host-side 16-bit float types with the conversions torch uses (round to nearest even), so that a
// value libfp4 writes is the value torch would have written.
#pragma once

#include <cstdint>
#include <cstring>

namespace fp4 {

struct half_t {
  uint16_t bits;
};
struct bfloat16_t {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float to_float(float x) { return x; }
inline float to_float(bfloat16_t x) { return bits_to_float(uint32_t(x.bits) << 16); }
inline float to_float(half_t h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1fu;
  uint32_t mant = h.bits & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    // subnormal: normalise
    int shift = 0;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      ++shift;
    }
    mant &= 0x3ffu;
    return bits_to_float(sign | uint32_t(113 - shift) << 23 | (mant << 13));
  }
  return bits_to_float(sign | (exp + 112) << 23 | (mant << 13));
}

template <typename T>
T from_float(float x);

template <>
inline float from_float<float>(float x) {
  return x;
}

template <>
inline bfloat16_t from_float<bfloat16_t>(float x) {
  uint32_t u = float_to_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bfloat16_t{0x7fc0};  // NaN, as torch writes it
  u += 0x7fffu + ((u >> 16) & 1u);                                  // round to nearest even
  return bfloat16_t{uint16_t(u >> 16)};
}

template <>
inline half_t from_float<half_t>(float x) {
  const uint32_t u = float_to_bits(x);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return half_t{uint16_t(sign | 0x7e00u)};  // NaN
  if (a >= 0x477ff000u) return half_t{uint16_t(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (a < 0x38800000u) {                                          // below 2^-14: subnormal or zero
    // Adding 0.5 makes the FPU round the mantissa into place (round to nearest even).
    const float f = bits_to_float(a) + 0.5f;
    return half_t{uint16_t(sign | uint16_t(float_to_bits(f) - 0x3f000000u))};
  }
  const uint32_t odd = (a >> 13) & 1u;
  const uint32_t r = a + 0xc8000fffu + odd;  // rebias exponent (-112 << 23) and round to nearest even
  return half_t{uint16_t(sign | uint16_t(r >> 13))};
}

}  // namespace fp4
