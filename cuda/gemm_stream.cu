// The 4-bit linear layer on tensor cores for batch <= 16 (fp16/bf16 activations), read straight
// from the bitsandbytes layout. Fragment mapping and decode: mma_4bit.cuh.
//
// Memory-bound by design, so the structure serves DRAM. Reading 4 KB weight rows in 64-byte pieces
// per row and step peaks at 1.6-2.2 TB/s on the H100, 128-byte pieces at 2.2-2.7 (a sequential read:
// 2.7; docs/perf-log.md), so each warp owns 16 rows and streams 128 bytes of each per stage. DRAM
// needs ~100 KB in flight per SM to pass 2.5 TB/s with this access pattern (measured), and
// short-lived blocks pay a pipeline fill, a drain and a pair-table build each. So batch <= 16 runs
// one block of 16 warps per SM (one pair table) with a 4-stage ring (3 stages, 96 KB, in flight per
// SM), and each block walks a contiguous range of the flattened (feature tile, stage) space,
// storing its sums whenever the tile changes (StreamOutput: no atomics, nothing to clear). Batch
// <= 8 reads activations through L1 (every warp of the block reads the same ones); batch 9-16
// copies each stage's slice once per block into shared memory (see kSharedX). The mma runs on
// unscaled codes when blocksize is 64 (the block scale multiplies each 64-column partial sum
// once), and those scales travel by
// cp.async with their stage's weights into spare shared memory (one copy per lane and stage instead
// of eight loads into a register ring: batch 16 on (28672, 8192) 88 -> 83 us).
#include "kernels.hpp"
#include "mma_4bit.cuh"
#include "tma.cuh"

#include <type_traits>

namespace fp4::cuda {
namespace {

template <int NT>
struct StreamConfig {
  static constexpr int kWarps = 16, kThreads = kWarps * 32;
  static constexpr int kRows = 16;                      // weight rows per warp (one m16 tile)
  static constexpr int kSpan = 2;                       // chunks per stage: 128 bytes per row
  static constexpr int kRowBytes = kSpan * kChunk / 2;
  // (two n8 tiles: 4 stages measured slower at batch 16, 88 vs 83 us on (28672, 8192))
  static constexpr int kStages = NT == 1 ? 4 : 3;
  static constexpr int kTileRows = kWarps * kRows;      // 256 features per tile
  static constexpr size_t kRingBytes = size_t(kStages) * kWarps * kWarpStageBytes;
  // Pair table rows of 256 bytes (lanes use the first 128): a byte's offset is one permute.
  static constexpr size_t kTableBytes = 256 * 256;
  // Batch 9-16: each stage's activation slice (16 rows x 256 columns) is copied once per block, warp
  // w copying row w, into a ring of its own with kStages - 1 stages of slack between the fastest
  // and slowest warp (every warp reads all of it: read through L1/L2 by each warp, (28672, 8192)
  // took 80.5 us at batch 16, now 68.1). FULL[slot] completes when all threads' copies have landed,
  // EMPTY[slot] when every thread is done with it.
  static constexpr bool kSharedX = NT == 2;
  static constexpr int kXSlots = 2 * kStages - 1;
  static constexpr int kXRowBytes = kSpan * kChunk * 2;
  static constexpr size_t kXBytes = kSharedX ? size_t(kXSlots) * 16 * kXRowBytes : 0;
  static constexpr size_t kBarrierBytes = kSharedX ? 2 * kXSlots * sizeof(uint64_t) : 0;
  static constexpr size_t kSmemBytes = kTableBytes + kCodeBytes + kRingBytes + kXBytes + kBarrierBytes;
  static_assert(kWarpStageBytes == kRows * kRowBytes, "a warp stage is its rows x bytes per row");
  static_assert(!kSharedX || (kWarps == 16 && kXRowBytes == 32 * 16), "warp w copies x row w, lane l its unit l");
};

// The activation ring's barriers (mbarrier: PTX 7.0, sm_80), by shared-window address.
__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared.b64 state, [%0];\n}" ::"r"(bar) : "memory");
}
// Arrives once this thread's cp.async copies issued so far have landed.
__device__ __forceinline__ void mbarrier_arrive_on_copies(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared.b64 [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  asm volatile("{\n.reg .pred done;\nWAIT:\nmbarrier.test_wait.parity.shared.b64 done, [%0], %1;\n@!done bra WAIT;\n}" ::"r"(
                   bar),
               "r"(parity)
               : "memory");
}

// Half h of a chunk (64 columns) for the lane's rows g and g + 8 (words[r]: their 8 bytes) times the
// activations xu: codes decoded by the pair table, 4 k16 multiplies per n8 tile. kPostScale: the
// multiplies run on unscaled codes and the block scales sc[r] multiply their partial sums once;
// else the pairs are scaled first (sc_pair[r]: sc[r] twice).
template <typename T, int NT, bool kPostScale, bool kAlignedTable = false>
__device__ __forceinline__ void multiply_half(const uint8_t* table, uint32_t lane_bytes, const uint2 (&words)[2],
                                              const float (&sc)[2], const uint32_t (&sc_pair)[2],
                                              const uint4 (&xu)[NT][2], float (&acc)[NT][4]) {
  float part[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) part[nt][i] = 0.0f;
#pragma unroll
  for (int u = 0; u < 2; ++u)
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      uint32_t a[4];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const uint32_t word = u == 0 ? words[r].x : words[r].y;
        uint32_t lo, hi;
        if constexpr (kAlignedTable) {  // (lane_bytes: the table's window address | lane * 4)
          lo = load_pair_at(s == 0 ? pair_address_aligned<0>(word, lane_bytes) : pair_address_aligned<2>(word, lane_bytes));
          hi = load_pair_at(s == 0 ? pair_address_aligned<1>(word, lane_bytes) : pair_address_aligned<3>(word, lane_bytes));
        } else {
          lo = load_pair(table, s == 0 ? pair_offset_wide<0>(word, lane_bytes) : pair_offset_wide<2>(word, lane_bytes));
          hi = load_pair(table, s == 0 ? pair_offset_wide<1>(word, lane_bytes) : pair_offset_wide<3>(word, lane_bytes));
        }
        if constexpr (!kPostScale) lo = Pair<T>::mul(lo, sc_pair[r]), hi = Pair<T>::mul(hi, sc_pair[r]);
        a[r] = lo, a[r + 2] = hi;
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint32_t b0 = s == 0 ? xu[nt][u].x : xu[nt][u].z, b1 = s == 0 ? xu[nt][u].y : xu[nt][u].w;
        mma16816<T>(kPostScale ? part[nt] : acc[nt], a, b0, b1);
      }
    }
  if constexpr (kPostScale) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][i] = __fmaf_rn(sc[i / 2], part[nt][i], acc[nt][i]);
  }
}

