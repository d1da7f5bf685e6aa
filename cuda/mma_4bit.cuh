// Building blocks of the tensor-core 4-bit kernels (gemm_mma.cu: batch 17-64, gemm_stream.cu:
// batch <= 16): fragment types, the mma, cp.async, the code-pair table and its lookups.
//
// Shared facts. The product is computed transposed, y^T = W x^T, so the weight is the mma's A
// operand (16 output features per m16n8k16 tile) and the batch is its N (8 rows of x per tile).
// The k-sum's order is free, so within each 128-wide chunk of k, lane (g = lane/4, t = lane%4) takes
// the *physical* columns 64h + 16t + [0, 16), h = 0, 1, as its logical fragment columns of k16 steps
// 4h .. 4h + 3 (step 4h + j: physical 64h + 16t + 4j + {0,1} -> fragment columns 2t + {0,1}; + {2,3} ->
// 2t + 8 + {0,1}); the activations go through the same map. Each k16 step then lies in one 64-column
// block of every row, so with blocksize >= 64 the mma can run on unscaled codes and the block's
// scale multiplies its four-step partial sums once.
//
// A byte becomes two weights with one shared-memory load from a 256-entry table of code pairs in
// fp16/bf16, one copy per lane so lanes never conflict on banks. Each weight is within one
// fp16/bf16 rounding of the value dequantize_4bit produces.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

#include "common.cuh"
#include "launch.cuh"

namespace fp4::cuda {

constexpr int kChunk = 128;  // k columns per multiply step
constexpr size_t kCodeBytes = (16 + 256) * sizeof(float);  // the format's codes, the nested codebook
constexpr size_t kWarpStageBytes = 2048;                   // a warp's weights per ring stage

// Two values of T in one 32-bit register (low half = the lower k index), and their product with a
// scale held the same way: one HMUL2 per two weights.
template <typename T>
struct Pair;
template <>
struct Pair<__half> {
  static __device__ __forceinline__ uint32_t of(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __forceinline__ uint32_t mul(uint32_t a, uint32_t b) {
    const __half2 r = __hmul2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
};
template <>
struct Pair<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t of(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __forceinline__ uint32_t mul(uint32_t a, uint32_t b) {
    const __nv_bfloat162 r =
        __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
};

template <typename T>
__device__ __forceinline__ void mma16816(float* d, const uint32_t* a, uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Activations in shared memory, 16-byte units. A lane reads units 8h + 2t (+1) of its row in each
// 128-column chunk; in each 128-byte phase of those reads lanes (g, t) and (g + 1, t) hit rows r and
// r + 1, so storing unit p of row r at p ^ (r & 1) puts the 8 reads in 8 different bank groups (row
// strides are multiples of 8 units).
__device__ __forceinline__ int x_unit(int row, int unit) { return unit ^ (row & 1); }

// (shared-memory operands as generic pointers or as shared-window addresses)
__device__ __forceinline__ void cp_async16(uint32_t smem_window, const void* global) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_window), "l"(global));
}
__device__ __forceinline__ void cp_async16(void* smem, const void* global) {
  cp_async16(uint32_t(__cvta_generic_to_shared(smem)), global);
}
// cp_async16 / cp_async4 asking the L2 to fetch the whole 128-byte line around the source (PTX
// prefetch size .L2::128B), for small pieces whose neighbours the next stages read: a line comes
// from DRAM in one request instead of a sector at a time.
__device__ __forceinline__ void cp_async16_line(uint32_t smem_window, const void* global) {
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;" ::"r"(smem_window), "l"(global));
}
__device__ __forceinline__ void cp_async4_line(uint32_t smem_window, const void* global) {
  asm volatile("cp.async.ca.shared.global.L2::128B [%0], [%1], 4;" ::"r"(smem_window), "l"(global));
}
__device__ __forceinline__ void cp_async4(uint32_t smem_window, const void* global) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_window), "l"(global));
}
__device__ __forceinline__ void cp_async4(void* smem, const void* global) {
  cp_async4(uint32_t(__cvta_generic_to_shared(smem)), global);
}
__device__ __forceinline__ uint32_t ld_shared_u32(uint32_t smem_window) {
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(smem_window) : "memory");
  return v;
}
__device__ __forceinline__ uint4 ld_shared_v4(uint32_t smem_window) {
  uint4 v;
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(smem_window)
               : "memory");
  return v;
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// The pair table: byte -> (code[high nibble], code[low nibble]) as a pair of T, in rows of kRowStride
// bytes whose first 128 hold one copy per lane (lane l reads column l: always its own bank); rows
// of 64 bytes hold 16 copies (lanes l and l + 16 share one). `codes` receives the 16 codes (and with
// nested statistics the 256-entry codebook after them); one barrier inside. Thread i fills copies
// 4 (i % U) .. 4 (i % U) + 3 of every (threads / U)-th byte, U the 16-byte units of a row's copies.
template <typename T, int kRowStride, bool kNested>
__device__ __forceinline__ void build_pair_table(uint8_t* table, float* codes, const Code16& code,
                                                 const fp4_scales& scales) {
  if (threadIdx.x < 16) {  // (a static index per candidate: indexing the parameter would copy it to the stack)
    float v = code.v[0];
#pragma unroll
    for (int i = 1; i < 16; ++i) v = threadIdx.x == i ? code.v[i] : v;
    codes[threadIdx.x] = v;
  }
  if constexpr (kNested)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) codes[16 + i] = scales.nested_code[i];
  __syncthreads();
  constexpr int kUnits = kRowStride >= 128 ? 8 : kRowStride / 16;
  for (int byte = threadIdx.x / kUnits; byte < 256; byte += blockDim.x / kUnits) {
    const uint32_t pair = Pair<T>::of(codes[byte >> 4], codes[byte & 15]);
    reinterpret_cast<uint4*>(table + byte * kRowStride)[threadIdx.x % kUnits] = make_uint4(pair, pair, pair, pair);
  }
}

