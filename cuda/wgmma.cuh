// Hopper warpgroup MMA (wgmma, sm_90a only) for the 4-bit GEMMs (gemm_wgmma.cu, gemm_wgmma_ws.cu).
// The A operand (the decoded weight: 64 rows x 16 k per warpgroup) comes from registers in the
// per-warp fragment layout of mma.sync m16n8k16 (warp w of the group holds rows 16w .. 16w + 15);
// the B operand (the activations: N rows x 16 k, k contiguous) from shared memory through a matrix
// descriptor. The m64nNk16 accumulator holds, per warp, rows g and g + 8 of its 16 (g = lane / 4)
// and for each n8 block j the columns 8j + 2t, 8j + 2t + 1 (t = lane % 4): d[4j], d[4j + 1] in row
// g, d[4j + 2], d[4j + 3] in row g + 8.
//
// The instructions exist only in sm_90a device code (FP4_WGMMA_DEVICE); elsewhere these functions
// trap. The kernels that use them are launched only where gemm_4bit_wgmma_available() says so.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "mma_4bit.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FP4_WGMMA_DEVICE 1
#endif

namespace fp4::cuda::wgmma {

// Shared-memory matrix descriptor of a K-major tile in the 128-byte swizzle: rows of 64 16-bit
// values (128 bytes) with 16-byte unit u of row r stored at unit u ^ (r % 8) (sw128_offset), 8-row
// groups 1024 bytes apart, the tile 1024-byte aligned. Advancing k by 16 adds 32 bytes to the start.
__device__ __forceinline__ uint64_t smem_desc_sw128(const void* tile) {
  const uint64_t address = uint32_t(__cvta_generic_to_shared(tile));
  return ((address & 0x3ffff) >> 4)     // start address in 16-byte units
         | (uint64_t(1) << 16)          // leading byte offset (unused by swizzled K-major tiles)
         | (uint64_t(1024 >> 4) << 32)  // stride byte offset: 8-row group to 8-row group
         | (uint64_t(1) << 62);         // 128-byte swizzle
}
__device__ __forceinline__ int sw128_offset(int row, int unit) { return row * 128 + ((unit ^ (row & 7)) << 4); }

#ifdef FP4_WGMMA_DEVICE
#define FP4_WGMMA_ONLY(...) __VA_ARGS__
#else
#define FP4_WGMMA_ONLY(...) __trap()
#endif

__device__ __forceinline__ void fence() { FP4_WGMMA_ONLY(asm volatile("wgmma.fence.sync.aligned;" ::: "memory")); }
__device__ __forceinline__ void commit() {
  FP4_WGMMA_ONLY(asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"));
}
template <int N>
__device__ __forceinline__ void wait() {
  FP4_WGMMA_ONLY(asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"));
}
// Orders this thread's generic-proxy shared-memory writes (st.shared, cp.async) before later wgmma reads.
__device__ __forceinline__ void fence_proxy_async() {
  FP4_WGMMA_ONLY(asm volatile("fence.proxy.async.shared::cta;" ::: "memory"));
}
// Keeps the compiler from moving accumulator accesses across the asynchronous multiplies.
template <int R>
__device__ __forceinline__ void pin(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Keeps A-fragment registers allocated until this point: a wgmma reads them asynchronously, so they
// must not be reused before the wait that retires it (placed after that wait).
__device__ __forceinline__ void keep(const uint32_t (&a)[4][4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) asm volatile("" ::"r"(a[j][0]), "r"(a[j][1]), "r"(a[j][2]), "r"(a[j][3]));
}

// The A fragments of one 64-column slice (4 k16 steps) from the lane's two weight rows g and g + 8
// (words[r]: the row's 32 bytes in the bitsandbytes order): word 2j of a row holds columns
// 16j + [0, 8) (byte t: 16j + 2t, + 1 -> A register 0 / 1 for row g / g + 8), word 2j + 1 columns
// 16j + 8 + [0, 8) (-> register 2 / 3). Each byte is one lookup in the pair table of 128-byte rows
// (build_pair_table), at (byte * 256 + lane * 8) >> 1: pair_select = 0x5504 | t << 4 places byte
// t of a word beside lane_x8 = lane * 8. scale_pair[r]: row r's scale as a pair of T.
template <typename T>
__device__ __forceinline__ void decode_slice(const uint32_t (&words)[2][8], const uint32_t (&scale_pair)[2],
                                             const uint8_t* table, uint32_t lane_x8, uint32_t pair_select,
                                             uint32_t (&a)[4][4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const uint32_t offset = __byte_perm(words[r][2 * j + half], lane_x8, pair_select) >> 1;
        a[j][r + 2 * half] = Pair<T>::mul(load_pair(table, offset), scale_pair[r]);
      }
}

// Stores one warp's share of an m64nNk16 accumulator (R = N / 2 values, layout above): the warp's
// rows are output features row0 + [0, 16), the columns batch rows batch0 + [0, N) of y [m, n];
// rows past n and columns past m are skipped. With `partial` the values are added into that fp32
// workspace (k split across blocks; bias comes later), else bias is added and y written.
template <typename T, int R>
__device__ __forceinline__ void store_accumulators(const float (&d)[R], int64_t row0, int64_t batch0, int64_t m,
                                                   int64_t n, const T* bias, T* y, float* partial) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int64_t f = row0 + g + 8 * ((i / 2) % 2);
    const int64_t b = batch0 + 8 * (i / 4) + 2 * t + i % 2;
    if (f >= n || b >= m) continue;
    if (partial != nullptr) {
      atomicAdd(partial + b * n + f, d[i]);
    } else {
      const float bv = bias ? load_as_float(bias + f) : 0.0f;
      y[b * n + f] = store_from_float<T>(d[i] + bv);
    }
  }
}

// d += A x B for one k16 step: A from registers, B from the descriptor (not transposed). The
// element type (f16 / bf16) is the only difference between the two instructions of each N.
// Accumulator operand lists of the multiplies below, in runs of 32.
#define FP4_WGMMA_ACC_0_31 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define FP4_WGMMA_ACC_32_63 \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define FP4_WGMMA_ACC_64_95 \
  "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
  "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
  "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
  "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
#define FP4_WGMMA_ACC_96_127 \
  "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
  "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
  "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
  "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])

template <int N, bool kBf16>
struct Mma;

#define FP4_WGMMA_M64N16K16(TYPE) \
  FP4_WGMMA_ONLY(asm volatile( \
  "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n" \
  "wgmma.mma_async.sync.aligned.m64n16k16.f32." TYPE "." TYPE " {" \
  "%0, %1, %2, %3, %4, %5, %6, %7" \
  "}, {%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}\n" \
  : \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]) \
  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b)))

