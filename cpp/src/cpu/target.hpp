// Compiling a region of a file for an instruction set the build does not assume, chosen at run
// time: FP4_TARGET_BEGIN("avx512f,avx512bw") ... FP4_TARGET_END (GCC and clang). GCC 12's own
// AVX-512 headers trip -W(maybe-)uninitialized inside such a region (their _mm*_undefined_*
// idiom), so the region silences those two warnings.
#pragma once

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