// The lane's activations for half h of chunk c (units 8h + 2t, + 1 of rows nt * 8 + g): from a
// shared ring (kShared: slot `slot` of `ring_window`, 8 NT rows of kXRowBytes, unit u of row r at
// u ^ (r & 7); rows past the batch hold stale values, whose sums are never stored: skipping their
// loads made batch 12-16 2-6% slower) or through L1 from x_lane (row g's columns 16t on), zero past
// the batch.
template <bool kShared, int kXRowBytes, int NT, typename T>
__device__ __forceinline__ void load_activations(uint4 (&xu)[NT][2], uint32_t ring_window, int slot, const T* x_lane,
                                                 int64_t m, int64_t k, int64_t c, int j, int h, int g, int t) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int64_t b = nt * 8 + g;
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if constexpr (kShared) {
        const int unit = 16 * j + 8 * h + 2 * t + u, row = nt * 8 + g;
        xu[nt][u] = ld_shared_v4(ring_window + uint32_t(slot * 8 * NT + row) * kXRowBytes + ((unit ^ (row & 7)) * 16));
      } else {
        xu[nt][u] = b < m ? __ldg(reinterpret_cast<const uint4*>(x_lane + nt * 8 * k + c * kChunk + 64 * h) + u)
                          : make_uint4(0, 0, 0, 0);
      }
    }
  }
}

// The stream-K split of `total` units (feature tile, stage) in tile order: block b first sums
// `whole` tiles of its own, b * whole + [0, whole) (straight to y), then the shared units
// [begin(b), begin(b + 1)) of the tiles after all blocks' whole ones (from shared_from()). Every
// block has the same number of units, give or take one, and at least one shared unit unless none
// are left (whole_tiles_first).
struct StreamRanges {
  int64_t total, stages_per_tile;
  int blocks;
  int64_t whole;
  // All blocks' whole tiles: tiles [0, whole_tiles()); the shared ones follow.
  __host__ __device__ int64_t whole_tiles() const { return int64_t(blocks) * whole; }
  __host__ __device__ int64_t shared_from() const { return whole_tiles() * stages_per_tile; }
  __host__ __device__ int64_t begin(int64_t block) const {
    return shared_from() + (total - shared_from()) * block / blocks;
  }
  // The block whose shared range holds `unit` (>= shared_from()): the largest b with begin(b) <= unit.
  __device__ int64_t block_of(int64_t unit) const {
    const int64_t shared = total - shared_from();
    return ((unit - shared_from() + 1) * blocks + shared - 1) / shared - 1;
  }
};
// Whole tiles per block before the shared units (StreamRanges::whole): as many as leave each block a
// shared unit or none at all. A tile one block sums whole needs no finishing: on (28672, 8192), 150
// tiles of 32 stages over 132 blocks, 18 tiles are shared instead of nearly all 150.
inline int64_t whole_tiles_first(int64_t tiles, int64_t stages_per_tile, int blocks) {
  int64_t whole = tiles / blocks;
  while (whole > 0 && tiles != whole * blocks && (tiles - whole * blocks) * stages_per_tile < blocks) --whole;
  return whole;
}

// Where the sums go. A tile one block sums whole is stored to y (plus bias) by that block; a tile
// split between blocks is stored by each into a slot of its own (a block has two: its range's
// first tile and its last; the tiles between are whole), and finish_stream_kernel adds the slots
// up in block order. No atomics and nothing to clear first: the result is deterministic, and no
// memset sits between a kernel and the one before it (see launch.cuh).
template <typename T>
struct StreamOutput {
  T* y;
  const T* bias;
  float* slots;  // [2 * block + (0: first tile, 1: last)][batch row][tile row]
};
// Slots cover blocks up to this many (grids are capped to it), kTileRows of at most 256.
constexpr int kStreamMaxBlocks = 256, kStreamMaxTileRows = 256;

// Where a warp's sums go when it flushes in the first tile of its block's range or a later one
// (tile_ends: at the tile's last unit; starts_mid: the range begins inside its first tile): -1 for
// y (the block summed the tile whole), else the block's slot (2 * block: the first tile, + 1: the last).
__device__ __forceinline__ int store_slot(bool first_tile, bool starts_mid, bool tile_ends) {
  if (tile_ends && !(first_tile && starts_mid)) return -1;
  return 2 * int(blockIdx.x) + (first_tile ? 0 : 1);
}

// A warp's sums, by value (see store_sums).
template <int NT>
struct WarpSums {
  float v[NT][4];
};

// Stores a warp's sums for features row0 + [0, 16), rows tile_row + [0, 16) of a tile of
// tile_rows: to y plus bias when `slot` < 0 (the block summed the whole tile), else into slot
// `slot`. Out of line: inlined, its addressing was hoisted into the kernels' loops and spilled
// their registers (the stores happen once per tile).
template <typename T, int NT>
__device__ __noinline__ void store_sums(WarpSums<NT> sums, int64_t row0, int tile_row, int tile_rows, int lane,
                                        int64_t m, int64_t n, StreamOutput<T> out, int slot) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = g + (i / 2) * 8;
      const int64_t f = row0 + r, b = nt * 8 + 2 * t + (i % 2);
      if (f < n && b < m) {
        if (slot < 0)
          out.y[b * n + f] = store_from_float<T>(sums.v[nt][i] + (out.bias ? load_as_float(out.bias + f) : 0.0f));
        else
          out.slots[(slot * m + b) * tile_rows + tile_row + r] = sums.v[nt][i];
      }
    }
}
// Hands acc to store_sums and clears it.
template <typename T, int NT>
__device__ __forceinline__ void flush_sums(float (&acc)[NT][4], int64_t row0, int tile_row, int tile_rows, int lane,
                                           int64_t m, int64_t n, const StreamOutput<T>& out, int slot) {
  WarpSums<NT> sums;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) sums.v[nt][i] = acc[nt][i], acc[nt][i] = 0.0f;
  store_sums<T, NT>(sums, row0, tile_row, tile_rows, lane, m, n, out, slot);
}

// Adds up the slots of shared tile blockIdx.x (StreamRanges), batch row blockIdx.y, plus bias, into
// y (in block order), if blocks split that tile. Which blocks did, and their slots, is worked out
// once per block before the wait (64-bit divisions per element cost ~5 us at batch 16).
// Keep it at 32 registers (ptxas -v): its blocks launch early (PDL) and wait beside the stream
// kernel's block on each SM only if their registers fit in what that block leaves; variants at 40
// or 64 did not, and every call at batch 1-16 took 1.5-3 us longer (perf log). The register file
// is split in 4 SM quarters, warps dealt among them: the fed kernel's 13 warps put 4 in one, which
// at 112 registers a thread (batch <= 8) leaves that quarter room for 2 warps of 32, and at 128
// (batch 9-16) none: there the finish blocks start only as the stream blocks end. A block per batch
// row measured best (2 or 4 rows per block, their loads in flight, were no faster); its threads
// take a tile row each, or two (finish_threads).
template <typename T>
__global__ void __launch_bounds__(kStreamMaxTileRows)
    finish_stream_kernel(StreamRanges ranges, int tile_rows, int64_t m, int64_t n, const float* __restrict__ slots,
                         const T* __restrict__ bias, T* __restrict__ y) {
  __shared__ int64_t first_block;
  __shared__ int contributors;
  __shared__ int slot_of[kStreamMaxBlocks];
  allow_successor();
  const int64_t tile = ranges.whole_tiles() + blockIdx.x, b = blockIdx.y, spt = ranges.stages_per_tile;
  if (threadIdx.x == 0) {
    first_block = ranges.block_of(tile * spt);
    contributors = int(ranges.block_of(tile * spt + spt - 1) - first_block) + 1;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < contributors; i += blockDim.x) {
    const int64_t block = first_block + i;
    slot_of[i] = int(2 * block + (ranges.begin(block) / spt == tile ? 0 : 1));
  }
  __syncthreads();
  wait_for_predecessor();  // (in every block: see launch.cuh)
  if (contributors == 1) return;  // (one block summed it and stored y)
  for (int r = threadIdx.x; r < tile_rows && tile * tile_rows + r < n; r += blockDim.x) {
    const int64_t f = tile * tile_rows + r;
    float sum = 0.0f;
    for (int i = 0; i < contributors; ++i) sum += slots[(slot_of[i] * m + b) * tile_rows + r];
    y[b * n + f] = store_from_float<T>(sum + (bias ? load_as_float(bias + f) : 0.0f));
  }
}

