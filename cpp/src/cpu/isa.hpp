// Instruction sets on x86-64 (FP4_X86): which one a CPU kernel runs, chosen at run time, and
// compiling a region of a file for one the build does not assume.
//
// FP4_TARGET_BEGIN("avx512f,avx512bw") ... FP4_TARGET_END (GCC and clang). GCC 12's own AVX-512
// headers trip -W(maybe-)uninitialized inside such a region (their _mm*_undefined_* idiom), so the
// region silences those two warnings.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cstdlib>
#include <cstring>
#define FP4_X86 1
#endif

#define FP4_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define FP4_TARGET_BEGIN(isa) FP4_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define FP4_TARGET_END _Pragma("clang attribute pop")
#else
#define FP4_TARGET_BEGIN(isa)                                                                            \
  _Pragma("GCC push_options") FP4_PRAGMA(GCC target(isa)) _Pragma("GCC diagnostic push")               \
      _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"") _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")
#define FP4_TARGET_END _Pragma("GCC diagnostic pop") _Pragma("GCC pop_options")
#endif

#ifdef FP4_X86
namespace fp4::cpu {

enum class Isa { kGeneric, kAvx2, kAvx512 };

// The best vector ISA this CPU has (AVX-512: F and BW; AVX2: with FMA), lowered by the environment
// variable FP4_CPU_ISA=avx2 / generic (testing; read per call so tests can switch it).
inline Isa cpu_isa() {
  static const Isa best = (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) ? Isa::kAvx512
                          : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))       ? Isa::kAvx2
                                                                                                    : Isa::kGeneric;
  Isa isa = best;
  if (const char* forced = std::getenv("FP4_CPU_ISA")) {
    if (std::strcmp(forced, "generic") == 0) isa = Isa::kGeneric;
    if (std::strcmp(forced, "avx2") == 0 && isa == Isa::kAvx512) isa = Isa::kAvx2;
  }
  return isa;
}

// Any FP4_CPU_ISA setting (avx512, avx2, generic) keeps AMX off.
inline bool amx_forced_off() {
  const char* forced = std::getenv("FP4_CPU_ISA");
  return forced != nullptr && forced[0] != '\0';
}

}  // namespace fp4::cpu
#endif
