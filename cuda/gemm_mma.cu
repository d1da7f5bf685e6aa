// The 4-bit linear layer on tensor cores: y[m, n] = x[m, k] W^T + b for fp16/bf16 activations,
// read straight from the bitsandbytes layout (no repacking).
//
// The product is computed transposed, y^T = W x^T, so the weight is the mma's A operand (16 output
// features per m16n8k16 tile) and the batch is its N (8 rows of x per tile): a batch of 1-64 wastes
// nothing on padding the weight side.
//
// The trick that lets 4-bit rows feed mma fragments with wide loads: the order of the k-sum is free,
// so within each 128-wide chunk of k, lane (g = lane/4, t = lane%4) takes the 32 *physical*
// columns [32t, 32t + 32) and uses them as its logical fragment columns over the chunk's eight k16
// steps (step j: physical 32t + 4j + {0,1} -> fragment columns 2t + {0,1}; 32t + 4j + {2,3} -> 2t + 8 +
// {0,1}). The activations go through the same map, so each lane loads 16 contiguous bytes of a
// weight row (a warp: 64 contiguous bytes of each of its rows) and 64 contiguous bytes of an
// activation row per chunk, and the 32 codes share one absmax block (blocks hold >= 32 codes).
// A byte becomes two weights with one shared-memory load (a 256-entry table of code pairs in
// fp16/bf16, one copy per lane so lanes never conflict on banks) and one paired multiply by the
// block's scale: each weight is within one fp16/bf16 rounding of the value dequantize_4bit produces
// (which rounds code * scale once, from fp32).
//
// The activations of each chunk are staged once per block in shared memory (cp.async, double
// buffered) instead of each warp reading them through L1: at batch 64 the per-warp reads moved
// ~8x the weight's bytes out of L2.
//
// Work split: a block of 4 warps covers 16*MT*4 output features x 8*NT batch rows; k is split
// across blockIdx.y so that small batches still fill every SM. Split partial sums meet in an fp32
// workspace (atomic adds), then a small kernel adds the bias and rounds.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "kernels.hpp"

#include <atomic>

namespace fp4::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kChunk = 128;  // k columns per pipeline step
constexpr int kStages = 3;   // chunks of weights in flight per lane

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