// A byte's table offset for this lane. 128-byte rows: byte * 128 + lane * 4, one shift and one
// and-or (the lane's bits and the byte's do not overlap). 256-byte rows: byte * 256 + lane * 4, one
// byte permute of the word and the lane's offset (one instruction less per byte, twice the table).
template <int B>
__device__ __forceinline__ uint32_t pair_offset(uint32_t word, uint32_t lane_bytes) {
  const uint32_t shifted = B == 0 ? word << 7 : word >> (8 * B - 7);
  return (shifted & 0x7f80u) | lane_bytes;
}
template <int B>
__device__ __forceinline__ uint32_t pair_offset_wide(uint32_t word, uint32_t lane_bytes) {
  return __byte_perm(word, lane_bytes, 0x5504u | (B << 4));
}
__device__ __forceinline__ uint32_t load_pair(const uint8_t* table, uint32_t offset) {
  return *reinterpret_cast<const uint32_t*>(table + offset);
}
// 256-byte rows at a shared-window address that is a multiple of 64 KB: the byte permute of the word
// and `lane_window` (the table's address | lane * 4) forms the whole address, since the table's
// address has no bits where the byte goes — no add per lookup.
template <int B>
__device__ __forceinline__ uint32_t pair_address_aligned(uint32_t word, uint32_t lane_window) {
  return __byte_perm(word, lane_window, 0x7604u | (B << 4));
}
__device__ __forceinline__ uint32_t load_pair_at(uint32_t window_address) {
  uint32_t v;
  // (not volatile: the table is read-only once built, and the lookups may be scheduled freely)
  asm("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(window_address));
  return v;
}

// 16-byte piece p of weight row `row` in a warp's ring stage: rows of kRowBytes, pieces swizzled so
// the 8-byte reads of lanes g = 0..3 (rows row .. row + 3, pieces 2q, 2q + 1) hit 8 bank groups.
template <int kRowBytes>
__device__ __forceinline__ int ring_piece_offset(int row, int piece) {
  const int swizzle = kRowBytes == 128 ? 2 * (row % 4) : 2 * ((row / 2) % 2);
  return row * kRowBytes + ((piece ^ swizzle) * 16);
}

// A nested block's scale: an fp32 multiply then an fp32 add, as bitsandbytes computes it.
__device__ __forceinline__ float nested_scale(const float* nested_code, uint32_t code, float group_absmax,
                                              float nested_offset) {
  return __fadd_rn(mul_ftz(nested_code[code], group_absmax), nested_offset);
}

// One weight row's scales for 128-column chunk c (the lane's columns 64h + 16t + [0, 16) of it), as
// loaded: raw[h] holds the fp32 absmax bits of half h, or with nested statistics its 8-bit code
// (kBlock64: both codes in raw[0]) and group[h] the code's group absmax (kBlock64: group[0]). No
// instruction here reads a loaded value, so the loads never stall the code that issues them;
// finish_scale() completes a scale where it is used. row_elem: the row's first element index.
template <bool kBlock64, bool kNested>
__device__ __forceinline__ void load_chunk_scales(const fp4_scales& s, int64_t row_elem, int64_t c, int t,
                                                  int blocksize_log2, int nested_log2, uint32_t (&raw)[2],
                                                  float (&group)[2]) {
  auto group_of = [&](int64_t block) {
    return s.absmax[nested_log2 >= 0 ? block >> nested_log2 : block / s.nested_blocksize];
  };
  if constexpr (kBlock64) {
    // Blocks 2c and 2c + 1 of the row: the index is even (k % 128 == 0), so the pair is aligned and
    // never straddles a nested group (groups start at even blocks).
    const int64_t block = (row_elem >> 6) + 2 * c;
    if constexpr (kNested) {
      raw[0] = *reinterpret_cast<const uint16_t*>(s.nested_codes + block);
      group[0] = group_of(block);
    } else {
      const uint2 pair = *reinterpret_cast<const uint2*>(s.absmax + block);
      raw[0] = pair.x, raw[1] = pair.y;
    }
  } else {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t block = (row_elem + c * kChunk + 64 * h + 16 * t) >> blocksize_log2;
      if constexpr (kNested) {
        raw[h] = s.nested_codes[block];
        group[h] = group_of(block);
      } else {
        raw[h] = __float_as_uint(s.absmax[block]);
      }
    }
  }
}
template <bool kBlock64, bool kNested>
__device__ __forceinline__ float finish_scale(const uint32_t (&raw)[2], const float (&group)[2], int h,
                                              const float* nested_code, float nested_offset) {
  if constexpr (!kNested)
    return __uint_as_float(raw[h]);
  else if constexpr (kBlock64)
    return nested_scale(nested_code, (raw[0] >> (8 * h)) & 0xffu, group[0], nested_offset);
  else
    return nested_scale(nested_code, raw[h], group[h], nested_offset);
}

