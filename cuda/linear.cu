// The 4-bit linear layer on CUDA for small batches (GEMV): y[m, n] = x[m, k] W^T + b, m <= 8.
//
// One warp owns one output feature (with fp32 activations: two) and streams its weight row; each
// code is looked up in a 16-entry shared-memory table (16 floats in 16 distinct banks, so lanes never
// conflict), code * x is accumulated per group of 8 and the block's scale applied once per group.
// fp32 throughout; a warp shuffle reduces the lanes. At batch 1 in fp16 / bf16, large weights look
// a byte's two codes up at once in a pair table (gemv_pair_kernel). Rows whose length is not a
// multiple of 8 take a simple kernel.
#include "common.cuh"
#include "kernels.hpp"
#include "launch.cuh"

#include <algorithm>
#include <type_traits>

namespace fp4::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kLoadsInFlight = 8;
constexpr int kMaxBatch = 8;

// Weights are read once: keep them out of L1.
__device__ __forceinline__ uint32_t load_stream(const uint32_t* p) {
  uint32_t r;
  asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(r) : "l"(p));
  return r;
}

// 8 consecutive activations as floats (one or two 16-byte loads).
template <typename T>
__device__ __forceinline__ void load8(const T* p, float* out);
template <>
__device__ __forceinline__ void load8<float>(const float* p, float* out) {
  const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}
template <>
__device__ __forceinline__ void load8<__half>(const __half* p, float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    out[2 * i] = f.x, out[2 * i + 1] = f.y;
  }
}
template <>
__device__ __forceinline__ void load8<__nv_bfloat16>(const __nv_bfloat16* p, float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    out[2 * i] = f.x, out[2 * i + 1] = f.y;
  }
}

// The codebook into shared memory (threads 0-15; the caller synchronizes).
__device__ __forceinline__ void stage_codes(const Code16& code, float* table) {
  if (threadIdx.x < 16) {  // (a static index per candidate: indexing the parameter would copy it to the stack)
    float v = code.v[0];
#pragma unroll
    for (int i = 1; i < 16; ++i) v = threadIdx.x == i ? code.v[i] : v;
    table[threadIdx.x] = v;
  }
}

// Walks a row's `groups` 4-byte words with lane `lane`'s share, run(std::integral_constant<int, U>,
// base) handling words base, base + 32, ..., base + 32 (U - 1): kLoads words in flight per lane
// (issued before any is used, to keep DRAM requests outstanding), then 4, then 1 for the tail. With
// kWholeRow, a row of exactly 2 kLoads words per lane is requested whole: one round trip per warp
// (measured (14336, 4096) bf16 23.9 -> 21.5 us; longer rows lost 5% with 16 loads in flight).
template <int kLoads, bool kWholeRow, typename Run>
__device__ __forceinline__ void walk_row(int64_t groups, int lane, Run&& run) {
  int64_t base = lane;
  if (kWholeRow && groups == 32 * 2 * kLoads) {
    run(std::integral_constant<int, 2 * kLoads>(), base);
    base += groups;
  }
  for (; base + 32 * (kLoads - 1) < groups; base += 32 * kLoads) run(std::integral_constant<int, kLoads>(), base);
  if constexpr (kLoads > 4)
    for (; base + 32 * 3 < groups; base += 32 * 4) run(std::integral_constant<int, 4>(), base);
  for (; base < groups; base += 32) run(std::integral_constant<int, 1>(), base);
}