// Before wait_for_predecessor: asks the L2 for the codes and scales of the first `stages` stages
// (128 bytes of codes per row each) of rows [row0, row0 + rows) from chunk c0, within the rows.
__device__ __forceinline__ void prefetch_first_stages(const uint8_t* packed, const fp4_scales& scales, int64_t n,
                                                      int64_t k, int blocksize_log2, int64_t row0, int rows,
                                                      int64_t c0, int64_t stages) {
  const int64_t first = c0 * (kChunk / 2), bytes = min(stages * kChunk, k / 2 - first);
  for (int r = threadIdx.x; r < rows && row0 + r < n; r += blockDim.x) {
    const int64_t row = row0 + r;
    prefetch_l2(packed + row * (k / 2) + first, uint32_t(bytes));
    // The stage's blocks (plain fp32 absmax, or nested one-byte codes), widened to 16-byte lines.
    const int64_t block0 = (row * k + 2 * first) >> blocksize_log2, block1 = (row * k + 2 * (first + bytes) - 1) >> blocksize_log2;
    const int width = scales.nested_codes ? 1 : 4;
    const uintptr_t base = reinterpret_cast<uintptr_t>(scales.nested_codes ? static_cast<const void*>(scales.nested_codes)
                                                                           : static_cast<const void*>(scales.absmax));
    const uintptr_t lo = (base + block0 * width) & ~uintptr_t(15), hi = (base + (block1 + 1) * width + 15) & ~uintptr_t(15);
    prefetch_l2(reinterpret_cast<const void*>(lo), uint32_t(hi - lo));
  }
}

// kBlock64: blocksize 64 with k % 256 == 0 (scales through the ring, see gemm_4bit_stream).
template <typename T, int NT, bool kBlock64, bool kNested>
__global__ void __launch_bounds__(StreamConfig<NT>::kThreads, 1)
    gemm_stream_kernel(const T* __restrict__ x, int64_t m, int64_t k, const uint8_t* __restrict__ packed,
                       fp4_scales scales, int nested_log2, int64_t n, int blocksize_log2, Code16 code,
                       StreamRanges ranges, StreamOutput<T> out) {
  using C = StreamConfig<NT>;
  constexpr int kSpan = C::kSpan, kRowBytes = C::kRowBytes, kStages = C::kStages;
  constexpr bool kPostScale = kBlock64;
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* const table = smem;
  float* const codes = reinterpret_cast<float*>(smem + C::kTableBytes);
  float* const nested_code = codes + 16;
  uint8_t* const ring = smem + C::kTableBytes + kCodeBytes;
  const uint32_t x_ring = uint32_t(__cvta_generic_to_shared(ring + C::kRingBytes));
  const uint32_t x_full = x_ring + uint32_t(C::kXBytes), x_empty = x_full + C::kXSlots * sizeof(uint64_t);
  allow_successor();
  const int64_t stages_per_tile = ranges.stages_per_tile;
  const int64_t begin = ranges.begin(blockIdx.x), end = ranges.begin(blockIdx.x + 1);
  prefetch_first_stages(packed, scales, n, k, blocksize_log2, (begin / stages_per_tile) * C::kTileRows, C::kTileRows,
                        (begin % stages_per_tile) * kSpan, min(int64_t(kStages), end - begin));
  if constexpr (C::kSharedX) {
    if (threadIdx.x == 0)
      for (int s = 0; s < C::kXSlots; ++s)
        mbarrier_init(x_full + s * 8, C::kThreads), mbarrier_init(x_empty + s * 8, C::kThreads);
  }
  // (the nested codebook is read from global memory, so after the wait; the table's barrier orders the inits)
  if constexpr (kNested) wait_for_predecessor();
  build_pair_table<T, 256, kNested>(table, codes, code, scales);
  if constexpr (!kNested) wait_for_predecessor();

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const uint32_t lane_bytes = uint32_t(lane) * 4;
  const int64_t chunks = k / kChunk;
  const float nested_offset = kNested ? *scales.nested_offset : 0.0f;
  constexpr int kPiecesPerRow = kRowBytes / 16;
  uint8_t* const warp_ring = ring + warp * kWarpStageBytes;
  constexpr int kStageStride = C::kWarps * int(kWarpStageBytes);

  // Scales at blocksize 64 ride the ring with their weights (copied by the same commit group), in
  // the unused halves of the pair table's rows: stage slot s of warp w owns half-row s * 16 + w (with
  // nested statistics: 16 rows' 4 block codes, then their 16 group absmax) or the two half-rows
  // 2 (s * 16 + w) + {0, 1} (8 rows' 4 fp32 absmax each). Other blocksizes ride a register ring,
  // as loaded (see load_chunk_scales).
  const uint32_t table_window = uint32_t(__cvta_generic_to_shared(table));
  auto scale_slot = [&](int slot) {
    return table_window + uint32_t((slot * C::kWarps + warp) * (kNested ? 1 : 2)) * 256 + 128;
  };
  constexpr int kRegisterStages = kBlock64 ? 1 : kStages;
  uint32_t sraw[kRegisterStages][2][kSpan][2];  // [stage][row g / g + 8][chunk][h]
  float sgroup[kRegisterStages][2][kSpan][2];
  const uint8_t* scale_src = nullptr;  // kBlock64: lanes 0-15, row `lane`: its codes or absmax at the cursor
  const float* group_base = nullptr;   // kBlock64, nested: lanes 16-31, row `lane - 16`: its first group
  int group_offset = 0;                // and the cursor's block within it (from group_base's start)
  // Two cursors walk the range (no 64-bit division per stage): the copies run kStages - 1 stages
  // ahead of the multiplies. Entering a tile recomputes the copy cursor's row pointers.
  int64_t issue_tile = begin / stages_per_tile, issue_c0 = (begin % stages_per_tile) * kSpan;
  const uint8_t* copy_src[4];  // this lane's 4 pieces, chunk 0
  int copy_dst[4];
  int64_t scale_elem[2];  // rows g, g + 8: the row's first element index
  auto enter_issue_tile = [&]() {
    const int64_t row0 = issue_tile * C::kTileRows + warp * C::kRows;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int p = i * 32 + lane, row = p / kPiecesPerRow, piece = p % kPiecesPerRow;
      copy_src[i] = packed + min(row0 + row, n - 1) * (k / 2) + piece * 16;
      copy_dst[i] = ring_piece_offset<kRowBytes>(row, piece);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      scale_elem[r] = min(row0 + 8 * r + g, n - 1) * k;
    }
    if constexpr (kBlock64) {
      const int64_t block = min(row0 + lane % 16, n - 1) * (k / 64) + 2 * issue_c0;
      if (kNested && lane >= 16) {
        const int64_t group = nested_log2 >= 0 ? block >> nested_log2 : block / scales.nested_blocksize;
        group_base = scales.absmax + group;
        group_offset = int(block - group * scales.nested_blocksize);
      } else {
        scale_src = kNested ? scales.nested_codes + block : reinterpret_cast<const uint8_t*>(scales.absmax + block);
      }
    }
  };
  enter_issue_tile();
  int64_t issued = begin;
  auto issue = [&](int slot) {
    if (issued < end) {
      const int64_t c0 = issue_c0;
      const bool full = c0 + kSpan <= chunks;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int piece = (i * 32 + lane) % kPiecesPerRow;
        if (full || piece * 16 < int(chunks - c0) * (kChunk / 2))
          cp_async16(warp_ring + slot * kStageStride + copy_dst[i], copy_src[i] + c0 * (kChunk / 2));
      }
      if constexpr (kBlock64) {  // (k % 256 == 0: every stage is whole, 4 blocks of one nested group)
        const uint32_t dst = scale_slot(slot);
        if (!kNested) {
          if (lane < 16) cp_async16(dst + (lane / 8) * 256 + (lane % 8) * 16, scale_src), scale_src += 16;
        } else if (lane < 16) {
          cp_async4(dst + lane * 4, scale_src);
          scale_src += 4;
        } else {
          const int in_group = nested_log2 >= 0 ? group_offset >> nested_log2 : group_offset / int(scales.nested_blocksize);
          cp_async4(dst + 64 + (lane - 16) * 4, group_base + in_group);
          group_offset += 4;
        }
      } else {
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
          for (int j = 0; j < kSpan; ++j)  // (a chunk past the row's end re-reads the last one)
            load_chunk_scales<kBlock64, kNested>(scales, scale_elem[r], min(c0 + j, chunks - 1), t, blocksize_log2,
                                                 nested_log2, sraw[slot][r][j], sgroup[slot][r][j]);
      }
      if constexpr (C::kSharedX) {  // x row `warp` (if in the batch), 16-byte unit `lane` of the stage
        const int u = int(issued - begin), xs = u % C::kXSlots;
        if (u >= C::kXSlots) mbarrier_wait(x_empty + xs * 8, uint32_t(u / C::kXSlots - 1) & 1);
        if (warp < m && c0 * kChunk + lane * 8 < k)
          cp_async16(x_ring + uint32_t(xs * 16 + warp) * C::kXRowBytes + ((lane ^ (warp & 7)) * 16),
                     x + warp * k + c0 * kChunk + lane * 8);
        mbarrier_arrive_on_copies(x_full + xs * 8);
      }
      ++issued;
      issue_c0 += kSpan;
      if (issue_c0 >= chunks && issued < end) {
        issue_c0 = 0, ++issue_tile;
        enter_issue_tile();
      }
    }
    cp_async_commit();
  };

  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = 0.0f;

  int64_t row0 = (begin / stages_per_tile) * C::kTileRows + warp * C::kRows, c0 = (begin % stages_per_tile) * kSpan;
  const int first_units = int(stages_per_tile - c0 / kSpan);  // the range's units in its first tile
  const bool starts_mid = c0 != 0;
  const T* x_lane = x + int64_t(g) * k + 16 * t;  // this lane's activation row (nt = 0), its columns
  auto compute = [&](int slot, int64_t gs) {
    const uint8_t* stage = warp_ring + slot * kStageStride;
    // kBlock64: rows g and g + 8's 4 block codes (byte 2j + h) and group absmax, or their absmax.
    const uint32_t scales_here = kBlock64 ? scale_slot(slot) : 0;
    const int x_slot = int(gs - begin) % C::kXSlots;
    if constexpr (C::kSharedX) mbarrier_wait(x_full + x_slot * 8, uint32_t(int(gs - begin) / C::kXSlots) & 1);
    uint32_t block_codes[2] = {0, 0};
    float group_absmax[2] = {0.0f, 0.0f};
    if constexpr (kBlock64 && kNested) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        block_codes[r] = ld_shared_u32(scales_here + (8 * r + g) * 4);
        group_absmax[r] = __uint_as_float(ld_shared_u32(scales_here + 64 + (8 * r + g) * 4));
      }
    }