// Nested statistics group blocks by nested_blocksize (256 in bitsandbytes): kernels shift by this
// when it is a power of two (>= 0), divide otherwise (-1).
inline int nested_shift(const fp4_scales& scales) {
  const int64_t b = scales.nested_blocksize;
  return scales.nested_codes != nullptr && b > 0 && (b & (b - 1)) == 0 ? log2_of(b) : -1;
}

// Blocksize 64 lets a kernel load a row's two scales of a chunk as one aligned pair (8 bytes, or 2
// nested codes of one group) when the pointers allow it.
inline bool paired_scales_ok(const fp4_scales& scales, int64_t blocksize) {
  if (blocksize != 64) return false;
  if (scales.nested_codes != nullptr)
    return reinterpret_cast<uintptr_t>(scales.nested_codes) % 2 == 0 && scales.nested_blocksize % 2 == 0;
  return reinterpret_cast<uintptr_t>(scales.absmax) % 8 == 0;
}

// Calls launch(T*, tile tag, nested tag, paired tag) with compile-time types for the kernel variant:
// the element type, the batch tile (kNarrow for m <= narrow_max_m, else kWide: n8 tiles per warp in
// the mma.sync kernels, batch rows per block in the wgmma ones), nested statistics or not, and
// paired scale loads or not (never where the kernel's own conditions for them, paired_allowed, fail).
template <int kNarrow, int kWide, typename Launch>
void dispatch_variant(fp4_dtype dtype, int64_t m, int64_t narrow_max_m, const fp4_scales& scales, int64_t blocksize,
                      Launch&& launch, bool paired_allowed = true) {
  const bool paired = paired_allowed && paired_scales_ok(scales, blocksize);
  auto with_paired = [&](auto* tag, auto nt, auto nested) {
    if (paired)
      launch(tag, nt, nested, std::true_type());
    else
      launch(tag, nt, nested, std::false_type());
  };
  auto with_nested = [&](auto* tag, auto nt) {
    if (scales.nested_codes != nullptr)
      with_paired(tag, nt, std::true_type());
    else
      with_paired(tag, nt, std::false_type());
  };
  auto with_tile = [&](auto* tag) {
    if (m <= narrow_max_m)
      with_nested(tag, std::integral_constant<int, kNarrow>());
    else
      with_nested(tag, std::integral_constant<int, kWide>());
  };
  if (dtype == FP4_FLOAT16)
    with_tile(static_cast<__half*>(nullptr));
  else
    with_tile(static_cast<__nv_bfloat16*>(nullptr));
}