// 16 bytes of a weight row, read once: bypass L1.
__device__ __forceinline__ uint4 load_weight(const uint8_t* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

// Activations are staged in shared memory once per block and chunk (all four warps read them):
// 8*NT rows of 128 values = 16 units of 16 bytes per row. A lane reads units 4t + 2 half + {0, 1} of
// its row, so unit p of row r is stored at p ^ (2 * (p >> 3)) ^ (r & 1): the 8 lanes of each
// 128-byte shared-memory phase (rows 2i, 2i+1 x t = 0..3) then hit 8 different bank groups.
__device__ __forceinline__ int x_unit(int row, int unit) { return (unit ^ ((unit >> 3) << 1)) ^ (row & 1); }

__device__ __forceinline__ void cp_async16(void* smem, const void* global) {
  const unsigned dst = unsigned(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(global));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }

// With one n8 tile (batch <= 8) the activations are few and each warp reads its own through L1: the
// per-chunk barrier of staging cost more than it saved (H100, (28672, 8192) batch 4: 94 vs 107 us).
template <int NT>
constexpr bool kStageX = NT >= 2;

template <typename T, int NT>
constexpr size_t smem_bytes() {  // pair table + two X stages
  return 256 * 32 * sizeof(uint32_t) + (kStageX<NT> ? 2 * 8 * NT * kChunk * sizeof(T) : 0);
}

// A block's scale in two halves, so the load can be issued a few chunks ahead of its use: `raw` is
// the fp32 absmax, or with nested statistics the 8-bit code (finished by block_scale_finish).
__device__ __forceinline__ float block_scale_issue(const fp4_scales& s, int64_t block) {
  return s.nested_codes == nullptr ? s.absmax[block] : float(s.nested_codes[block]);
}
__device__ __forceinline__ float block_scale_finish(const fp4_scales& s, float raw, int64_t block) {
  if (s.nested_codes == nullptr) return raw;
  const float scaled = mul_ftz(s.nested_code[int(raw)], s.absmax[block / s.nested_blocksize]);
  return __fadd_rn(scaled, *s.nested_offset);
}

// Small batch tiles are capped at 128 registers so 4 blocks (16 warps) fit on an SM.
template <int NT>
constexpr int kMinBlocks = NT <= 2 ? 4 : 1;

template <typename T, int MT, int NT>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks<NT>)
    gemm_mma_kernel(const T* __restrict__ x, int64_t m, int64_t k, const uint8_t* __restrict__ packed,
                    fp4_scales scales, int64_t n, int blocksize_log2, Code16 code, int64_t chunks_per_split,
                    const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ partial) {
  // byte -> (code[high nibble], code[low nibble]) as a pair of T, one copy per lane: lane l reads
  // column l, i.e. always its own bank, so the random byte values never conflict.
  extern __shared__ __align__(16) uint8_t smem[];
  auto* pairs = reinterpret_cast<uint32_t(*)[32]>(smem);  // [256][32]
  uint4* xs = reinterpret_cast<uint4*>(smem + 256 * 32 * sizeof(uint32_t));  // [2][8 NT][16] units
  for (int i = threadIdx.x; i < 256 * 32; i += blockDim.x)
    pairs[i / 32][i % 32] = Pair<T>::of(code.v[(i / 32) >> 4], code.v[(i / 32) & 15]);

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const uint32_t* my_pairs = &pairs[0][lane];
  const int64_t feature0 = (int64_t(blockIdx.x) * kWarps + warp) * 16 * MT;
  const int64_t batch0 = int64_t(blockIdx.z) * 8 * NT;
  const int64_t chunks = k / kChunk;
  const int64_t chunk_begin = int64_t(blockIdx.y) * chunks_per_split;
  const int64_t chunk_end = min(chunks, chunk_begin + chunks_per_split);
  if (chunk_begin >= chunk_end) return;  // (block-uniform: the barriers below see every warp)

  // This lane's weight rows (g and g + 8 of each m16 tile), their first block, and its activation
  // rows (g of each n8 tile); physical columns [32t, 32t + 32) of every chunk.
  const uint8_t* wrow[MT][2];
  int64_t wblock[MT][2];
  bool wvalid[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t f = feature0 + mt * 16 + h * 8 + g;
      wvalid[mt][h] = f < n;
      const int64_t row = wvalid[mt][h] ? f : 0;
      wrow[mt][h] = packed + row * (k / 2) + t * 16;
      wblock[mt][h] = row * k + t * 32;  // element index; >> blocksize_log2 per chunk
    }
  // Stage chunk c's activations into buffer `buf`: 8 NT rows x 16 units, rows past m as zeros.
  auto stage_x = [&](int buf, int64_t c) {
    for (int i = threadIdx.x; i < 8 * NT * 16; i += kWarps * 32) {
      const int row = i / 16, unit = i % 16;
      uint4* dst = xs + (buf * 8 * NT + row) * 16 + x_unit(row, unit);
      if (batch0 + row < m)
        cp_async16(dst, x + (batch0 + row) * k + c * kChunk + unit * 8);
      else
        *dst = make_uint4(0, 0, 0, 0);
    }
    cp_async_commit();
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;

  // A ring of kStages chunks of weights (and their scales) in registers: chunk c + kStages - 1 is
  // requested while chunk c is multiplied, so several DRAM requests per lane are always in flight.
  uint4 wbuf[kStages][MT][2];
  float sbuf[kStages][MT][2];
  auto issue = [&](int slot, int64_t c) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        wbuf[slot][mt][h] = load_weight(wrow[mt][h] + c * (kChunk / 2));
        sbuf[slot][mt][h] = block_scale_issue(scales, (wblock[mt][h] + c * kChunk) >> blocksize_log2);
      }
  };
  auto compute = [&](int slot, int64_t c) {
    uint32_t scale[MT][2];  // the block scale as a pair of T
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float sc = wvalid[mt][h] ? block_scale_finish(scales, sbuf[slot][mt][h],
                                                            (wblock[mt][h] + c * kChunk) >> blocksize_log2)
                                       : 0.0f;
        scale[mt][h] = Pair<T>::of(sc, sc);
      }
    const uint4* xbuf = xs + ((c - chunk_begin) & 1) * 8 * NT * 16;
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // physical columns 32t + 16 half + [0, 16): steps 4 half .. 4 half + 3
      uint32_t xa[NT][8];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int row = nt * 8 + g, unit = 4 * t + 2 * half;
        uint4 a = make_uint4(0, 0, 0, 0), b = a;
        if constexpr (kStageX<NT>) {
          a = xbuf[row * 16 + x_unit(row, unit)], b = xbuf[row * 16 + x_unit(row, unit + 1)];
        } else if (batch0 + row < m) {
          const uint4* p = reinterpret_cast<const uint4*>(x + (batch0 + row) * k + c * kChunk + unit * 8);
          a = __ldg(p), b = __ldg(p + 1);
        }
        xa[nt][0] = a.x, xa[nt][1] = a.y, xa[nt][2] = a.z, xa[nt][3] = a.w;
        xa[nt][4] = b.x, xa[nt][5] = b.y, xa[nt][6] = b.z, xa[nt][7] = b.w;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          uint32_t a[4];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint4 wv = wbuf[slot][mt][h];
            const uint32_t word = half == 0 ? (j < 2 ? wv.x : wv.y) : (j < 2 ? wv.z : wv.w);
            const uint32_t lo = (word >> (16 * (j % 2))) & 0xffu, hi = (word >> (16 * (j % 2) + 8)) & 0xffu;
            // Byte 2j holds physical columns 4j, 4j+1 (high nibble first); byte 2j+1 holds 4j+2, 4j+3.
            a[h] = Pair<T>::mul(my_pairs[lo * 32], scale[mt][h]);
            a[h + 2] = Pair<T>::mul(my_pairs[hi * 32], scale[mt][h]);
          }
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma16816<T>(acc[mt][nt], a, xa[nt][2 * j], xa[nt][2 * j + 1]);
        }
      }
    }
  };

  if constexpr (kStageX<NT>) stage_x(0, chunk_begin);
  __syncthreads();  // the pair table
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s)
    if (chunk_begin + s < chunk_end) issue(s, chunk_begin + s);
  for (int64_t c = chunk_begin; c < chunk_end; c += kStages) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      if (c + s < chunk_end) {
        // Chunk c+s's activations have landed and every warp is done with chunk c+s-1's buffer,
        // which now receives chunk c+s+1's while this chunk is multiplied.
        if constexpr (kStageX<NT>) {
          cp_async_wait_all();
          __syncthreads();
          if (c + s + 1 < chunk_end) stage_x((c + s + 1 - chunk_begin) & 1, c + s + 1);
        }
        if (c + s + kStages - 1 < chunk_end) issue((s + kStages - 1) % kStages, c + s + kStages - 1);
        compute(s, c + s);
      }
    }
  }

  // acc[mt][nt] = {(f, b), (f, b+1), (f+8, b), (f+8, b+1)} with f = feature0 + 16mt + g, b = batch0 + 8nt + 2t.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t f = feature0 + mt * 16 + g + (i / 2) * 8;
        const int64_t b = batch0 + nt * 8 + 2 * t + (i % 2);
        if (f >= n || b >= m) continue;
        if (partial != nullptr) {
          atomicAdd(partial + b * n + f, acc[mt][nt][i]);
        } else {
          const float bv = bias ? load_as_float(bias + f) : 0.0f;
          y[b * n + f] = store_from_float<T>(acc[mt][nt][i] + bv);
        }
      }
}