#pragma unroll
    for (int j = 0; j < kSpan; ++j) {
      if (j > 0 && c0 + j >= chunks) break;
      const int64_t c = c0 + j;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint4 xu[NT][2];
        load_activations<C::kSharedX, C::kXRowBytes>(xu, x_ring, x_slot, x_lane, m, k, c, j, h, g, t);
        float sc[2];
        uint32_t sc_pair[2];
        uint2 words[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int byte = j * (kChunk / 2) + 32 * h + 8 * t;
          words[r] = *reinterpret_cast<const uint2*>(stage + ring_piece_offset<kRowBytes>(8 * r + g, byte / 16) +
                                                     byte % 16);
          if constexpr (kBlock64 && kNested)
            sc[r] = nested_scale(nested_code, (block_codes[r] >> (8 * (2 * j + h))) & 0xffu, group_absmax[r],
                                 nested_offset);
          else if constexpr (kBlock64)
            sc[r] = __uint_as_float(ld_shared_u32(scales_here + r * 256 + g * 16 + (2 * j + h) * 4));
          else
            sc[r] = finish_scale<kBlock64, kNested>(sraw[slot][r][j], sgroup[slot][r][j], h, nested_code,
                                                    nested_offset);
          if (row0 + 8 * r + g >= n) sc[r] = 0.0f;
          sc_pair[r] = Pair<T>::of(sc[r], sc[r]);
        }
        multiply_half<T, NT, kPostScale>(table, lane_bytes, words, sc, sc_pair, xu, acc);
      }
    }
    // This thread is done with the stage's activations. (Every thread arrives, not one per warp after
    // a __syncwarp: compute-sanitizer's racecheck does not see a warp's reads as ordered before one
    // lane's arrival, and reported the slot's next copies as racing them.)
    if constexpr (C::kSharedX) mbarrier_arrive(x_empty + x_slot * 8);
    // The tile ends here (or the block's range does): store this warp's sums.
    c0 += kSpan;
    if (c0 >= chunks || gs + 1 == end) {
      flush_sums(acc, row0, warp * C::kRows, C::kTileRows, lane, m, n, out,
                 store_slot(int(gs - begin) < first_units, starts_mid, c0 >= chunks));
      c0 = 0, row0 += C::kTileRows;
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(s);
  __syncthreads();  // the pair table
  for (int64_t gs = begin; gs < end; gs += kStages) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      if (gs + s < end) {
        // This lane's copies of stage gs+s have landed; __syncwarp makes the warp's visible and
        // says every lane is done with stage gs+s-1's slot, which now receives gs+s+kStages-1.
        cp_async_wait<kStages - 2>();
        __syncwarp();
        issue((s + kStages - 1) % kStages);
        compute(s, gs + s);
      }
    }
  }
}