// Split-k / stream-k partial sums (fp32 workspace) plus bias, rounded to T.
template <typename T>
__global__ void finish_kernel(const float* __restrict__ partial, int64_t m, int64_t n, const T* __restrict__ bias,
                              T* __restrict__ y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < m * n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = store_from_float<T>(partial[i] + (bias ? load_as_float(bias + i % n) : 0.0f));
}

// How many ways to split k so a grid of `tiles` blocks x splits fills whole waves of `capacity`
// resident blocks: the smallest count whose last wave is >= 90% full (measured: a 1.7-wave grid
// cost 30% at batch 16), at most 16, each split keeping >= min_stages of the `stages` k stages.
inline int64_t wave_filling_splits(int64_t tiles, int64_t stages, int64_t capacity, int64_t min_stages) {
  int64_t splits = 1;
  double best = 0.0;
  for (int64_t s = 1; s <= std::max<int64_t>(1, std::min<int64_t>(16, stages / min_stages)); ++s) {
    const int64_t blocks = tiles * s;
    const double filled = double(blocks) / double(((blocks + capacity - 1) / capacity) * capacity);
    if (filled > best + 1e-9) best = filled, splits = s;
    if (filled >= 0.9) break;
  }
  return splits;
}

// How many ways the Hopper GEMMs (one block per SM) split k for `tiles` tiles of `stages` stages:
// as many as one wave still holds all the blocks, each keeping >= 1024 columns: splits that spill
// into a second wave buy nothing and add fp32 partial sums (splitting 96 tiles into 192 blocks cost
// 15-45%, docs/perf-log.md). Measured on the H100 at batch 64, (28672, 8192) unsplit (112 blocks)
// 137 us vs 7 splits (99% of a wave) 162 us (the partial sums cost more than idle SMs); (4096,
// 14336) 7 splits 47 us vs 1: 256 us.
inline int64_t one_wave_splits(int64_t tiles, int64_t stages, int stage_k, int64_t capacity) {
  int64_t splits = 1;
  while (tiles * (splits + 1) <= capacity && stages / (splits + 1) >= 1024 / stage_k) ++splits;
  return splits;
}
// The grid of gemm_wgmma.cu's kernel: (batch tiles, feature tiles, k splits). Sets stages_per_split.
inline dim3 one_block_per_sm_grid(int64_t m, int64_t n, int batch_rows, int feature_rows, int64_t stages,
                                  int stage_k, int device, int64_t& stages_per_split) {
  const int64_t batch_tiles = (m + batch_rows - 1) / batch_rows, feature_tiles = (n + feature_rows - 1) / feature_rows;
  const int64_t splits = one_wave_splits(batch_tiles * feature_tiles, stages, stage_k, sm_count(device));
  stages_per_split = (stages + splits - 1) / splits;
  const int64_t used_splits = (stages + stages_per_split - 1) / stages_per_split;
  return dim3(unsigned(batch_tiles), unsigned(feature_tiles), unsigned(used_splits));
}