// Two rows per warp ask for as many resident blocks as one row gets: 4 per SM at batch <= 2 (one row
// takes 59-64 registers; two would take 74, leaving room for 3), 2 beyond (one row at batch 8: 112).
template <typename T, int M, int R>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, R == 1 ? 1 : (M <= 2 ? 4 : 2))
    gemv_kernel(const T* __restrict__ x, int64_t k, const uint8_t* __restrict__ packed, fp4_scales scales,
                int64_t n, int blocksize_log2, Code16 code, const T* __restrict__ bias, T* __restrict__ y) {
  __shared__ float table[16];
  allow_successor();
  const int lane = threadIdx.x % 32;
  const int64_t j = (int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32) * R;  // the warp's first row
  stage_codes(code, table);
  __syncthreads();
  wait_for_predecessor();
  if (j >= n) return;
  // A lane owns groups of 8 consecutive codes (one 4-byte word), and neighbouring lanes own
  // neighbouring groups: a warp's weight load is 128 contiguous bytes and its activation load 256
  // or 512 contiguous bytes, so the L1 serves each in the fewest wavefronts. (Giving a lane 32
  // consecutive codes instead made the activation loads strided; ncu showed L1 at 95% and the
  // kernel at 44% of the DRAM floor.) With R > 1 the warp sums R rows against one load and
  // conversion of the activations (a row past n repeats the last row; its sums are not stored).
  const int64_t groups = k / 8;
  const uint32_t* rows[R];
  int64_t first_code[R];
#pragma unroll
  for (int q = 0; q < R; ++q) {
    first_code[q] = (j + q < n ? j + q : n - 1) * k;
    rows[q] = reinterpret_cast<const uint32_t*>(packed + first_code[q] / 2);
  }
  float acc[R][M];
#pragma unroll
  for (int q = 0; q < R; ++q)
#pragma unroll
    for (int r = 0; r < M; ++r) acc[q][r] = 0.0f;
  auto consume = [&](const uint32_t (&word)[R], const float (&scale)[R], int64_t g) {
    float xv[M][8];
#pragma unroll
    for (int r = 0; r < M; ++r) load8(x + r * k + g * 8, xv[r]);
#pragma unroll
    for (int q = 0; q < R; ++q) {
      float part[M];
#pragma unroll
      for (int r = 0; r < M; ++r) part[r] = 0.0f;
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const uint32_t byte = (word[q] >> (8 * t)) & 0xffu;
        const float w_even = table[byte >> 4], w_odd = table[byte & 15u];
#pragma unroll
        for (int r = 0; r < M; ++r) part[r] = fmaf(w_odd, xv[r][2 * t + 1], fmaf(w_even, xv[r][2 * t], part[r]));
      }
#pragma unroll
      for (int r = 0; r < M; ++r) acc[q][r] = fmaf(scale[q], part[r], acc[q][r]);
    }
  };
  // A group of 8 codes never straddles two absmax blocks (blocks hold >= 32 codes, rows start on
  // an 8-code boundary).
  auto scale_of = [&](int q, int64_t g) { return block_scale(scales, (first_code[q] + g * 8) >> blocksize_log2); };
  // (at batch 1 the warp's rows are requested whole when they hold 2 kLoadsInFlight words together:
  // k = 4096 at one row, 2048 at two)
  auto run = [&](auto loads, int64_t base) {
    constexpr int U = decltype(loads)::value;
    uint32_t w[U][R];
    float scale[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int q = 0; q < R; ++q) w[u][q] = load_stream(rows[q] + base + 32 * u);
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int q = 0; q < R; ++q) scale[u][q] = scale_of(q, base + 32 * u);
#pragma unroll
    for (int u = 0; u < U; ++u) consume(w[u], scale[u], base + 32 * u);
  };
  walk_row<kLoadsInFlight / R, M == 1>(groups, lane, run);  // (per row: the same bytes in flight for every R)
#pragma unroll
  for (int q = 0; q < R; ++q) {
#pragma unroll
    for (int r = 0; r < M; ++r)
      for (int offset = 16; offset > 0; offset >>= 1) acc[q][r] += __shfl_xor_sync(0xffffffffu, acc[q][r], offset);
    if (lane == 0 && j + q < n) {
      const float b = bias ? load_as_float(bias + j + q) : 0.0f;
#pragma unroll
      for (int r = 0; r < M; ++r) y[r * n + j + q] = store_from_float<T>(acc[q][r] + b);
    }
  }
}

// Batch 1, fp16/bf16, large weights: the one-row kernel is issue-bound there (ncu, (14336, 4096)
// bf16: 63 warp instructions per 8 weights, issue slots 64% busy, DRAM 40%), most of it the decode:
// per byte two table lookups and four shifts and masks. This kernel looks each byte's two codes up
// at once in a 64 KB pair table with a column per lane (256 rows of 32 float2, so a warp's 8-byte
// reads never conflict); one byte permute forms the offset: ~30 instructions per 8 weights. A grid
// of resident 16-warp blocks builds the table once per block and walks the rows.
constexpr int kPairWarps = 16;
constexpr size_t kPairTableBytes = 256 * 32 * sizeof(float2);