template <typename T>
__global__ void finish_kernel(const float* __restrict__ partial, int64_t m, int64_t n, const T* __restrict__ bias,
                              T* __restrict__ y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < m * n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = store_from_float<T>(partial[i] + (bias ? load_as_float(bias + i % n) : 0.0f));
}

int sm_count(int device) {
  static std::atomic<int> cached[64];  // (threads may race to fill it: they store the same value)
  if (device < 0 || device >= 64) return 132;
  if (cached[device].load() == 0) {
    int count = 0;
    check(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    cached[device].store(count);
  }
  return cached[device].load();
}

// Blocks of this kernel resident per SM on `device`; the first call per device also raises the
// kernel's dynamic shared-memory limit there. Cached: the queries cost microseconds per launch.
template <typename T, int MT, int NT>
int resident_blocks(int device) {
  static std::atomic<int> cached[64];  // (threads may race to fill it: they store the same value)
  if (device >= 0 && device < 64 && cached[device].load() > 0) return cached[device].load();
  constexpr size_t smem = smem_bytes<T, NT>();
  check(cudaFuncSetAttribute(gemm_mma_kernel<T, MT, NT>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
        "cudaFuncSetAttribute");
  int resident = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, gemm_mma_kernel<T, MT, NT>, kWarps * 32, smem),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  resident = std::max(resident, 1);
  if (device >= 0 && device < 64) cached[device].store(resident);
  return resident;
}

template <typename T, int MT, int NT>
void launch(const fp4_exec& exec, const T* x, int64_t m, int64_t k, const uint8_t* packed, const fp4_scales& scales,
            int64_t n, int log2, const Code16& code, const T* bias, T* y, float* workspace) {
  const int64_t features_per_block = 16 * MT * kWarps;
  const int64_t tiles = ((n + features_per_block - 1) / features_per_block) * ((m + 8 * NT - 1) / (8 * NT));
  const int64_t chunks = k / kChunk;
  // Split k so the grid fills whole waves of resident blocks: the smallest split count whose last
  // wave is >= 90% full (measured: a 1.7-wave grid cost 30% at batch 16), each split keeping >= 4
  // chunks (512 columns) of work.
  constexpr size_t smem = smem_bytes<T, NT>();
  const int64_t capacity = int64_t(resident_blocks<T, MT, NT>(exec.device_index)) * sm_count(exec.device_index);
  int64_t splits = 1;
  double best = 0.0;
  for (int64_t s = 1; s <= std::max<int64_t>(1, std::min<int64_t>(16, chunks / 4)); ++s) {
    const int64_t blocks = tiles * s;
    const double filled = double(blocks) / double(((blocks + capacity - 1) / capacity) * capacity);
    if (filled > best + 1e-9) best = filled, splits = s;
    if (filled >= 0.9) break;
  }
  const int64_t per_split = (chunks + splits - 1) / splits;
  splits = (chunks + per_split - 1) / per_split;
  const dim3 grid(unsigned((n + features_per_block - 1) / features_per_block), unsigned(splits),
                  unsigned((m + 8 * NT - 1) / (8 * NT)));
  cudaStream_t stream = stream_of(exec);
  float* partial = splits > 1 ? workspace : nullptr;
  if (partial) check(cudaMemsetAsync(partial, 0, size_t(m * n) * sizeof(float), stream), "cudaMemsetAsync");
  gemm_mma_kernel<T, MT, NT><<<grid, kWarps * 32, smem, stream>>>(x, m, k, packed, scales, n, log2, code, per_split, bias,
                                                              y, partial);
  check_launch("gemm_4bit kernel");
  if (partial) {
    finish_kernel<T><<<grid_for(m * n, 256, 4096), 256, 0, stream>>>(partial, m, n, bias, y);
    check_launch("gemm_4bit finish kernel");
  }
}

}  // namespace

