// The 4-bit linear layer on tensor cores for batch 17-64 (fp16/bf16 activations), read straight
// from the bitsandbytes layout; batch <= 16 runs gemm_stream.cu. Fragment mapping and decode:
// mma_4bit.cuh.
//
// Each decoded fragment feeds NT = 4 or 8 n8 tiles, so the block scale multiplies the code pairs
// (one paired multiply per byte) instead of partial sums. Memory pipeline: each warp streams its 32
// weight rows through a private 3-stage ring in shared memory with cp.async (16 bytes per lane and
// row; no registers held by loads in flight), block scales ride a register ring of the same depth,
// and the block's activations ride a shared ring (one barrier per chunk).
//
// Work split: a block of 4 warps covers 128 output features x 8*NT batch rows; k is split across
// blockIdx.y so the grid fills whole waves. Split partial sums meet in an fp32 workspace (atomic
// adds), then a small kernel adds the bias and rounds.
#include "kernels.hpp"
#include "mma_4bit.cuh"

#include <type_traits>

namespace fp4::cuda {
namespace {

constexpr size_t kTableBytes = 256 * 32 * sizeof(uint32_t);

// Per batch tile (NT = 4 or 8 n8 tiles).
template <int NT>
struct TileConfig {
  static constexpr int kMT = 2;                      // m16 tiles per warp: 32 weight rows
  static constexpr int kRowBytes = kChunk / 2;       // bytes per weight row per stage (one chunk)
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kStages = 3;                  // two in flight while one is multiplied
  static constexpr size_t kXBytes = kStages * 8 * NT * kChunk * 2;
  static constexpr size_t kRingBytes = kStages * kWarps * kWarpStageBytes;
  static constexpr size_t kSmemBytes = kTableBytes + kCodeBytes + kRingBytes + kXBytes;
  static constexpr int kMinBlocks = 2;               // 81 / 105 KB of shared memory each
  static_assert(kWarpStageBytes == 16 * kMT * kRowBytes, "a warp stage is its rows x bytes per row");
};

// kBlock64: blocksize 64, so a row's two blocks of a chunk are adjacent (one paired load).
template <typename T, int NT, bool kBlock64, bool kNested>
__global__ void __launch_bounds__(TileConfig<NT>::kThreads, TileConfig<NT>::kMinBlocks)
    gemm_mma_kernel(const T* __restrict__ x, int64_t m, int64_t k, const uint8_t* __restrict__ packed,
                    fp4_scales scales, int nested_log2, int64_t n, int blocksize_log2, Code16 code,
                    int64_t chunks_per_split, const T* __restrict__ bias, T* __restrict__ y,
                    float* __restrict__ partial) {
  using Config = TileConfig<NT>;
  constexpr int MT = Config::kMT, kRowBytes = Config::kRowBytes;
  constexpr int kWarps = Config::kWarps, kStages = Config::kStages;
  // Shared memory: the pair table, the codes, the weight ring, then the activation ring.
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* const table = smem;  // [256][32] pairs
  float* const codes = reinterpret_cast<float*>(smem + kTableBytes);
  float* const nested_code = codes + 16;
  uint8_t* const ring = smem + kTableBytes + kCodeBytes;  // [kStages][kWarps][16 MT rows][kRowBytes]
  uint4* const xs = reinterpret_cast<uint4*>(ring + Config::kRingBytes);
  build_pair_table<T, 128, kNested>(table, codes, code, scales);

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const uint32_t lane_bytes = uint32_t(lane) * 4;
  const int64_t feature0 = (int64_t(blockIdx.x) * kWarps + warp) * 16 * MT;
  const int64_t batch0 = int64_t(blockIdx.z) * 8 * NT;
  const int64_t chunks = k / kChunk;
  const int64_t chunk_begin = int64_t(blockIdx.y) * chunks_per_split;
  const int64_t chunk_end = min(chunks, chunk_begin + chunks_per_split);
  if (chunk_begin >= chunk_end) return;  // (block-uniform: the barriers below see every warp)
  const int64_t stages = chunk_end - chunk_begin;  // one chunk per ring stage
  const float nested_offset = kNested ? *scales.nested_offset : 0.0f;
  const int rows = int(m - batch0 < 8 * NT ? m - batch0 : 8 * NT);  // real activation rows in this tile

  // This lane's weight rows are g and g + 8 of each m16 tile: warp row 16 mt + 8 r + g. Its columns
  // of a chunk are 64h + 16t + [0, 16): bytes 32h + 8t + [0, 8) of the chunk. Rows past n read row 0
  // and get scale 0.
  int64_t welem[MT][2];  // element index of the row's first column
  bool wvalid[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t f = feature0 + mt * 16 + r * 8 + g;
      wvalid[mt][r] = f < n;
      welem[mt][r] = (wvalid[mt][r] ? f : 0) * k;
    }
  // The warp's copies: 16 MT rows x kRowBytes per stage, 4 pieces of 16 bytes per lane.
  constexpr int kPiecesPerRow = kRowBytes / 16;
  const uint8_t* copy_src[4];
  int copy_dst[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int p = i * 32 + lane, row = p / kPiecesPerRow, piece = p % kPiecesPerRow;
    const int64_t f = min(feature0 + row, n - 1);
    copy_src[i] = packed + f * (k / 2) + piece * 16;
    copy_dst[i] = ring_piece_offset<kRowBytes>(row, piece);
  }
  uint8_t* const warp_ring = ring + warp * kWarpStageBytes;
  constexpr int kStageStride = kWarps * int(kWarpStageBytes);

  // Copy chunk c of the tile's activation rows to shared memory: 16 units per row.
  auto stage_x = [&](uint4* dst, int64_t c) {
    for (int i = threadIdx.x; i < rows * 16; i += Config::kThreads) {
      const int row = i / 16, unit = i % 16;
      cp_async16(dst + row * 16 + x_unit(row, unit), x + (batch0 + row) * k + c * kChunk + unit * 8);
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;

  // Scales ride a register ring beside the weights, as loaded (see load_chunk_scales).
  uint32_t sraw[kStages][MT][2][2];  // [stage][mt][row g / g + 8][h]
  float sgroup[kStages][MT][2][2];
  // Request chunk c into ring slot `slot`: one commit group per call, empty past the end.
  auto issue = [&](int slot, int64_t c) {
    if (c < chunk_end) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
        cp_async16(warp_ring + slot * kStageStride + copy_dst[i], copy_src[i] + c * (kChunk / 2));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          load_chunk_scales<kBlock64, kNested>(scales, welem[mt][r], c, t, blocksize_log2, nested_log2,
                                               sraw[slot][mt][r], sgroup[slot][mt][r]);
      stage_x(xs + slot * 8 * NT * 16, c);
    }
    cp_async_commit();
  };
  // Multiply the chunk in ring slot `slot`.
  auto compute = [&](int slot) {
    const uint8_t* stage = warp_ring + slot * kStageStride;
    const uint4* xstage = xs + slot * 8 * NT * 16;
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // physical columns 64h + 16t + [0, 16): the k16 steps 4h .. 4h + 3
      uint32_t sc_pair[MT][2];
      uint2 words[MT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int byte = 32 * h + 8 * t;
          words[mt][r] = *reinterpret_cast<const uint2*>(
              stage + ring_piece_offset<kRowBytes>(16 * mt + 8 * r + g, byte / 16) + byte % 16);
          const float scale = wvalid[mt][r] ? finish_scale<kBlock64, kNested>(sraw[slot][mt][r], sgroup[slot][mt][r],
                                                                               h, nested_code, nested_offset)
                                            : 0.0f;
          sc_pair[mt][r] = Pair<T>::of(scale, scale);
        }
#pragma unroll
      for (int u = 0; u < 2; ++u) {  // unit u of the lane's 16 columns: steps 2u, 2u + 1
        uint4 xu[NT];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int row = nt * 8 + g;
          xu[nt] = row < rows ? xstage[row * 16 + x_unit(row, 8 * h + 2 * t + u)] : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int s = 0; s < 2; ++s) {  // step 2u + s: bytes 2s, 2s + 1 of word u
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            uint32_t a[4];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const uint32_t word = u == 0 ? words[mt][r].x : words[mt][r].y;
              // Byte 2s holds the step's columns 0, 1 (high nibble first) -> fragment columns 2t, 2t + 1;
              // byte 2s + 1 holds columns 2, 3 -> 2t + 8, 2t + 9.
              uint32_t lo = load_pair(table, s == 0 ? pair_offset<0>(word, lane_bytes) : pair_offset<2>(word, lane_bytes));
              uint32_t hi = load_pair(table, s == 0 ? pair_offset<1>(word, lane_bytes) : pair_offset<3>(word, lane_bytes));
              lo = Pair<T>::mul(lo, sc_pair[mt][r]), hi = Pair<T>::mul(hi, sc_pair[mt][r]);
              a[r] = lo, a[r + 2] = hi;
            }
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
              const uint32_t b0 = s == 0 ? xu[nt].x : xu[nt].z, b1 = s == 0 ? xu[nt].y : xu[nt].w;
              mma16816<T>(acc[mt][nt], a, b0, b1);
            }
          }
        }
      }
    }
  };

  // Prologue: kStages - 1 stages in flight.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(s, chunk_begin + s);
  __syncthreads();  // the pair table
  for (int64_t st = 0; st < stages; st += kStages) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      if (st + s < stages) {
        // This thread's copies of stage st+s have landed; the barrier makes everyone's visible and
        // says all are done with stage st+s-1's slot, which now receives st+s+kStages-1.
        cp_async_wait<kStages - 2>();
        __syncthreads();
        issue((s + kStages - 1) % kStages, chunk_begin + st + s + kStages - 1);
        compute(s);
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

// Blocks of this kernel resident per SM on `device` (with its largest shared-memory use); the first
// call per device also raises the kernel's dynamic shared-memory limit there. Cached: the queries
// cost microseconds per launch.
template <typename T, int NT, bool kBlock64, bool kNested>
int resident_blocks(int device) {
  static std::atomic<int> cached[64];  // (threads may race to fill it: they store the same value)
  if (device >= 0 && device < 64 && cached[device].load() > 0) return cached[device].load();
  constexpr size_t smem = TileConfig<NT>::kSmemBytes;
  constexpr auto kernel = gemm_mma_kernel<T, NT, kBlock64, kNested>;
  allow_dynamic_smem<kernel>(device, smem);
  int resident = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, TileConfig<NT>::kThreads, smem),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  resident = std::max(resident, 1);
  if (device >= 0 && device < 64) cached[device].store(resident);
  return resident;
}