template <typename T>
__global__ void __launch_bounds__(kPairWarps * 32)
    gemv_pair_kernel(const T* __restrict__ x, int64_t k, const uint8_t* __restrict__ packed, fp4_scales scales,
                     int64_t n, int blocksize_log2, Code16 code, const T* __restrict__ bias, T* __restrict__ y) {
  extern __shared__ __align__(16) uint8_t pair_table[];
  __shared__ float codes[16];
  allow_successor();
  const int lane = threadIdx.x % 32;
  stage_codes(code, codes);
  __syncthreads();
  // Row b holds (codes[b >> 4], codes[b & 15]) 32 times: the even and odd weight of byte b.
  for (int e = threadIdx.x; e < 256 * 16; e += blockDim.x) {
    const int b = e / 16, pair = e % 16;  // (16-byte stores: two lanes' copies each)
    const float even = codes[b >> 4], odd = codes[b & 15];
    reinterpret_cast<float4*>(pair_table + b * 256)[pair] = make_float4(even, odd, even, odd);
  }
  __syncthreads();
  wait_for_predecessor();
  const uint32_t lane_bytes = uint32_t(lane) * 8;
  const int64_t groups = k / 8, warps = int64_t(gridDim.x) * kPairWarps;
  for (int64_t j = int64_t(blockIdx.x) * kPairWarps + threadIdx.x / 32; j < n; j += warps) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(packed + j * k / 2);
    float acc = 0.0f;
    auto consume = [&](uint32_t word, float scale, int64_t g) {
      float xv[8];
      load8(x + g * 8, xv);
      float part = 0.0f;
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        // byte t of the word picks the row, the lane its column: offset byte * 256 + lane * 8
        const uint32_t offset = __byte_perm(word, lane_bytes, 0x5504u | (t << 4));
        const float2 w = *reinterpret_cast<const float2*>(pair_table + offset);
        part = fmaf(w.y, xv[2 * t + 1], fmaf(w.x, xv[2 * t], part));
      }
      acc = fmaf(scale, part, acc);
    };
    auto scale_of = [&](int64_t g) { return block_scale(scales, (j * k + g * 8) >> blocksize_log2); };
    auto run = [&](auto loads, int64_t base) {
      constexpr int U = decltype(loads)::value;
      uint32_t w[U];
      float scale[U];
#pragma unroll
      for (int u = 0; u < U; ++u) w[u] = load_stream(row + base + 32 * u);
#pragma unroll
      for (int u = 0; u < U; ++u) scale[u] = scale_of(base + 32 * u);
#pragma unroll
      for (int u = 0; u < U; ++u) consume(w[u], scale[u], base + 32 * u);
    };
    walk_row<kLoadsInFlight, true>(groups, lane, run);
    for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (lane == 0) y[j] = store_from_float<T>(acc + (bias ? load_as_float(bias + j) : 0.0f));
  }
}

// Any k: one thread per output element, scalar decode.
template <typename T>
__global__ void linear_generic_kernel(const T* __restrict__ x, int64_t m, int64_t k, const uint8_t* __restrict__ packed,
                                      fp4_scales scales, int64_t n, int64_t blocksize, Code16 code,
                                      const T* __restrict__ bias, T* __restrict__ y) {
  for (int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; o < m * n; o += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = o / n, j = o % n;
    float acc = 0.0f;
    for (int64_t i = 0; i < k; ++i) {
      const int64_t e = j * k + i;
      const uint8_t byte = packed[e / 2];
      const float w = code.v[(e & 1) ? (byte & 15) : (byte >> 4)] * block_scale(scales, e / blocksize);
      acc = fmaf(w, load_as_float(x + r * k + i), acc);
    }
    y[o] = store_from_float<T>(acc + (bias ? load_as_float(bias + j) : 0.0f));
  }
}

// Which GEMV kernel a call runs:
//  - fp32 activations: two rows per warp. Their loads through L1 (1 KB per warp, batch row and 8
//    weights) bounded the one-row kernel (ncu: 6.1M L1 wavefronts against 3.4M at bf16 on (14336,
//    4096)). H100 fp32 nf4, us, one / two rows: batch 1 (14336, 4096) 40.4 / 21.9, (4096, 4096) 12.7 /
//    11.0; batch 8 (14336, 4096) 149.3 / 78.8, (4096, 4096) 43.3 / 23.5 (1.6-2.0x at every batch 1-16
//    on four shapes).
//  - fp16 / bf16 at batch 1, weights of >= 2^24 values: the pair-table kernel. H100 bf16 nf4, us, one
//    row / pairs (same process): (4096, 4096) 8.5 / 7.6, (8192, 8192) 26.8 / 21.5, (11008, 4096) 18.6 /
//    17.8, (4096, 11008) 19.2 / 15.7, (14336, 4096) 23.0 / 22.8, (4096, 14336) 22.2 / 18.8; smaller
//    weights lose the table's build: (2048, 2048) 3.1 / 3.9, (1024, 4096) 4.0 / 4.0.
//  - otherwise fp16 / bf16 take one row: two were slower at batch 1 on three of four shapes
//    ((14336, 4096) 25.6 / 29.9, (4096, 14336) 23.0 / 25.2, (4096, 4096) 8.5 / 9.2; (11008, 4096)
//    18.9 / 17.5), and past batch 2 they run on tensor cores wherever the shape allows.
// FP4_CUDA_GEMV_ROWS=1 / 2 forces the row kernel with that many rows per warp, any dtype and batch;
// FP4_CUDA_GEMV_PAIRS=1 / 0 forces the pair-table kernel on / off at batch 1 in fp16 / bf16 (for
// measuring and testing each).
constexpr int64_t kPairMinWeights = int64_t(1) << 24;