// Finish blocks of 4 warps instead of 8 where two of them fit beside the stream kernel's block on
// each SM and all of them then start at once: beside the fed kernel at batch <= 8 (112 registers a
// thread: the SM quarter holding its 4th warp has room for 2 warps of 32 registers, so one block
// of 8 warps or two of 4), where the grid needs 1-2 blocks per SM. H100, bf16 nf4, us, 8 / 4 warps
// (same process): (4096, 4096) batch 8 10.48 / 9.04, (11008, 4096) 4 16.06 / 15.08, (14336, 4096) 2
// 18.06 / 17.11, (4096, 14336) 8 18.68 / 18.13. Past 2 per SM the 4-warp blocks lost up to 5%
// ((11008, 4096) 8 16.31 / 17.19), at batch 9-16 (128 registers: no room) 8-13%, and below one
// per SM, where they only lengthen each block's work, up to 5% ((4096, 14336) 1 16.53 / 17.40).
inline int finish_threads(int64_t finish_blocks, int stream_blocks, bool beside_fed_batch8) {
  return beside_fed_batch8 && finish_blocks > stream_blocks && finish_blocks <= 2 * stream_blocks
             ? kStreamMaxTileRows / 2
             : kStreamMaxTileRows;
}

// The stream kernels' grid for `total` units: one block per SM, at most one per unit.
inline int stream_blocks(int device, int64_t total) {
  return int(std::min<int64_t>({sm_count(device), total, kStreamMaxBlocks}));
}

// Runs launch(ranges, out) (the stream kernel over `total` units, one block per SM) and then
// finish_stream_kernel, both as dependent launches; the slots live in `workspace`. fed_batch8: the
// stream kernel is the fed one at batch <= 8 (whole tiles first; finish_threads).
template <typename T, typename Launch>
void launch_with_finish(const fp4_exec& exec, int64_t total, int64_t stages_per_tile, int tile_rows, int64_t m,
                        int64_t n, const T* bias, T* y, float* workspace, bool fed_batch8, Launch&& launch) {
  const int device = exec.device_index;
  StreamRanges ranges{total, stages_per_tile, stream_blocks(device, total), 0};
  const int64_t tiles = total / stages_per_tile;
  if (fed_batch8) ranges.whole = whole_tiles_first(tiles, stages_per_tile, ranges.blocks);
  launch(ranges, StreamOutput<T>{y, bias, workspace});
  const int64_t shared_tiles = tiles - ranges.whole_tiles();
  if (shared_tiles == 0) return;  // (every tile summed whole)
  launch_dependent(device, finish_stream_kernel<T>, dim3(unsigned(shared_tiles), unsigned(m)),
                   finish_threads(shared_tiles * m, ranges.blocks, fed_batch8), 0, stream_of(exec),
                   "gemm_4bit finish kernel", ranges, tile_rows, m, n, workspace, bias, y);
}

template <typename T, int NT, bool kBlock64, bool kNested>
void launch_stream(const fp4_exec& exec, const T* x, int64_t m, int64_t k, const uint8_t* packed,
                   const fp4_scales& scales, int64_t n, int log2, const Code16& code, const T* bias, T* y,
                   float* workspace) {
  using C = StreamConfig<NT>;
  constexpr auto kernel = gemm_stream_kernel<T, NT, kBlock64, kNested>;
  const int device = exec.device_index;
  allow_dynamic_smem<kernel>(device, C::kSmemBytes);
  const int64_t chunks = k / kChunk;
  const int64_t stages_per_tile = (chunks + C::kSpan - 1) / C::kSpan;
  const int64_t tiles = (n + C::kTileRows - 1) / C::kTileRows;
  static_assert(C::kTileRows <= kStreamMaxTileRows, "the slots' size");
  const int nested_log2 = nested_shift(scales);
  launch_with_finish(exec, tiles * stages_per_tile, stages_per_tile, C::kTileRows, m, n, bias, y, workspace, false,
                     [&](const StreamRanges& ranges, const StreamOutput<T>& out) {
                       launch_dependent(device, kernel, unsigned(ranges.blocks), C::kThreads, C::kSmemBytes,
                                        stream_of(exec), "gemm_4bit stream kernel", x, m, k, packed, scales,
                                        nested_log2, n, log2, code, ranges, out);
                     });
}


// The producer-fed form (sm_90a, blocksize 64 with k % 256 == 0: the ring-scale condition): a 13th
// warp only copies and 12 warps only decode and multiply, so the copies run as far ahead as the
// ring allows whatever the consumers' stalls (above, each warp's own copies wait behind its
// multiplies). A stage is 192 feature rows x 128 bytes of weights, in 3 parts of 64 rows (one TMA
// box in the 128-byte swizzle and one FULL barrier each, so a warp waits only for its own part),
// their scales (cp.async, into the pair table's spare half rows as above) and the activation slice
// (8 NT rows x 512 bytes; read through L1 by every consumer warp instead, batch 1-8 ran up to 19%
// slower: H100, bf16 nf4, us, L1 / ring, (8192, 28672) 1 / 4 / 8 55.8 / 51.2, 62.8 / 52.6, 62.4 / 53.4;
// (14336, 4096) 8 23.1 / 19.3; (28672, 8192) 1 52.7 / 52.0, 8 59.4 / 56.0; (14336, 4096) 1 18.6 /
// 18.8 the one loss). FULL[slot][part] completes with the box's bytes and the 32 producer lanes'
// copies, EMPTY[slot] when the 12 consumer warps' threads are done with the slot. 12 consumer warps
// rather than 16: 13 warps keep 128 registers per thread (17 would leave 96).
template <int NT, bool kShortRing = false>
struct FedConfig {
  static constexpr int kWarps = 12, kThreads = (kWarps + 1) * 32;  // + the producer warp
  static constexpr int kRows = 16, kTileRows = kWarps * kRows;
  // A stage arrives in parts of 4 warps' rows (one TMA box and one FULL barrier each), so a warp
  // waits only for its own part.
  static constexpr int kParts = kWarps / 4, kPartRows = 64, kPartBytes = kPartRows * 128;
  static constexpr int kStageBytes = kTileRows * 128;
  static constexpr int kXRowBytes = 512, kXStageBytes = 8 * NT * kXRowBytes;
  static constexpr size_t kTableBytes = 256 * 256;
  static constexpr size_t kBarrierBytes = (kParts + 1) * sizeof(uint64_t);  // FULL per part, EMPTY, per slot
  // The pair table sits at a shared-window address that is a multiple of 64 KB (a byte permute then
  // forms each lookup's whole address: pair_address_aligned): the ring below it, from the window's
  // first 1024-byte boundary after the 1 KB the SM reserves per block, the rest above it.
  static constexpr size_t kWindowStart = 1024, kTableAlign = 65536;
  static constexpr size_t table_offset(int stages) {  // from the dynamic shared memory's start
    return (kWindowStart + size_t(stages) * kStageBytes + kTableAlign - 1) / kTableAlign * kTableAlign - kWindowStart;
  }
  static constexpr size_t smem_bytes(int stages) {
    return table_offset(stages) + kTableBytes + kCodeBytes + size_t(stages) * (kXStageBytes + kBarrierBytes);
  }
  static constexpr int most_stages() {
    int stages = 8;
    while (smem_bytes(stages) > 227 * 1024) --stages;
    return stages;
  }
  // 5 at batch <= 8, 4 at 9-16; one fewer for short ranges (kShortRing: launch_fed)
  static constexpr int kStages = most_stages() - (kShortRing ? 1 : 0);
  static constexpr size_t kSmemBytes = smem_bytes(kStages), kTableOffset = table_offset(kStages);
  static_assert(kWarps % 4 == 0, "parts of 4 warps");
  static_assert(kSmemBytes <= 227 * 1024, "one block per SM");
  static_assert(kStages * kTileRows / 8 <= 256, "each slot's scales take kTileRows / 8 spare half rows of the table");
};