// Runs launch(partial) with partial = the fp32 workspace cleared when the grid splits k
// (`split`), else nullptr; then adds the partial sums and the bias into y.
template <typename T, typename Launch>
void with_partial_sums(bool split, float* workspace, int64_t m, int64_t n, const T* bias, T* y, cudaStream_t stream,
                       Launch&& launch) {
  float* partial = split ? workspace : nullptr;
  if (partial) check(cudaMemsetAsync(partial, 0, size_t(m * n) * sizeof(float), stream), "cudaMemsetAsync");
  launch(partial);
  if (partial) {
    finish_kernel<T><<<grid_for(m * n, 256, 4096), 256, 0, stream>>>(partial, m, n, bias, y);
    check_launch("gemm_4bit finish kernel");
  }
}

// The small-batch kernel (gemm_stream.cu): m <= 16, fp16/bf16, k % 128 == 0, on devices whose
// blocks can hold its shared memory (gemm_4bit_stream_fits; 193-201 KB, so sm_90: the others take
// the tiled kernel, as does FP4_CUDA_STREAM=0 for tests).
bool gemm_4bit_stream_fits(int device, int64_t m);
// The bytes of workspace it needs for batch m (two slots of sums per block).
size_t gemm_4bit_stream_workspace_size(int64_t m);
void gemm_4bit_stream(const fp4_exec& exec, const Code16& code, fp4_dtype dtype, const void* x, int64_t m, int64_t k,
                      const uint8_t* packed, const fp4_scales& scales, int64_t n, int64_t blocksize, const void* bias,
                      void* y, float* workspace);

// The Hopper kernel (gemm_wgmma.cu): batch > 16 where gemm_4bit_wgmma_available(device)
// (kernels.hpp) and gemm_4bit_wgmma_supports(n, k, blocksize, scales).
bool gemm_4bit_wgmma_supports(int64_t n, int64_t k, int64_t blocksize, const fp4_scales& scales);
void gemm_4bit_wgmma(const fp4_exec& exec, const Code16& code, fp4_dtype dtype, const void* x, int64_t m, int64_t k,
                     const uint8_t* packed, const fp4_scales& scales, int64_t n, int64_t blocksize, const void* bias,
                     void* y, float* workspace);
// Its warp-specialized form (gemm_wgmma_ws.cu), called by gemm_4bit_wgmma for batch > 64 and for
// batch 17-64 where gemm_4bit_wgmma_ws_takes_small_batch(k), and by gemm_4bit for batch <= 16 where
// gemm_4bit_wgmma_ws_takes_batch_16.
void gemm_4bit_wgmma_ws(const fp4_exec& exec, const Code16& code, fp4_dtype dtype, const void* x, int64_t m,
                        int64_t k, const uint8_t* packed, const fp4_scales& scales, int64_t n, int64_t blocksize,
                        const void* bias, void* y, float* workspace);
// Whether it can take batch 17-64: its tiles of <= 64 batch rows take stages of 128 columns, in pairs.
bool gemm_4bit_wgmma_ws_takes_small_batch(int64_t k);
// Whether batch m <= 16 goes to the warp-specialized kernel (its 16-row batch tile) rather than the
// stream kernel (gemm_4bit_wgmma_available and _supports hold): the measured rule, or
// FP4_CUDA_WS_BATCH16=0 / 1 (never / wherever it can run, any m <= 16).
bool gemm_4bit_wgmma_ws_takes_batch_16(int device, int64_t m, int64_t n, int64_t k);
// The bytes of fp32 sums it may need in the workspace for batch m (WsWork).
size_t gemm_4bit_wgmma_ws_sums_bytes(int64_t m, int64_t n);

}  // namespace fp4::cuda