template <typename T>
void launch_gemv_pairs(const fp4_exec& exec, const T* x, int64_t k, const uint8_t* packed, const fp4_scales& scales,
                       int64_t n, int log2, const Code16& code, const T* bias, T* y) {
  constexpr auto kernel = gemv_pair_kernel<T>;
  const int device = exec.device_index;
  allow_dynamic_smem<kernel>(device, kPairTableBytes);
  // Two blocks per SM where the shared memory holds two tables (sm_80, sm_90), else one.
  const int smem_per_sm = device_attribute<cudaDevAttrMaxSharedMemoryPerMultiprocessor>(device, 0);
  const int per_sm = smem_per_sm >= int(2 * (kPairTableBytes + 2048)) ? 2 : 1;
  const int64_t resident = int64_t(sm_count(device)) * per_sm, needed = (n + kPairWarps - 1) / kPairWarps;
  launch_dependent(device, kernel, unsigned(std::min(needed, resident)), kPairWarps * 32, kPairTableBytes,
                   stream_of(exec), "linear_4bit kernel", x, k, packed, scales, n, log2, code, bias, y);
}

template <typename T, int M>
void launch_gemv(const fp4_exec& exec, const T* x, int64_t k, const uint8_t* packed, const fp4_scales& scales, int64_t n,
                 int log2, const Code16& code, const T* bias, T* y) {
  int rows = std::is_same_v<T, float> ? 2 : 1;
  const int forced_rows = switch_setting("FP4_CUDA_GEMV_ROWS");
  const bool rows_forced = forced_rows == 1 || forced_rows == 2;
  if (rows_forced) rows = forced_rows;
  if constexpr (M == 1 && !std::is_same_v<T, float>) {
    const int forced = switch_setting("FP4_CUDA_GEMV_PAIRS");
    const bool pairs = forced == 0 || forced == 1 ? forced == 1 : !rows_forced && n * k >= kPairMinWeights;
    if (pairs) return launch_gemv_pairs(exec, x, k, packed, scales, n, log2, code, bias, y);
  }
  const unsigned grid = unsigned((n + rows * kWarpsPerBlock - 1) / (rows * kWarpsPerBlock));
  const auto launch = [&](auto kernel) {
    launch_dependent(exec.device_index, kernel, grid, kWarpsPerBlock * 32, 0, stream_of(exec), "linear_4bit kernel", x,
                     k, packed, scales, n, log2, code, bias, y);
  };
  if (rows == 2) return launch(gemv_kernel<T, M, 2>);
  launch(gemv_kernel<T, M, 1>);
}

}  // namespace

int64_t gemv_max_batch() { return kMaxBatch; }

void linear_4bit(const fp4_exec& exec, fp4_quant_type type, const void* x, fp4_dtype dtype, int64_t m, int64_t k,
                 const uint8_t* packed, const fp4_scales& scales, int64_t n, int64_t blocksize, const void* bias,
                 void* y) {
  const Code16 code = code16_of(type);
  const int log2 = log2_of(blocksize);
  const bool aligned = reinterpret_cast<uintptr_t>(packed) % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xt = static_cast<const T*>(x);
    const T* bt = static_cast<const T*>(bias);
    T* yt = static_cast<T*>(y);
    if (k % 8 != 0 || !aligned) {
      linear_generic_kernel<T><<<grid_for(m * n, 256), 256, 0, stream_of(exec)>>>(xt, m, k, packed, scales, n,
                                                                                  blocksize, code, bt, yt);
      return;
    }
    switch (m) {
      case 1: return launch_gemv<T, 1>(exec, xt, k, packed, scales, n, log2, code, bt, yt);
      case 2: return launch_gemv<T, 2>(exec, xt, k, packed, scales, n, log2, code, bt, yt);
      case 3: return launch_gemv<T, 3>(exec, xt, k, packed, scales, n, log2, code, bt, yt);
      case 4: return launch_gemv<T, 4>(exec, xt, k, packed, scales, n, log2, code, bt, yt);
      case 5: return launch_gemv<T, 5>(exec, xt, k, packed, scales, n, log2, code, bt, yt);
      case 6: return launch_gemv<T, 6>(exec, xt, k, packed, scales, n, log2, code, bt, yt);
      case 7: return launch_gemv<T, 7>(exec, xt, k, packed, scales, n, log2, code, bt, yt);
      default: return launch_gemv<T, 8>(exec, xt, k, packed, scales, n, log2, code, bt, yt);
    }
  });
  check_launch("linear_4bit kernel");
}

}  // namespace fp4::cuda