// kWholeFirst: the block's whole tiles come first (StreamRanges::whole > 0). Batch <= 8 only: at
// 9-16 a form that works the shared range's start out again at the jump (128 registers, no spills)
// ran no faster ((28672, 8192) 16: 59.2 us both), the finish kernel running after this one there
// either way (finish_stream_kernel); capped at 120 registers so that 4-warp finish blocks fit, it
// spilled and ran 4.5-8 us slower on (28672, 8192). At batch <= 8 every form is held to 112 registers
// (FP4_MAX_REGISTERS), the most that leave room for the finish kernel's blocks beside this one (see
// finish_stream_kernel): whole-first uncapped took 118-122 and ran 0.5-1.4 us slower even on weights
// it does not split that way; the nested form without it took 114 (allocated as 120), and capped (108)
// it runs up to 1.6 us faster (H100, bf16 nf4 nested, against the previous build, us: (4096, 4096)
// batch 2 / 4 / 8 11.6 / 11.8 / 12.1 -> 10.1 / 10.2 / 10.8; (4096, 14336) 1 20.6 -> 19.7; (14336, 4096)
// 1 20.5 -> 19.1, with 4-warp finish blocks where they pay). Whole-first on (28672, 8192), bf16 nf4,
// against the build before it (two alternating processes, us): batch 1 52.4, 51.8 -> 50.7, 50.5; 4
// 55.2, 54.5 -> 51.6, 51.5; 8 57.4, 56.8 -> 52.9, 52.5.
template <typename T, int NT, bool kNested, bool kWholeFirst, bool kShortRing>
__global__ void __launch_bounds__(FedConfig<NT>::kThreads, 1) FP4_MAX_REGISTERS(NT == 1 ? 112 : 128)
    gemm_stream_fed_kernel(const __grid_constant__ CUtensorMap w_map, const T* __restrict__ x, int64_t m, int64_t k,
                           const uint8_t* __restrict__ packed, fp4_scales scales, int nested_log2, int64_t n,
                           Code16 code, StreamRanges ranges, StreamOutput<T> out) {
  using C = FedConfig<NT, kShortRing>;
  constexpr int S = C::kStages;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* const ring = smem_raw;
  const uint32_t smem_window = tma::shared_address(smem_raw);
  const uint32_t table_window =
      uint32_t(smem_window + S * C::kStageBytes + C::kTableAlign - 1) & ~uint32_t(C::kTableAlign - 1);
  // (gemm_4bit_stream runs this kernel only where the window starts as FedConfig assumes; were it
  // elsewhere, the table would overrun the allocation: stop instead)
  if (smem_window % 1024 != 0 || table_window - smem_window != C::kTableOffset) __trap();
  uint8_t* const table = smem_raw + C::kTableOffset;
  float* const codes = reinterpret_cast<float*>(table + C::kTableBytes);
  float* const nested_code = codes + 16;
  uint8_t* const x_ring = table + C::kTableBytes + kCodeBytes;
  uint64_t* const full = reinterpret_cast<uint64_t*>(x_ring + S * C::kXStageBytes);  // [slot][part]
  uint64_t* const empty = full + S * C::kParts;                                        // [slot]
  allow_successor();
  const int64_t stages_per_tile = ranges.stages_per_tile;
  // The block's units (StreamRanges): its whole tiles' [whole_begin, whole_begin + whole_units),
  // then its shared range [begin, end).
  const int64_t whole_begin = int64_t(blockIdx.x) * ranges.whole * stages_per_tile;
  const int whole_units = kWholeFirst ? int(ranges.whole * stages_per_tile) : 0;
  const int64_t begin = ranges.begin(blockIdx.x), end = ranges.begin(blockIdx.x + 1);
  const int units = whole_units + int(end - begin);  // (< 2^31: see the consumers' counters)
  const int64_t first = whole_units > 0 ? whole_begin : begin;
  prefetch_first_stages(packed, scales, n, k, 6 /* blocksize 64 */, (first / stages_per_tile) * C::kTileRows, C::kTileRows,
                        (first % stages_per_tile) * 2, min(int64_t(S), int64_t(units)));
  if (threadIdx.x == 0) {
    // (FULL: lane 0's expect_tx arrival + each producer lane's arrival when its copies land)
    for (int s = 0; s < S * C::kParts; ++s) tma::mbarrier_init(full + s, 1 + 32);
    for (int s = 0; s < S; ++s) tma::mbarrier_init(empty + s, C::kWarps * 32);
    tma::fence_barrier_init();
  }
  __syncthreads();  // the barriers

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t chunks = k / kChunk;
  const uint32_t x_window = tma::shared_address(x_ring);
  // The producer's cursor: unit u of the range (tile, chunk c0) into ring slot `slot` of phase `phase`.
  // Slot s's scales (W warps): fp32 absmax of feature row R at half row 2 W s + R / 8, bytes (R % 8) * 16;
  // nested: half row W s + R / 16, its 4 codes at (R % 16) * 4 and its group absmax 64 bytes further.
  // A row's scales for one stage are 16 (or 4) bytes of a 128-byte line the next 7 (31) stages read:
  // the copies ask for the whole line (cp_async16_line; (28672, 8192) batch 1-4 0.3-1.8% faster).
  // At batch <= 8 rows past n (a partial last tile) copy nothing: clamped to row n - 1, up to 128
  // lanes per stage asked for the same 16 bytes, and the block holding that tile ran up to 15 us
  // behind the rest at (28672, 8192) batch 1 with the activation ring (its 16% loss there; 0-1.2%
  // without the ring). Batch 9-16 keeps the clamped copies: skipping them measured 1.5-2.5% slower
  // on (28672, 8192) and (8192, 28672), within 1% elsewhere (perf log).
  int produced = 0;
  int64_t tile = first / stages_per_tile, next_c0 = (first % stages_per_tile) * 2;
  int slot = 0;
  uint32_t phase = 0;
  auto produce = [&]() {
    if (produced >= S) tma::mbarrier_wait(empty + slot, phase ^ 1);
    const int64_t row0 = tile * C::kTileRows, blocks_per_row = k / 64;
    // (every part's barrier covers these copies: a lane's arrival tracks all its copies so far)
#pragma unroll
    for (int b = 0; b < 8 * NT; ++b)
      if (b < m)
        cp_async16(x_window + uint32_t(slot * 8 * NT + b) * C::kXRowBytes + ((lane ^ (b & 7)) * 16),
                   x + b * k + next_c0 * kChunk + lane * 8);
#pragma unroll
    for (int part = 0; part < C::kParts; ++part) {
      uint64_t* const bar = full + slot * C::kParts + part;
      if (lane == 0) {
        tma::mbarrier_expect(bar, C::kPartBytes);
        tma::load_2d(ring + slot * C::kStageBytes + part * C::kPartBytes, &w_map, int(next_c0 * (kChunk / 2)),
                     int(row0 + part * C::kPartRows), bar);
      }
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int r = part * C::kPartRows + lane + 32 * q;
        if (NT == 1 && row0 + r >= n) continue;  // (no feature row: its scale is zeroed where it is read)
        const int64_t block = (NT == 1 ? row0 + r : min(row0 + r, n - 1)) * blocks_per_row + 2 * next_c0;
        if constexpr (kNested) {
          const uint32_t half_row = table_window + uint32_t(slot * C::kWarps + r / 16) * 256 + 128 + (r % 16) * 4;
          cp_async4_line(half_row, scales.nested_codes + block);
          cp_async4(half_row + 64, scales.absmax + (nested_log2 >= 0 ? block >> nested_log2
                                                                      : block / scales.nested_blocksize));
        } else {
          cp_async16_line(table_window + uint32_t(slot * 2 * C::kWarps + r / 8) * 256 + 128 + (r % 8) * 16,
                          scales.absmax + block);
        }
      }
      tma::mbarrier_arrive_on_copies(bar);
    }
    ++produced, next_c0 += 2;
    if (next_c0 >= chunks) next_c0 = 0, ++tile;
    if (kWholeFirst && produced == whole_units) tile = begin / stages_per_tile, next_c0 = (begin % stages_per_tile) * 2;
    if (++slot == S) slot = 0, phase ^= 1;
  };
  // The first S stages are requested before the pair table is built (its copies go to the table's
  // spare halves, which the build leaves alone). Copies and the nested codebook come after the wait.
  if (warp == C::kWarps || kNested) wait_for_predecessor();
  if (warp == C::kWarps)
    while (produced < units && produced < S) produce();
  build_pair_table<T, 256, kNested>(table, codes, code, scales);
  wait_for_predecessor();
  __syncthreads();  // the pair table
  if (warp == C::kWarps) {
    while (produced < units) produce();
    cp_async_commit();  // (this lane's copies land before it exits)
    cp_async_wait<0>();
    return;
  }

  const int g = lane / 4, t = lane % 4;
  const uint32_t lane_window = table_window | uint32_t(lane) * 4;
  const float nested_offset = kNested ? *scales.nested_offset : 0.0f;
  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = 0.0f;
  // (32-bit counters: ranges hold < 2^31 units; 64-bit ones cost registers the loop does not have)
  int64_t row0 = (first / stages_per_tile) * C::kTileRows + warp * C::kRows;
  int c0 = int(first % stages_per_tile) * 2;
  // The shared range: its first tile (< 2^31 tiles) and chunk; its steps in that tile end at
  // first_units. (Few values: each register more here costs the finish kernel its place beside
  // this block, see finish_stream_kernel.)
  const int shared_tile = int(begin / stages_per_tile), shared_c0 = int(begin % stages_per_tile) * 2;
  const int first_units = whole_units + int(stages_per_tile) - shared_c0 / 2;
  slot = 0, phase = 0;
  for (int step = 0; step < units; ++step) {
    tma::mbarrier_wait(full + slot * C::kParts + warp / 4, phase);
    const uint8_t* stage = ring + slot * C::kStageBytes + warp * C::kRows * 128;
    const uint32_t scales_here = table_window + uint32_t((slot * C::kWarps + warp) * (kNested ? 1 : 2)) * 256 + 128;
    uint32_t block_codes[2] = {0, 0};
    float group_absmax[2] = {0.0f, 0.0f};
    if constexpr (kNested) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        block_codes[r] = ld_shared_u32(scales_here + (8 * r + g) * 4);
        group_absmax[r] = __uint_as_float(ld_shared_u32(scales_here + 64 + (8 * r + g) * 4));
      }
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int64_t c = c0 + j;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint4 xu[NT][2];
        load_activations<true, C::kXRowBytes>(xu, x_window, slot, x, m, k, c, j, h, g, t);
        float sc[2];
        uint2 words[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          // (row 8 r + g of the warp's 16: 128 bytes, 16-byte unit u at u ^ g, the box's swizzle)
          const int unit = 4 * j + 2 * h + t / 2;
          words[r] = *reinterpret_cast<const uint2*>(stage + (8 * r + g) * 128 + ((unit ^ g) * 16) + (t % 2) * 8);
          if constexpr (kNested)
            sc[r] = nested_scale(nested_code, (block_codes[r] >> (8 * (2 * j + h))) & 0xffu, group_absmax[r],
                                 nested_offset);
          else
            sc[r] = __uint_as_float(ld_shared_u32(scales_here + r * 256 + g * 16 + (2 * j + h) * 4));
          if (row0 + 8 * r + g >= n) sc[r] = 0.0f;
        }
        multiply_half<T, NT, true, true>(table, lane_window, words, sc, {0, 0}, xu, acc);
      }
    }
    tma::mbarrier_arrive(empty + slot);  // (every consumer thread: see the stream kernel's x_empty)
    if (++slot == S) slot = 0, phase ^= 1;
    // The tile ends here (or the block's range does): store this warp's sums.
    c0 += 2;
    if (c0 >= chunks || step + 1 == units) {
      // (whole tiles end whole, as first-tile steps that did not start mid-tile: to y)
      flush_sums(acc, row0, warp * C::kRows, C::kTileRows, lane, m, n, out,
                 store_slot(step < first_units, step >= whole_units && shared_c0 != 0, c0 >= chunks));
      c0 = 0, row0 += C::kTileRows;
    }
    if (kWholeFirst && step + 1 == whole_units)  // (on to the shared range)
      row0 = int64_t(shared_tile) * C::kTileRows + warp * C::kRows, c0 = shared_c0;
  }
}