template <typename T, int NT, bool kBlock64, bool kNested>
void launch(const fp4_exec& exec, const T* x, int64_t m, int64_t k, const uint8_t* packed, const fp4_scales& scales,
            int64_t n, int log2, const Code16& code, const T* bias, T* y, float* workspace) {
  using Config = TileConfig<NT>;
  const int64_t features_per_block = 16 * Config::kMT * Config::kWarps;
  const int64_t tiles = ((n + features_per_block - 1) / features_per_block) * ((m + 8 * NT - 1) / (8 * NT));
  const int64_t chunks = k / kChunk;
  const int64_t capacity =
      int64_t(resident_blocks<T, NT, kBlock64, kNested>(exec.device_index)) * sm_count(exec.device_index);
  int64_t splits = wave_filling_splits(tiles, chunks, capacity, 4);  // splits of >= 512 columns
  const int64_t per_split = (chunks + splits - 1) / splits;
  splits = (chunks + per_split - 1) / per_split;
  const dim3 grid(unsigned((n + features_per_block - 1) / features_per_block), unsigned(splits),
                  unsigned((m + 8 * NT - 1) / (8 * NT)));
  constexpr size_t smem = Config::kSmemBytes;
  // Nested statistics group blocks by nested_blocksize (256 in bitsandbytes): shift when it is a
  // power of two, divide otherwise.
  const int nested_log2 = nested_shift(scales);
  cudaStream_t stream = stream_of(exec);
  with_partial_sums(splits > 1, workspace, m, n, bias, y, stream, [&](float* partial) {
    gemm_mma_kernel<T, NT, kBlock64, kNested><<<grid, Config::kThreads, smem, stream>>>(
        x, m, k, packed, scales, nested_log2, n, log2, code, per_split, bias, y, partial);
    check_launch("gemm_4bit kernel");
  });
}

}  // namespace