size_t gemm_4bit_workspace_size(int64_t m, int64_t n) { return size_t(m) * size_t(n) * sizeof(float); }

void gemm_4bit(const fp4_exec& exec, fp4_quant_type type, const void* x, fp4_dtype dtype, int64_t m, int64_t k,
               const uint8_t* packed, const fp4_scales& scales, int64_t n, int64_t blocksize, const void* bias,
               void* y, void* workspace) {
  const Code16 code = code16_of(type);
  const int log2 = log2_of(blocksize);
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xt = static_cast<const T*>(x);
    const T* bt = static_cast<const T*>(bias);
    T* yt = static_cast<T*>(y);
    float* ws = static_cast<float*>(workspace);
    if (m <= 8) return launch<T, 2, 1>(exec, xt, m, k, packed, scales, n, log2, code, bt, yt, ws);
    if (m <= 16) return launch<T, 2, 2>(exec, xt, m, k, packed, scales, n, log2, code, bt, yt, ws);
    if (m <= 32) return launch<T, 2, 4>(exec, xt, m, k, packed, scales, n, log2, code, bt, yt, ws);
    return launch<T, 2, 8>(exec, xt, m, k, packed, scales, n, log2, code, bt, yt, ws);
  };
  if (dtype == FP4_FLOAT16)
    run(static_cast<__half*>(nullptr));
  else
    run(static_cast<__nv_bfloat16*>(nullptr));
}

}  // namespace fp4::cuda