// Whether a block's dynamic shared memory starts FedConfig::kWindowStart bytes into the window on
// `device`: after the memory the SM reserves per block (1 KB on sm_80 to sm_90; the fed kernel
// declares no static shared memory), so that the pair table lands on a 64 KB boundary.
bool fed_window_as_assumed(int device) {
  return device_attribute<cudaDevAttrReservedSharedMemoryPerBlock>(device, 0) == int(FedConfig<1>::kWindowStart);
}

template <typename T, int NT, bool kNested, bool kShortRing>
void launch_fed_ring(const fp4_exec& exec, const T* x, int64_t m, int64_t k, const uint8_t* packed,
                     const fp4_scales& scales, int64_t n, const Code16& code, const T* bias, T* y, float* workspace) {
  using C = FedConfig<NT, kShortRing>;
  constexpr auto kernel = gemm_stream_fed_kernel<T, NT, kNested, false, kShortRing>;
  constexpr auto kernel_whole_first = gemm_stream_fed_kernel<T, NT, kNested, NT == 1, kShortRing>;  // (batch <= 8 only)
  const int device = exec.device_index;
  allow_dynamic_smem<kernel>(device, C::kSmemBytes);
  allow_dynamic_smem<kernel_whole_first>(device, C::kSmemBytes);
  static_assert(C::kTileRows <= kStreamMaxTileRows, "the slots' size");
  const int64_t stages_per_tile = k / 256;
  const int64_t tiles = (n + C::kTileRows - 1) / C::kTileRows;
  const CUtensorMap w_map = tma::map_2d(packed, CU_TENSOR_MAP_DATA_TYPE_UINT8, k / 2, n, k / 2, 128, C::kPartRows,
                                        CU_TENSOR_MAP_SWIZZLE_128B, "the packed weight");
  launch_with_finish(exec, tiles * stages_per_tile, stages_per_tile, C::kTileRows, m, n, bias, y, workspace, NT == 1,
                     [&](const StreamRanges& ranges, const StreamOutput<T>& out) {
                       launch_dependent(device, ranges.whole > 0 ? kernel_whole_first : kernel, unsigned(ranges.blocks),
                                        C::kThreads, C::kSmemBytes, stream_of(exec), "gemm_4bit fed stream kernel",
                                        w_map, x, m, k, packed, scales, nested_shift(scales), n, code, ranges, out);
                     });
}