// The split kernels' fp32 sums (one per output), or the small-batch kernel's slots.
size_t gemm_4bit_workspace_size(int64_t m, int64_t n) {
  const size_t sums = size_t(m) * size_t(n) * sizeof(float);
  return m <= 16 ? std::max({sums, gemm_4bit_stream_workspace_size(m), gemm_4bit_wgmma_ws_sums_bytes(m, n)})
                 : std::max(sums, gemm_4bit_wgmma_ws_sums_bytes(m, n));
}

void gemm_4bit(const fp4_exec& exec, fp4_quant_type type, const void* x, fp4_dtype dtype, int64_t m, int64_t k,
               const uint8_t* packed, const fp4_scales& scales, int64_t n, int64_t blocksize, const void* bias,
               void* y, void* workspace) {
  const Code16 code = code16_of(type);
  float* ws = static_cast<float*>(workspace);
  if (m <= 16 && gemm_4bit_wgmma_available(exec.device_index) && gemm_4bit_wgmma_supports(n, k, blocksize, scales) &&
      gemm_4bit_wgmma_ws_takes_batch_16(exec.device_index, m, n, k))
    return gemm_4bit_wgmma_ws(exec, code, dtype, x, m, k, packed, scales, n, blocksize, bias, y, ws);
  if (m <= 16 && gemm_4bit_stream_fits(exec.device_index, m))
    return gemm_4bit_stream(exec, code, dtype, x, m, k, packed, scales, n, blocksize, bias, y, ws);
  if (m > 16 && gemm_4bit_wgmma_available(exec.device_index) && gemm_4bit_wgmma_supports(n, k, blocksize, scales))
    return gemm_4bit_wgmma(exec, code, dtype, x, m, k, packed, scales, n, blocksize, bias, y, ws);
  const int log2 = log2_of(blocksize);
  // (batches past 64 take the wide tile; grid.z covers them)
  dispatch_variant<4, 8>(dtype, m, 32, scales, blocksize, [&](auto* tag, auto nt, auto nested, auto paired) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch<T, decltype(nt)::value, decltype(paired)::value, decltype(nested)::value>(
        exec, static_cast<const T*>(x), m, k, packed, scales, n, log2, code, static_cast<const T*>(bias),
        static_cast<T*>(y), ws);
  });
}

}  // namespace fp4::cuda