#define FP4_WGMMA_M64N32K16(TYPE) \
  FP4_WGMMA_ONLY(asm volatile( \
  "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n" \
  "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPE "." TYPE " {" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15" \
  "}, {%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n" \
  : \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]) \
  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b)))

#define FP4_WGMMA_M64N64K16(TYPE) \
  FP4_WGMMA_ONLY(asm volatile( \
  "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n" \
  "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " {" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31" \
  "}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n" \
  : \
  FP4_WGMMA_ACC_0_31 \
  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b)))

#define FP4_WGMMA_M64N128K16(TYPE) \
  FP4_WGMMA_ONLY(asm volatile( \
  "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n" \
  "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63" \
  "}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n" \
  : \
  FP4_WGMMA_ACC_0_31, \
  FP4_WGMMA_ACC_32_63 \
  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b)))

#define FP4_WGMMA_M64N256K16(TYPE) \
  FP4_WGMMA_ONLY(asm volatile( \
  "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n" \
  "wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPE "." TYPE " {" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127" \
  "}, {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n" \
  : \
  FP4_WGMMA_ACC_0_31, \
  FP4_WGMMA_ACC_32_63, \
  FP4_WGMMA_ACC_64_95, \
  FP4_WGMMA_ACC_96_127 \
  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b)))

template <>
struct Mma<16, false> {
  static __device__ __forceinline__ void run(float (&d)[8], const uint32_t (&a)[4], uint64_t desc_b) {
    FP4_WGMMA_M64N16K16("f16");
  }
};

template <>
struct Mma<16, true> {
  static __device__ __forceinline__ void run(float (&d)[8], const uint32_t (&a)[4], uint64_t desc_b) {
    FP4_WGMMA_M64N16K16("bf16");
  }
};

template <>
struct Mma<32, false> {
  static __device__ __forceinline__ void run(float (&d)[16], const uint32_t (&a)[4], uint64_t desc_b) {
    FP4_WGMMA_M64N32K16("f16");
  }
};

template <>
struct Mma<32, true> {
  static __device__ __forceinline__ void run(float (&d)[16], const uint32_t (&a)[4], uint64_t desc_b) {
    FP4_WGMMA_M64N32K16("bf16");
  }
};

template <>
struct Mma<64, false> {
  static __device__ __forceinline__ void run(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b) {
    FP4_WGMMA_M64N64K16("f16");
  }
};

template <>
struct Mma<64, true> {
  static __device__ __forceinline__ void run(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b) {
    FP4_WGMMA_M64N64K16("bf16");
  }
};

template <>
struct Mma<128, false> {
  static __device__ __forceinline__ void run(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b) {
    FP4_WGMMA_M64N128K16("f16");
  }
};

template <>
struct Mma<128, true> {
  static __device__ __forceinline__ void run(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b) {
    FP4_WGMMA_M64N128K16("bf16");
  }
};

template <>
struct Mma<256, false> {
  static __device__ __forceinline__ void run(float (&d)[128], const uint32_t (&a)[4], uint64_t desc_b) {
    FP4_WGMMA_M64N256K16("f16");
  }
};

template <>
struct Mma<256, true> {
  static __device__ __forceinline__ void run(float (&d)[128], const uint32_t (&a)[4], uint64_t desc_b) {
    FP4_WGMMA_M64N256K16("bf16");
  }
};


#undef FP4_WGMMA_M64N16K16
#undef FP4_WGMMA_M64N32K16
#undef FP4_WGMMA_M64N64K16
#undef FP4_WGMMA_M64N128K16
#undef FP4_WGMMA_M64N256K16
#undef FP4_WGMMA_ACC_0_31
#undef FP4_WGMMA_ACC_32_63
#undef FP4_WGMMA_ACC_64_95
#undef FP4_WGMMA_ACC_96_127
#undef FP4_WGMMA_ONLY

}  // namespace fp4::cuda::wgmma