// Blocks whose ranges hold few units run on a ring one stage short: fewer copies in flight at the
// start, when every block asks for its first stages at once. H100, bf16 nf4, same process, us, full
// / short ring, batch 1 / 4 / 8 (5 stages or 4), units per block in brackets: (11008, 4096) [7] 14.3
// / 13.8, 15.2 / 14.3, 16.2 / 15.6; (14336, 4096) [9] 16.4 / 16.0, 18.4 / 17.9, 18.7 / 18.0; (4096,
// 14336) [9] 16.6 / 16.0, 17.0 / 16.3, 18.1 / 17.5; (8192, 8192) [10] 18.0 / 17.6, 18.7 / 18.4, 19.8
// / 19.2; (16384, 8192) [21] 33.0 / 31.8, 34.2 / 33.4, 35.7 / 34.0; (28672, 8192) [36] 50.9 / 50.9,
// 52.0 / 52.1, 53.1 / 53.2. Batch 16 (4 stages or 3): [7] 19.3 / 18.0, [9] 22.8 / 22.2 and 21.6 /
// 21.2, [10] 22.9 / 22.6, but [21] 38.0 / 38.5, [36] 60.1 / 61.4. Two stages short at batch <= 8
// lost 2-3% on (28672, 8192). FP4_CUDA_FED_SHORT=1 / 0 forces the short / full ring (tests).
template <int NT>
constexpr int64_t kShortRingUnits = NT == 1 ? 32 : 16;  // (units per block, at most)

template <typename T, int NT, bool kNested>
void launch_fed(const fp4_exec& exec, const T* x, int64_t m, int64_t k, const uint8_t* packed,
                const fp4_scales& scales, int64_t n, const Code16& code, const T* bias, T* y, float* workspace) {
  const int64_t units = (n + FedConfig<NT>::kTileRows - 1) / FedConfig<NT>::kTileRows * (k / 256);
  const int setting = switch_setting("FP4_CUDA_FED_SHORT");
  if (setting == 1 || (setting != 0 && units <= kShortRingUnits<NT> * stream_blocks(exec.device_index, units)))
    launch_fed_ring<T, NT, kNested, true>(exec, x, m, k, packed, scales, n, code, bias, y, workspace);
  else
    launch_fed_ring<T, NT, kNested, false>(exec, x, m, k, packed, scales, n, code, bias, y, workspace);
}
}  // namespace

size_t gemm_4bit_stream_workspace_size(int64_t m) {
  return size_t(2 * kStreamMaxBlocks) * kStreamMaxTileRows * size_t(m) * sizeof(float);
}

bool gemm_4bit_stream_fits(int device, int64_t m) {
  if (switch_setting("FP4_CUDA_STREAM") == 0) return false;  // testing: the path of devices without room for it
  const size_t needed = m <= 8 ? StreamConfig<1>::kSmemBytes : StreamConfig<2>::kSmemBytes;
  return max_block_smem(device) >= needed;
}

void gemm_4bit_stream(const fp4_exec& exec, const Code16& code, fp4_dtype dtype, const void* x, int64_t m, int64_t k,
                      const uint8_t* packed, const fp4_scales& scales, int64_t n, int64_t blocksize, const void* bias,
                      void* y, float* workspace) {
  const int log2 = log2_of(blocksize);
  // Blocksize-64 scales travel by cp.async (4 bytes of codes or 16 of absmax per row and stage), so
  // rows must hold whole stages of 4 blocks (k % 256) on aligned addresses, and a stage's 4 blocks
  // one nested group.
  const bool ring_scales = k % 256 == 0 && (scales.nested_codes != nullptr
                                                ? reinterpret_cast<uintptr_t>(scales.nested_codes) % 4 == 0 &&
                                                      reinterpret_cast<uintptr_t>(scales.absmax) % 4 == 0 &&
                                                      scales.nested_blocksize % 4 == 0
                                                : reinterpret_cast<uintptr_t>(scales.absmax) % 16 == 0);
  // The fed form wherever it can run: with the pair table at a 64 KB-aligned address (FedConfig) it
  // beats or ties the other form at batch 2-16 on every shape measured on the H100 (bf16 nf4, us, same
  // process, other / fed): (28672, 8192) batch 1 / 4 / 16: 57.3 / 56.3, 61.6 / 58.4, 67.8 / 63.9;
  // (4096, 14336) 2 / 16: 22.6 / 20.7, 24.1 / 22.6; (11008, 4096) 4: 20.1 / 18.3; (8192, 8192) 2:
  // 24.3 / 22.4; (4096, 4096) 4: 11.6 / 11.1; the one loss, (14336, 4096) batch 16: 22.8 / 23.2.
  // (Before the aligned table, with one ring stage more, the fed form lost on every weight of
  // < 2^27 values: (14336, 4096) batch 16 24.4 / 27.8.) FP4_CUDA_STREAM_FED=1 / 0 forces it on / off
  // wherever it can run (tests).
  const bool fed_wanted = switch_setting("FP4_CUDA_STREAM_FED") != 0;
  const bool fed = fed_wanted && ring_scales && blocksize == 64 && reinterpret_cast<uintptr_t>(packed) % 16 == 0 &&
                   gemm_4bit_wgmma_available(exec.device_index) && fed_window_as_assumed(exec.device_index);
  if (fed) {
    dispatch_variant<1, 2>(
        dtype, m, 8, scales, blocksize,
        [&](auto* tag, auto nt, auto nested, auto) {
          using T = std::remove_pointer_t<decltype(tag)>;
          launch_fed<T, decltype(nt)::value, decltype(nested)::value>(exec, static_cast<const T*>(x), m, k, packed,
                                                                      scales, n, code, static_cast<const T*>(bias),
                                                                      static_cast<T*>(y), workspace);
        },
        false);
    return;
  }
  dispatch_variant<1, 2>(
      dtype, m, 8, scales, blocksize,
      [&](auto* tag, auto nt, auto nested, auto paired) {
        using T = std::remove_pointer_t<decltype(tag)>;
        launch_stream<T, decltype(nt)::value, decltype(paired)::value, decltype(nested)::value>(
            exec, static_cast<const T*>(x), m, k, packed, scales, n, log2, code, static_cast<const T*>(bias),
            static_cast<T*>(y), workspace);
      },
      ring_scales);
}

}  // namespace fp4::cuda
