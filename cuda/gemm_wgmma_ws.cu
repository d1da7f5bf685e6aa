// The 4-bit linear layer on Hopper (sm_90a) for batch > 16 (gemm_wgmma.cu's kernel takes batch
// 17-64 only where k % 256 != 0), and batch 9-16 where it beats the stream kernel
// (gemm_4bit_wgmma_ws_takes_batch_16): a warp-specialized wgmma GEMM, read straight from the
// bitsandbytes layout. As everywhere the product is computed transposed, y^T = W x^T. One producer
// warpgroup only copies: the 4-bit weights and the activations by TMA (one box of weights per stage
// and one of activations per 64 columns), the scales by cp.async, or where they are plain
// blocksize-64 absmax by a TMA box of a row's 4 scales for 4 atoms (WsConfig). Two consumer
// warpgroups decode the weights into A fragments (one pair-table load per byte, as in
// gemm_wgmma.cu) and multiply (m64nBNk16, A from registers, B from shared memory), decoding stage i
// while stage i - 1's multiplies run. Measured before: the producers decoding into a tile in shared
// memory that wgmma read from there (both operands in shared memory) kept the tensor cores at ~60%
// — the decode's table loads and tile stores competed with the multiplies' operand reads.
//
// A tile is 128 output features x BN batch rows (256 past batch 128, 128 for 65-128, 64 for 33-64,
// 32 for 17-32, 16 to 16), one block per SM; a block multiplies whole tiles (every `walkers`-th), or
// a run of stages that may cross tiles where blocks share a grid's last (or only) wave (WsWork). A
// stage is kAtoms slices of 64 columns of k (one swizzle atom of activations each): 2 for the tiles
// of batch <= 128 (k % 256 == 0), 1 for BN 256. Each consumer warp stores its sums of a whole tile to y in
// 16-byte pieces through staging rows in shared memory (store_tile_rows). Below
// batch 256 shared memory bounds a stage, not the multiplies: ncu at batch 64 counted each 16-byte
// cp.async of weights (rows 2-4 KB apart) as its own wavefront, 45% of the block's, which the TMA
// box replaced, and each scale copy too (16%: now 4 atoms per copy); two atoms halve the per-stage
// waits and give the box 64-byte rows (perf log). What a stage waits for now, at batch 17-128, is the
// decode's shared-memory loads: decoding one atom of two (results wrong on purpose) made batch 64
// 16-26% faster, leaving out every activation copy changed nothing, and more consumer warps or TMA
// multicast of the activations only lost (perf log).
// The producers' scale copies complete the slot's first mbarrier (cp.async arrivals), the TMA boxes
// a second one (with the scales' boxes, the only one); the consumers wait on them (each warpgroup
// on its own: no barrier couples the two). EMPTY[slot], a named barrier, tells the producers that
// the multiplies that read a slot are retired. The producers give most of their registers to the
// consumers (setmaxnreg): BN / 2 accumulators and two stages of fragments per thread. A call's
// kernels (zeroing, GEMM, finish) launch as programmatic dependents (launch.cuh): a block builds
// its pair table while the kernel before it drains (H100, bf16 nf4, same process, us, before /
// after: (14336, 4096) batch 64 23.9 / 22.1, (4096, 14336) 128 36.7 / 32.9, (4096, 4096) 17 16.2 /
// 12.7; batch 1024 within 1.5%).
// Measurements and what was tried: docs/perf-log.md.
#include "build_config.h"
#include "kernels.hpp"
#include "mma_4bit.cuh"
#include "tma.cuh"
#include "wgmma.cuh"


#include <algorithm>
#include <type_traits>

namespace fp4::cuda {
namespace {

// The last named barrier (of 16): the consumer warpgroups' own (reduce_in_cluster).
constexpr int kConsumersBarrier = 15;

// BN 256 for batch > 128, BN 128 for batch 65-128 (a half-empty 256-row tile would multiply zeros),
// 64, 32 and 16 below; kAtoms 64-column slices of k per stage (2 fit a stage beside BN <= 128 only);
// kGroupedScales: see the scale ring below (kNested: of nested absmax).
template <int BN, int kAtoms, bool kGroupedScales = false, bool kNested = false>
struct WsConfig {
  static constexpr int kBatchRows = BN;  // batch rows per block (the m64nBNk16 multiply's N)
  static constexpr int kThreads = 384;   // warpgroup 0 copies, 1 and 2 decode and multiply
  static constexpr int kProducers = 128;
  static constexpr int kTileRows = 128;  // output features per block: one m64 tile per consumer
  static constexpr int kStageK = 64 * kAtoms;  // k columns per stage: kAtoms swizzle atoms
  static constexpr int kRowBytes = 32 * kAtoms;  // a weight row's bytes per stage
  static constexpr size_t kXAtomBytes = size_t(kBatchRows) * 128;                 // rows of 64 16-bit values
  static constexpr size_t kXStageBytes = kAtoms * kXAtomBytes;
  static constexpr size_t kWStageBytes = size_t(kTileRows) * kRowBytes;           // the 4-bit weights: one box
  static constexpr size_t kSStageBytes = size_t(kTileRows) * 2 * 4 * kAtoms;      // scale words, nested group absmax
  // Pair-table rows of 128 bytes: one copy per lane, so the lookups never conflict on banks.
  static constexpr size_t kTableBytes = 256 * 128;
  // Each consumer warp's staging rows for the stores to y (store_tile_rows): 32 batch rows x 16
  // features. Grouped scales leave the per-stage scale words unused (below): two-atom stages' hold
  // them (>= 4 stages x 2 KB), so the stages that fit stay as many; else they take room of their own.
  static constexpr size_t kStagingBytes = 8 * 32 * 16 * 2;
  static constexpr bool kStagingInScaleRing = kGroupedScales && kAtoms == 2;
  static constexpr size_t kFixedBytes =
      1024 + kTableBytes + (kStagingInScaleRing ? 0 : kStagingBytes) + kCodeBytes;  // (+1024: the rings are aligned by hand)
  static constexpr size_t kPerStage = kXStageBytes + kWStageBytes + kSStageBytes + 2 * sizeof(uint64_t);
  static constexpr size_t kBudget = 227 * 1024;  // (one block per SM)
  // Grouped scales (blocksize-64 absmax, k % 256 == 0; plain ones 16-byte aligned): a row's 4 scales of 4
  // consecutive atoms come by one 16-byte copy, issued with the group's first stage, into a ring of
  // kScaleSlots groups of their own: each copy is a shared-memory wavefront of its own (the rows lie
  // 4 KB apart), so 4 atoms per copy instead of 1 (ncu: the scale copies were 16% of a block's
  // wavefronts at batch 64). A slot is refilled only after the stages of the group kScaleSlots
  // before it are retired: kScaleSlots groups span kStages + kGroupStages stages.
  // (The per-stage scale words, unused then, stay in the layout: freeing them would fit BN 32 an
  // 11th stage, not measured.)
  static constexpr int kGroupStages = 4 / kAtoms;
  // Nested absmax (blocksize 64, nested blocksize a multiple of 4) group the same way: a row's slot
  // holds the 4-byte word of the group's 4 codes and the one nested scale they share (two 4-byte
  // copies a row and group, where a row and stage took two per atom).
  // Two-atom stages take a group of plain scales as one TMA box (16 bytes x the tile's rows) on the
  // stage's own barrier, not 128 copies on a barrier of their own: the consumers wait on one barrier
  // a stage, and 16 wavefronts a group instead of 128 (batch 17-64 1-4% faster; one-atom stages,
  // batch 256, ~1% slower: they keep the copies).
  static constexpr bool kScaleBoxes = kGroupedScales && !kNested && kAtoms == 2;
  static constexpr size_t kGroupBytes = size_t(kTileRows) * 16;
  static constexpr int scale_slots(int stages) {
    return kGroupedScales ? (stages + kGroupStages - 1) / kGroupStages + 1 : 0;
  }
  // Ring slots: BN 256 measured best at 4 and BN 128 of one atom at 6 (5 and 8 were slower, perf
  // log); two atoms take as many as shared memory holds (BN 128: 4, BN 64: 7, BN 32: 10).
  static constexpr int fit() {
    int stages = int((kBudget - kFixedBytes) / kPerStage);
    while (kFixedBytes + stages * kPerStage + scale_slots(stages) * kGroupBytes > kBudget) --stages;
    return stages < 12 ? stages : 12;
  }
  static constexpr int kStages = BN == 256 ? 4 : (BN == 128 && kAtoms == 1) ? 6 : fit();
  static constexpr int kScaleSlots = scale_slots(kStages);
  // Registers per thread after the hand-over (setmaxnreg): the consumers hold BN / 2 accumulators
  // and two stages of A fragments; the producers only addresses. 128 x 40 + 256 x 232 <= 64K.
  static constexpr int kProducerRegisters = 40, kConsumerRegisters = 232;
  static constexpr size_t kSmemBytes = kFixedBytes + kStages * kPerStage + kScaleSlots * kGroupBytes;
  static_assert(kSmemBytes <= kBudget, "one block per SM");
  static_assert(!kStagingInScaleRing || kStages * kSStageBytes >= kStagingBytes, "the staging rows fit the scale ring");
  static_assert(1 + kStages < kConsumersBarrier, "named barriers: 0 for __syncthreads, EMPTY per slot, then the consumers'");
};

// Named barriers between the producer and the consumer warpgroups (all 384 threads take part: the
// arriving side does not wait).
__device__ __forceinline__ void barrier_sync(int id) { asm volatile("bar.sync %0, 384;" ::"r"(id) : "memory"); }
__device__ __forceinline__ void barrier_arrive(int id) { asm volatile("bar.arrive %0, 384;" ::"r"(id) : "memory"); }

// (sm_90 instructions: like wgmma they exist only in the sm_90a code, FP4_WGMMA_DEVICE)
#ifdef FP4_WGMMA_DEVICE
#define FP4_SM90_ONLY(...) __VA_ARGS__
#else
#define FP4_SM90_ONLY(...) __trap()
#endif
// Hands registers between the warpgroups (every warp of a warpgroup executes the same one).
template <int kRegisters>
__device__ __forceinline__ void registers_down() {
  FP4_SM90_ONLY(asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegisters)));
}
template <int kRegisters>
__device__ __forceinline__ void registers_up() {
  FP4_SM90_ONLY(asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegisters)));
}

// Where 16-byte piece q of weight row r lies in a ring slot: rows of kRowBytes (32 or 64) as the TMA
// copy's swizzle of that span stores them (piece q at q ^ address bits 7 on), so one 16-byte load of
// 8 consecutive rows touches 8 different bank groups.
template <int kRowBytes>
__device__ __forceinline__ int weight_piece(int r, int q) {
  return r * kRowBytes + ((q ^ ((r * kRowBytes >> 7) & (kRowBytes / 16 - 1))) << 4);
}

// n / d for n < 2^31 by a d fixed on the host, without a division: a multiply-high, an add and a
// shift (round-up multiplier, as in Granlund & Montgomery), on the uniform datapath where n is
// warp-uniform (a division or a 64-bit one's call leaves its result in vector registers, and all
// that follows from it: measured 12% slower at batch 17).
struct FastDivisor {
  uint32_t multiplier, shift;

  static FastDivisor of(int64_t d) {
    uint32_t shift = 0;
    while ((int64_t(1) << shift) < d) ++shift;
    const uint64_t multiplier = ((uint64_t(1) << 32) * ((uint64_t(1) << shift) - uint64_t(d))) / uint64_t(d) + 1;
    return {uint32_t(multiplier), shift};
  }
  __device__ uint32_t divide(uint32_t n) const { return (__umulhi(n, multiplier) + n) >> shift; }
};

// Which k stages of which tiles each block multiplies. Tile t is batch tile t % batch_tiles and
// feature tile t / batch_tiles (batch tiles vary fastest: the blocks that share a weight tile run
// together and read it once); its stages are numbered t * tile_stages + [0, tile_stages). Tiles
// [0, whole_tiles) are taken whole, their sums written to y, by the `walkers`: block b < walkers
// takes tiles b, b + walkers, b + 2 walkers, ... (at most one wave of blocks, so the pair table
// is built and the ring filled once per SM, not once per tile, and the producers fetch a block's
// next tile while its consumers store the last; the blocks at work at any time still take
// neighbouring tiles). The shared_blocks after the walkers share the stages of the tiles from
// whole_tiles on (shared_pairs pairs: the kernel takes stages in pairs) evenly and in order, so a
// block's run may end inside one tile and go on in the next ("stream-K").
// Sharing spreads work that would leave SMs idle in a grid's last wave (or in its only one) over
// all of them. The sums of shared tile s (tile whole_tiles + s) meet in the workspace, as tiles of
// kTileRows x BN floats in the order the consumer threads hold them (put_tile_sums), and
// finish_shared_tiles writes them to y:
//  - in_slots: shared block j stores its sums of tile s in slot j + s (unique: each next run is
//    one block or one tile on), and the finish adds the slots of a tile's blocks in order (the same
//    bits on every call). Needs shared_blocks + shared tiles slots (ws_work: <= tiles + batch_tiles).
//  - else (a single wave split many ways: more blocks than that): slot s, zeroed first, and the
//    blocks add into it atomically. Atomics cost more per byte (measured at batch 256, (28672,
//    8192): sharing the second wave was 5% slower than not) but the batch is small there.
// A single wave split cluster_splits (2-8) ways runs in clusters of that many blocks instead, one
// tile per cluster (shared_blocks = tiles x splits keeps each block's run in one tile): the blocks
// leave their sums in shared memory and add up each other's there (reduce_in_cluster), so no
// workspace, no zeroing or finish kernel, and the same bits every call. H100, bf16 nf4, same
// process, us, through the workspace / in clusters: (3072, 4096) batch 17 10.5 / 8.9, 64 12.3 /
// 10.1, 256 23.2 / 18.6; (2048, 4096) 64 10.4 / 9.7, 256 21.4 / 17.3; (1024, 8192) (8 ways) 64
// 9.9 / 10.1, 256 18.9 / 18.2.
//
// Where the GPU cannot hold all of a call's clusters at once (the H100 holds 30 of 4 blocks: every
// (4096, k) weight has 32 tiles), the call runs as two kernels (split_off_rest): kClusters, the
// clusters that fit, and beside them, on the SMs they leave, kRest, the other tiles shared by
// those SMs' blocks, which finish them in-kernel: each block stores its sums of a tile to its slot
// (in_slots) and counts itself in at the tile's counter, and at its end adds its share of the tile
// over the slots in block order (the same bits every call; finish_share). kClusters zeroes the
// counters and lets kRest launch only after its own wait for the kernel before it, so kRest need
// not wait at its start (its launch implies that kernel's completion); kRest waits at its end, so
// that its completion implies kClusters' (launch.cuh).
struct WsWork {
  enum Part : int { kAll, kClusters, kRest };
  int64_t tile_stages, batch_tiles, tiles, whole_tiles, shared_pairs, shared_blocks, walkers;
  bool in_slots;
  int cluster_splits;
  int part;              // (kAll unless split_off_rest split the call)
  int rest_tiles;        // kClusters, kRest: the tiles kRest takes (its shared tiles)
  unsigned* counters;    // kClusters, kRest: one per rest tile, after kRest's slots in the workspace
  // (for the kernel's stage walk, all counts < 2^31: ws_work)
  FastDivisor by_tile_stages, by_batch_tiles, by_shared_blocks;

  int64_t blocks() const { return walkers + shared_blocks; }
  int64_t shared_tiles() const { return shared_blocks > 0 ? tiles - whole_tiles : 0; }
  // The first stage of block `block` and the end of a run that long (a walker's tiles are whole,
  // not adjacent: stage_end - stage_begin is the count).
  __device__ void stages_of(int64_t block, int64_t& begin, int64_t& end) const {
    if (block < walkers) {
      begin = block * tile_stages, end = begin + (whole_tiles - block + walkers - 1) / walkers * tile_stages;
    } else {
      // (pair j * shared_pairs / shared_blocks, as q j + r j / shared_blocks: r j < 2^31)
      const uint32_t j = uint32_t(block - walkers), q = uint32_t(shared_pairs / shared_blocks),
                     r = uint32_t(shared_pairs % shared_blocks);
      const int64_t first = whole_tiles * tile_stages;
      begin = first + 2 * int64_t(q * j + by_shared_blocks.divide(r * j));
      end = first + 2 * int64_t(q * (j + 1) + by_shared_blocks.divide(r * (j + 1)));
    }
  }
  // The shared block whose run holds pair p (counted from the first shared stage).
  __device__ int64_t block_of_pair(int64_t p) const { return ((p + 1) * shared_blocks - 1) / shared_pairs; }
  // The shared blocks whose runs hold shared tile s: first to last (their slots: + s, in_slots).
  __device__ void blocks_of_tile(int64_t s, int64_t& first, int64_t& last) const {
    const int64_t pairs = tile_stages / 2;
    first = block_of_pair(s * pairs), last = block_of_pair((s + 1) * pairs - 1);
  }
};

// Walks a block's stages in order (WsWork numbering) without dividing at every stage (the producers
// share the SMs' issue slots with the decode): the stage inside its tile and the tile's place.
// 32-bit: a tile has < 2^31 stages, a GEMM < 2^31 tiles.
struct StageCursor {
  int st, batch_tile, feature_tile;

  __device__ StageCursor(const WsWork& work, int64_t stage) {
    const uint32_t tile = work.by_tile_stages.divide(uint32_t(stage));
    st = int(uint32_t(stage) - tile * uint32_t(work.tile_stages));
    feature_tile = int(work.by_batch_tiles.divide(tile)), batch_tile = int(tile - feature_tile * uint32_t(work.batch_tiles));
  }
  __device__ int64_t tile(const WsWork& work) const { return int64_t(feature_tile) * work.batch_tiles + batch_tile; }
  // Moves `count` stages on, at most to the end of the tile.
  __device__ void advance(const WsWork& work, int count = 1) {
    st += count;
    if (st == int(work.tile_stages)) {
      st = 0;
      if (++batch_tile == int(work.batch_tiles)) batch_tile = 0, ++feature_tile;
    }
  }
};

// The 256 consumer threads' accumulators of one tile (BN / 2 each) stored or added (kAdd) into its
// sums: float4 q of thread c at q * 256 + c, so each warp's vector access covers 512 contiguous bytes.
// Float4 q holds batch rows batch0 + 8 q + [0, 8) (wgmma::store_accumulators): those past m are
// left out, and finish_shared_tiles leaves them out too.
template <bool kAdd, int R>
__device__ __forceinline__ void put_tile_sums(float* tile_sums, const float (&d)[R], int consumer, int64_t batch0,
                                              int64_t m) {
  static_assert(R % 4 == 0, "whole float4s");
  float4* const out = reinterpret_cast<float4*>(tile_sums) + consumer;
#pragma unroll
  for (int q = 0; q < R / 4; ++q) {
    if (batch0 + 8 * q >= m) break;
    const float4 v = make_float4(d[4 * q], d[4 * q + 1], d[4 * q + 2], d[4 * q + 3]);
    if constexpr (kAdd)
      FP4_SM90_ONLY(atomicAdd(out + q * 256, v));
    else
      __stcg(out + q * 256, v);  // (read once, by the finish: past L1)
  }
}

// Stores four 8 x 8 16-bit matrices of mma fragments transposed (sm_90): matrix q from lanes 8 q +
// [0, 8)'s row addresses, row c holding the fragment's column c.
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t address, const uint32_t (&r)[4]) {
  FP4_SM90_ONLY(asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(address),
                             "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
                             : "memory"));
}

// A consumer warp's sums of a whole tile (features row0 + [0, 16), batch rows batch0 + [0, BN):
// wgmma::store_accumulators' layout) plus bias, stored to y in 16-byte pieces of its rows: 32 batch
// rows at a time go through the warp's staging rows (stmatrix transposes the fragments into 8
// features of one batch row per 16 bytes; halves swapped every 4 rows, so neither the transposing
// stores nor the row reads conflict on banks), then each lane stores whole pieces. 16 vector stores
// per 256 batch rows instead of 128 of 2 bytes, which took 5-10% of the kernel at batch 256-1024
// (perf log). Needs n % 8 == 0 and y 16-byte aligned (a piece is then all in y or all past n).
template <typename T, int BN>
__device__ __forceinline__ void store_tile_rows(const float (&d)[BN / 2], uint8_t* staging, int64_t row0,
                                                int64_t batch0, int64_t m, int64_t n, const T* bias, T* y,
                                                int lane) {
  const int g = lane / 4, q = lane / 8, c = lane % 8;
  float bias_of[2] = {0.0f, 0.0f};
#pragma unroll
  for (int h = 0; h < 2; ++h)
    if (bias != nullptr && row0 + g + 8 * h < n) bias_of[h] = load_as_float(bias + row0 + g + 8 * h);
  auto piece_at = [](int b, int half) { return b * 32 + ((half ^ ((b >> 2) & 1)) << 4); };
  const uint32_t staging_address = uint32_t(__cvta_generic_to_shared(staging));
  // (a chunk of 32 batch rows, or all 16 of BN 16: one pair of octets, one half of the rows)
  constexpr int kChunks = (BN + 31) / 32, kPairs = BN < 32 ? 1 : 2;
#pragma unroll
  for (int chunk = 0; chunk < kChunks; ++chunk) {
#pragma unroll
    for (int pair = 0; pair < kPairs; ++pair) {  // (batch octets 4 chunk + 2 pair + [0, 2), both feature halves)
      uint32_t r[4];
#pragma unroll
      for (int mat = 0; mat < 4; ++mat) {
        const int i = 4 * (4 * chunk + 2 * pair + mat / 2) + 2 * (mat % 2);
        r[mat] = Pair<T>::of(d[i] + bias_of[mat % 2], d[i + 1] + bias_of[mat % 2]);
      }
      stmatrix_x4_trans(staging_address + piece_at(8 * (2 * pair + q / 2) + c, q % 2), r);
    }
    __syncwarp();
#pragma unroll
    for (int half_rows = 0; half_rows < kPairs; ++half_rows) {
      const int piece = 32 * half_rows + lane, b = piece / 2, half = piece % 2;
      const uint4 v = *reinterpret_cast<const uint4*>(staging + piece_at(b, half));
      const int64_t batch = batch0 + 32 * chunk + b, f = row0 + 8 * half;
      if (batch < m && f < n) *reinterpret_cast<uint4*>(y + batch * n + f) = v;
    }
    __syncwarp();  // (the next chunk's stmatrix overwrites the rows just read)
  }
}

// Thread-block clusters (sm_90). cluster_sync: every thread of every block of the cluster arrives
// (releasing its shared-memory writes) and waits (acquiring the others').
__device__ __forceinline__ void cluster_sync() {
  FP4_SM90_ONLY(asm volatile("barrier.cluster.arrive.release;\n\tbarrier.cluster.wait.acquire;" ::: "memory"));
}
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t rank = 0;
  FP4_SM90_ONLY(asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank)));
  return rank;
}
// A float4 at shared-window address `local` of the cluster's block `rank`.
__device__ __forceinline__ float4 load_from_block(uint32_t local, uint32_t rank) {
  float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  FP4_SM90_ONLY(uint32_t remote; asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
                asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
                             : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                             : "r"(remote)
                             : "memory"));
  return v;
}
// Named barrier of the 256 consumer threads (below it: the ring's EMPTY barriers, WsConfig).
__device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync %0, 256;" ::"n"(kConsumersBarrier) : "memory");
}

// Where warp w of consumer thread c's warpgroup holds rows of a tile: rows warp_row + [0, 16).
__device__ __forceinline__ int consumer_warp_row(int consumer) { return 64 * (consumer / 128) + 16 * ((consumer / 32) % 4); }

// kRest's blocks finish their shared tiles together (WsWork): each counts itself in at tile s's
// counter once its sums are in its slot (put_tile_sums; the thread fences order the slot stores
// before the count), then, at its end, waits until all of the tile's blocks have counted in and adds
// its share of the tile's float4s q over their slots in block order (as finish_shared_tiles: the
// same bits every call; shares as reduce_in_cluster's) and stores them with the bias to y. Waiting
// only at the end keeps a block whose run goes on into the next tile from stalling; it cannot hang:
// kRest's blocks wait only on each other, and any that are not yet resident get the SMs of the
// clusters, which wait on nothing of kRest's. (One block adding all of a tile's slots took 1.6 us at
// batch 17 and 12 us at 256 on (4096, 14336): a chain of dependent loads, and 768 KB through one SM.)
__device__ __forceinline__ void count_in(const WsWork& work, int64_t s, int consumer) {
  __threadfence();
  consumers_sync();
  if (consumer == 0) atomicAdd(work.counters + s, 1u);
}
__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
  unsigned value;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(value) : "l"(p) : "memory");
  return value;
}
template <typename T, int BN>
__device__ __forceinline__ void finish_share(const float* sums, const WsWork& work, int64_t s, int64_t block,
                                             int consumer, int64_t m, int64_t n, const T* bias, T* y) {
  constexpr int64_t kTileSums = 128 * BN;
  constexpr int kSlotsInFlight = 8;
  const int64_t tile = work.whole_tiles + s;
  int64_t first, last;
  work.blocks_of_tile(s, first, last);
  const int contributors = int(last - first + 1), rank = int(block - first);
  if (consumer == 0)
    while (load_acquire(work.counters + s) < unsigned(contributors)) __nanosleep(64);
  consumers_sync();
  __threadfence();
  const float4* const slots = reinterpret_cast<const float4*>(sums) + (first + s) * (kTileSums / 4) + consumer;
  const int64_t row0 = tile / work.batch_tiles * 128 + consumer_warp_row(consumer), batch0 = tile % work.batch_tiles * BN;
  for (int q = rank * (BN / 8) / contributors; q < (rank + 1) * (BN / 8) / contributors && batch0 + 8 * q < m; ++q) {
    float total[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int j0 = 0; j0 < contributors; j0 += kSlotsInFlight) {
      float4 v[kSlotsInFlight];
#pragma unroll
      for (int j = 0; j < kSlotsInFlight; ++j)
        if (j0 + j < contributors) v[j] = __ldcg(slots + (j0 + j) * (kTileSums / 4) + q * 256);
#pragma unroll
      for (int j = 0; j < kSlotsInFlight; ++j)
        if (j0 + j < contributors) total[0] += v[j].x, total[1] += v[j].y, total[2] += v[j].z, total[3] += v[j].w;
    }
    wgmma::store_accumulators(total, row0, batch0 + 8 * q, m, n, bias, y, nullptr);
  }
}

// The end of a tile split `splits` ways over a cluster (WsWork::cluster_splits; the block of rank
// r summed the tile's r-th part of k): each block leaves its sums in its ring (`ring`, idle now:
// float4 q of consumer c at q * 256 + c), then block r adds the float4s q in [r Q / splits, (r + 1)
// Q / splits) of every block in rank order (Q = BN / 8: the work split evenly, the same bits every
// call) and stores them with the bias to y. The second cluster_sync keeps every block's shared
// memory alive until the others have read it. Consumer thread c's values, rows row0 (its warp's
// first) and batch rows batch0 + 8 q on (wgmma::store_accumulators' layout).
template <typename T, int BN>
__device__ __forceinline__ void reduce_in_cluster(const float (&acc)[BN / 2], uint8_t* ring, int splits, int consumer,
                                                  int64_t row0, int64_t batch0, int64_t m, int64_t n, const T* bias,
                                                  T* y) {
  float4* const sums = reinterpret_cast<float4*>(ring);
  consumers_sync();  // (both warpgroups' multiplies have read the ring's last stage)
#pragma unroll
  for (int q = 0; q < BN / 8; ++q)
    sums[q * 256 + consumer] = make_float4(acc[4 * q], acc[4 * q + 1], acc[4 * q + 2], acc[4 * q + 3]);
  cluster_sync();
  const int rank = int(cluster_rank());
  const uint32_t local = uint32_t(__cvta_generic_to_shared(sums + consumer));
  for (int q = rank * (BN / 8) / splits; q < (rank + 1) * (BN / 8) / splits && batch0 + 8 * q < m; ++q) {
    float total[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int block = 0; block < splits; ++block) {
      const float4 v = load_from_block(local + uint32_t(q * 256) * 16, uint32_t(block));
      total[0] += v.x, total[1] += v.y, total[2] += v.z, total[3] += v.w;
    }
    wgmma::store_accumulators(total, row0, batch0 + 8 * q, m, n, bias, y, nullptr);
  }
  cluster_sync();
}

template <typename T, int BN, int kAtoms, bool kNested, bool kGroupedScales>
__global__ void __launch_bounds__(WsConfig<BN, kAtoms, kGroupedScales, kNested>::kThreads, 1)
    gemm_wgmma_ws_kernel(const __grid_constant__ CUtensorMap x_map, const __grid_constant__ CUtensorMap w_map,
                         const __grid_constant__ CUtensorMap scale_map,
                         int64_t m, int64_t k,
                         const uint8_t* __restrict__ packed, fp4_scales scales, int nested_log2, int64_t n,
                         int blocksize_log2, Code16 code, WsWork work, const T* __restrict__ bias,
                         T* __restrict__ y, bool y_in_pieces, float* __restrict__ sums) {
  using C = WsConfig<BN, kAtoms, kGroupedScales, kNested>;
  constexpr int S = C::kStages;
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  extern __shared__ __align__(16) uint8_t smem_raw[];
  // (an offset from smem_raw, not an integer cast, keeps the pointers in the shared address space)
  uint8_t* const xring = smem_raw + ((1024 - (uint32_t(__cvta_generic_to_shared(smem_raw)) & 1023)) & 1023);
  uint8_t* const wring = xring + S * C::kXStageBytes;
  uint8_t* const sring = wring + S * C::kWStageBytes;
  uint8_t* const gring = sring + S * C::kSStageBytes;  // [scale slot][row][4 atoms] (kGroupedScales)
  uint8_t* const table = gring + C::kScaleSlots * C::kGroupBytes;
  // [consumer warp][32 batch rows][16 features] (store_tile_rows)
  uint8_t* const staging = C::kStagingInScaleRing ? sring : table + C::kTableBytes;
  float* const codes = reinterpret_cast<float*>(table + C::kTableBytes + (C::kStagingInScaleRing ? 0 : C::kStagingBytes));
  uint64_t* const x_arrived = reinterpret_cast<uint64_t*>(codes + kCodeBytes / sizeof(float));  // [slot]
  uint64_t* const w_arrived = x_arrived + S;                                                      // [slot]
  const bool rest = work.part == WsWork::kRest;  // (no wait at its start, one at its end: WsWork)
  if (work.part != WsWork::kClusters) allow_successor();
  int64_t stage_begin, stage_end;  // (numbered across tiles: WsWork)
  work.stages_of(blockIdx.x, stage_begin, stage_end);
  const int stages = int(stage_end - stage_begin);
  // Launched as a dependent (launch.cuh): until the kernel before it completes, the block builds the
  // pair table (with nested statistics after the wait: it reads the nested codebook). An L2
  // prefetch of the block's first stages before the wait, as the stream kernels do, lost 0-6%
  // here (perf log).
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) tma::mbarrier_init(x_arrived + s, 1), tma::mbarrier_init(w_arrived + s, C::kProducers);
    tma::fence_barrier_init();
  }
  if (kNested && !rest) wait_for_predecessor();
  build_pair_table<T, 128, kNested>(table, codes, code, scales);  // (its barrier orders the inits)
  if (!kNested && !rest) wait_for_predecessor();
  if (work.part == WsWork::kClusters && blockIdx.x == 0) {
    for (int i = threadIdx.x; i < work.rest_tiles; i += blockDim.x) work.counters[i] = 0;
    __threadfence();
  }
  __syncthreads();  // the pair table (and the counters zeroed, before any block lets kRest launch)
  if (work.part == WsWork::kClusters) allow_successor();
  if (stages <= 0) {  // (block-uniform)
    if (rest) wait_for_predecessor();
    return;
  }
  constexpr int kEmpty = 1;  // named barrier id of slot 0's EMPTY
  const bool walker = blockIdx.x < work.walkers;  // (it jumps to its next tile: WsWork)

  if (threadIdx.x < C::kProducers) {
    registers_down<C::kProducerRegisters>();
    // Thread p copies the scales of weight row p of the tile (rows past n read row n - 1's; the
    // consumers give them scale 0); thread 0 also the stage's weight box and activation tiles, by TMA.
    const int p = threadIdx.x;
    StageCursor next(work, stage_begin);
    int64_t next_tile = blockIdx.x;  // (a walker's: the tile of next; past its last, never issued)
    int group_slot = 0;  // (grouped scales: the ring slot of the scale group being issued)
    int64_t batch0, tile_row0, row_elem;  // (of next's tile)
    auto enter_tile = [&] {
      batch0 = int64_t(next.batch_tile) * BN, tile_row0 = int64_t(next.feature_tile) * C::kTileRows;
      row_elem = min(tile_row0 + p, n - 1) * k;
    };
    enter_tile();
    // Request the block's stage i into ring slot `slot` (nothing past the end; called for i in order).
    auto issue = [&](int slot, int i) {
      if (i < stages) {
        const int st = next.st;
        bool opens_group = false;  // (grouped scales: copied with the first stage of their group)
        if constexpr (kGroupedScales) {
          const int atom0 = st * kAtoms;
          opens_group = atom0 % 4 == 0 || i == 0;  // (a shared block's run may begin inside a group)
          if (opens_group && i != 0) group_slot = group_slot + 1 == C::kScaleSlots ? 0 : group_slot + 1;
          if (opens_group) {
            uint8_t* const group = gring + group_slot * C::kGroupBytes + p * 16;
            const int64_t block0 = (row_elem >> 6) + (atom0 & ~3);
            if constexpr (kNested) {  // (the code word is aligned and inside the array: gemm_4bit_wgmma_supports)
              cp_async4(group, scales.nested_codes + block0);
              cp_async4(group + 4, scales.absmax + (nested_log2 >= 0 ? block0 >> nested_log2
                                                                      : block0 / scales.nested_blocksize));
            } else if constexpr (!C::kScaleBoxes) {
              cp_async16(group, scales.absmax + block0);
            }  // (else thread 0's TMA box, below)
          }
        } else {
          // Scale words of row p, atom a at [p][a] (nested group absmax kProducers * kAtoms words on).
          uint32_t* const scale_dst = reinterpret_cast<uint32_t*>(sring + slot * C::kSStageBytes) + p * kAtoms;
#pragma unroll
          for (int a = 0; a < kAtoms; ++a) {
            const int64_t block = (row_elem + int64_t(st * kAtoms + a) * 64) >> blocksize_log2;
            if constexpr (kNested) {
              cp_async4(scale_dst + a, scales.nested_codes + (block & ~int64_t(3)));  // (gemm_4bit_wgmma_supports)
              cp_async4(scale_dst + C::kProducers * kAtoms + a,
                        scales.absmax + (nested_log2 >= 0 ? block >> nested_log2 : block / scales.nested_blocksize));
            } else {
              cp_async4(scale_dst + a, scales.absmax + block);
            }
          }
        }
        if constexpr (!C::kScaleBoxes) tma::mbarrier_arrive_on_copies(w_arrived + slot);
        if (p == 0) {
          const bool scale_box = C::kScaleBoxes && opens_group;
          tma::mbarrier_expect(x_arrived + slot,
                               uint32_t(C::kXStageBytes + C::kWStageBytes + (scale_box ? C::kGroupBytes : 0)));
          if (scale_box)  // (rows past n read as zero)
            tma::load_2d(gring + group_slot * C::kGroupBytes, &scale_map, int(st * kAtoms) & ~3, int(tile_row0),
                         x_arrived + slot);
#pragma unroll
          for (int a = 0; a < kAtoms; ++a)
            tma::load_2d(xring + slot * C::kXStageBytes + a * C::kXAtomBytes, &x_map, int((st * kAtoms + a) * 64),
                         int(batch0), x_arrived + slot);
          // (rows past n read as zero; the consumers give them scale 0)
          tma::load_2d(wring + slot * C::kWStageBytes, &w_map, int(st * C::kRowBytes), int(tile_row0),
                       x_arrived + slot);
        }
        next.advance(work);
        if (next.st == 0) {
          if (walker) next = StageCursor(work, (next_tile += work.walkers) * work.tile_stages);
          enter_tile();
        }
      }
    };
#pragma unroll
    for (int s = 0; s < S; ++s) issue(s, s);
    // Refill each slot once the multiplies that read it are retired.
    for (int i = 0, slot = 0; i + S < stages; ++i, slot = slot + 1 == S ? 0 : slot + 1) {
      barrier_sync(kEmpty + slot);
      issue(slot, i + S);
    }
    cp_async_commit();  // (this thread's copies land before it exits)
    cp_async_wait<0>();
    if (work.cluster_splits > 1) cluster_sync(), cluster_sync();  // (reduce_in_cluster's two)
    if (rest) wait_for_predecessor();
    return;
  }

  // Consumers: warpgroup c decodes and multiplies features 64 c + [0, 64) of the tile; warp w of it
  // rows 16 w + [0, 16), the lane rows g and g + 8 of those.
  registers_up<C::kConsumerRegisters>();
  const int consumer = threadIdx.x - C::kProducers, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int warp_row = consumer_warp_row(consumer);
  const float nested_offset = kNested ? *scales.nested_offset : 0.0f;
  int64_t row_elem[2];  // (of the tile being multiplied)
  bool row_valid[2];
  // (the lookups' byte permute: wgmma::decode_slice)
  const uint32_t pair_select = 0x5504u | (uint32_t(t) << 4);
  const uint32_t lane_x8 = uint32_t(lane) * 8;
  // Where the lane's rows' 16-byte weight pieces lie in a ring slot (weight_piece, worked out once).
  int piece[2][2 * kAtoms];
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int q = 0; q < 2 * kAtoms; ++q) piece[r][q] = weight_piece<C::kRowBytes>(warp_row + 8 * r + g, q);

  // Atom `atom` of stage st's A fragments (ring slot `slot`; grouped scales: the stage's first scale
  // of row 0 at stage_scales) for its 4 k16 steps.
  auto decode = [&](uint32_t (&a)[4][4], int slot, const uint8_t* stage_scales, int st, int atom) {
    uint32_t words[2][8];
    uint32_t scale_pair[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp_row + 8 * r + g;
      const uint8_t* const w = wring + slot * C::kWStageBytes;
      const uint4 lo = *reinterpret_cast<const uint4*>(w + piece[r][2 * atom]);
      const uint4 hi = *reinterpret_cast<const uint4*>(w + piece[r][2 * atom + 1]);
      words[r][0] = lo.x, words[r][1] = lo.y, words[r][2] = lo.z, words[r][3] = lo.w;
      words[r][4] = hi.x, words[r][5] = hi.y, words[r][6] = hi.z, words[r][7] = hi.w;
      const uint32_t* const sc = reinterpret_cast<const uint32_t*>(sring + slot * C::kSStageBytes) + row * kAtoms + atom;
      float scale;
      if constexpr (kGroupedScales && kNested) {
        // (stage_scales: the group's slot + 4 bytes per atom before this stage's first)
        const int before = (st * kAtoms) & 3;
        const uint8_t* const group = stage_scales - before * 4 + row * 16;
        scale = nested_scale(codes + 16, group[before + atom], *reinterpret_cast<const float*>(group + 4),
                             nested_offset);
      } else if constexpr (kGroupedScales) {
        scale = *reinterpret_cast<const float*>(stage_scales + row * 16 + atom * 4);
      } else {
        scale = __uint_as_float(sc[0]);
      }
      if constexpr (kNested && !kGroupedScales) {
        const int64_t block = (row_elem[r] + int64_t(st * kAtoms + atom) * 64) >> blocksize_log2;
        scale = nested_scale(codes + 16, (sc[0] >> (8 * (block & 3))) & 0xffu,
                             __uint_as_float(sc[C::kProducers * kAtoms]), nested_offset);
      }
      scale = row_valid[r] ? scale : 0.0f;
      scale_pair[r] = Pair<T>::of(scale, scale);
    }
    wgmma::decode_slice<T>(words, scale_pair, table, lane_x8, pair_select, a);
  };

  float acc[BN / 2];
  uint32_t frag[2][kAtoms][4][4];  // A fragments of two stages: one decoded while the other's multiplies run
  // The block's stage i (stage st of the tile; ring slot `slot`, fragments frag[buf]): decode it
  // while stage i - 1 multiplies, queue its multiplies, then retire stage i - 1's and free its slot.
  auto step = [&](int i, int st, int slot, const uint8_t* stage_scales, auto buf) {
    constexpr int b = decltype(buf)::value;
    if constexpr (!C::kScaleBoxes) tma::mbarrier_wait(w_arrived + slot, uint32_t(i / S) & 1);
    tma::mbarrier_wait(x_arrived + slot, uint32_t(i / S) & 1);
#pragma unroll
    for (int a = 0; a < kAtoms; ++a) decode(frag[b][a], slot, stage_scales, st, a);
    wgmma::fence();
    wgmma::pin(acc);
#pragma unroll
    for (int a = 0; a < kAtoms; ++a) {
      const uint64_t desc_b = wgmma::smem_desc_sw128(xring + slot * C::kXStageBytes + a * C::kXAtomBytes);
#pragma unroll
      for (int j = 0; j < 4; ++j) wgmma::Mma<BN, kBf16>::run(acc, frag[b][a][j], desc_b + 2 * j);
    }
    wgmma::commit();
    wgmma::pin(acc);
    wgmma::wait<1>();
    wgmma::pin(acc);
#pragma unroll
    for (int a = 0; a < kAtoms; ++a) wgmma::keep(frag[1 - b][a]);  // (stage i - 1's group is retired)
    if (i >= 1 && i - 1 + S < stages) barrier_arrive(kEmpty + (slot == 0 ? S - 1 : slot - 1));
  };
  // The block's stages tile by tile: the sums of a tile it takes whole go to y, those of a shared
  // one to the workspace. (A tile's stages come in pairs: see WsWork. A conditional second step
  // would merge two versions of the fragments and accumulators while a group is in flight, and
  // ptxas would serialize the multiplies.)
  int slot = 0;
  StageCursor at(work, stage_begin);
  // Grouped scales: the ring slot of the scale group being multiplied. A stage pair lies in one group
  // (4 atoms: two pairs of one-atom stages or one of two-atom ones), so a group opens where a pair
  // begins at a multiple of 4 atoms, or the block begins (its first pair may lie inside a group).
  int group_slot = 0;
  for (int i = 0; i < stages;) {
    int st = at.st;
    const int run = min(stages - i, int(work.tile_stages) - st);
    const int64_t tile = at.tile(work), batch0 = int64_t(at.batch_tile) * BN;
    const int64_t tile_row0 = int64_t(at.feature_tile) * C::kTileRows;
    if (walker)
      at = StageCursor(work, (tile + work.walkers) * work.tile_stages);
    else
      at.advance(work, run);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t f = tile_row0 + warp_row + 8 * r + g;
      row_valid[r] = f < n;
      row_elem[r] = (row_valid[r] ? f : n - 1) * k;
    }
#pragma unroll
    for (int j = 0; j < BN / 2; ++j) acc[j] = 0.0f;
    for (const int end = i + run; i < end; i += 2, st += 2) {
      if (kGroupedScales && (st * kAtoms) % 4 == 0 && i != 0)
        group_slot = group_slot + 1 == C::kScaleSlots ? 0 : group_slot + 1;
      // (the pair's first atom is 4-atom aligned for two-atom stages, else 0 or 2 into its group)
      const uint8_t* const pair_scales = gring + group_slot * C::kGroupBytes + ((st * kAtoms) & 3) * 4;
      step(i, st, slot, pair_scales, std::integral_constant<int, 0>());
      slot = slot + 1 == S ? 0 : slot + 1;
      step(i + 1, st + 1, slot, pair_scales + kAtoms * 4, std::integral_constant<int, 1>());
      slot = slot + 1 == S ? 0 : slot + 1;
    }
    wgmma::wait<0>();
    wgmma::pin(acc);
#pragma unroll
    for (int a = 0; a < kAtoms; ++a) wgmma::keep(frag[0][a]), wgmma::keep(frag[1][a]);
    constexpr int64_t kTileSums = C::kTileRows * BN;
    const int64_t shared_tile = tile - work.whole_tiles, shared_block = blockIdx.x - work.walkers;
    if (work.cluster_splits > 1)
      reduce_in_cluster<T, BN>(acc, xring, work.cluster_splits, consumer, tile_row0 + warp_row, batch0, m, n, bias, y);
    else if (walker && y_in_pieces)
      store_tile_rows<T, BN>(acc, staging + (consumer / 32) * (C::kStagingBytes / 8), tile_row0 + warp_row, batch0,
                             m, n, bias, y, lane);
    else if (walker)
      wgmma::store_accumulators(acc, tile_row0 + warp_row, batch0, m, n, bias, y, nullptr);
    else if (work.in_slots)
      put_tile_sums<false>(sums + (shared_block + shared_tile) * kTileSums, acc, consumer, batch0, m);
    else
      put_tile_sums<true>(sums + shared_tile * kTileSums, acc, consumer, batch0, m);
    if (rest) count_in(work, shared_tile, consumer);
  }
  if (rest) {
    // (a block's run spans at most two tiles: split_off_rest gives each tile >= splits blocks, so no
    // run is longer than a tile)
    const int64_t block = blockIdx.x, first = stage_begin / work.tile_stages - work.whole_tiles;
    const int64_t last = (stage_end - 1) / work.tile_stages - work.whole_tiles;
    for (int64_t s = first; s <= last; ++s) finish_share<T, BN>(sums, work, s, block, consumer, m, n, bias, y);
    wait_for_predecessor();
  }
}

// Writes the shared tiles' sums (WsWork) to y, with the bias: block (s, h) takes float4 h of shared
// tile s (the thread's batch rows 8 h + [0, 8): many small blocks, as the sums are read at L2 speed
// only with many loads in flight; one per tile took 20 us at batch 1024, (14336, 4096), and four
// float4s per thread 3.8 us at batch 17 against the y-ordered sums' 3.0), thread c the values
// consumer thread c held; in slots, those of the tile's blocks added in block order.
template <typename T, int BN>
__global__ void __launch_bounds__(256) finish_shared_tiles(const float* __restrict__ sums, WsWork work, int64_t m,
                                                           int64_t n, const T* __restrict__ bias, T* __restrict__ y) {
  constexpr int64_t kTileSums = 128 * BN;
  allow_successor();
  wait_for_predecessor();  // (the sums)
  const int64_t s = blockIdx.x, tile = work.whole_tiles + s;
  const int q = blockIdx.y;
  const int64_t batch0 = tile % work.batch_tiles * BN + 8 * q;  // (float4 q: batch rows 8 q + [0, 8))
  if (batch0 >= m) return;  // (block-uniform)
  int64_t first = s, last = s;
  if (work.in_slots) {
    work.blocks_of_tile(s, first, last);
    first += s, last += s;
  }
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t slot = first; slot <= last; ++slot) {
    const float4 v = __ldcg(reinterpret_cast<const float4*>(sums + slot * kTileSums) + q * 256 + threadIdx.x);
    acc[0] += v.x, acc[1] += v.y, acc[2] += v.z, acc[3] += v.w;
  }
  wgmma::store_accumulators(acc, tile / work.batch_tiles * 128 + consumer_warp_row(threadIdx.x), batch0, m, n, bias,
                            y, nullptr);
}

// Zeroes `count` float4s of sums (the atomics' tiles: WsWork), launched as a dependent: a memset
// between two kernels would end the chain of dependent launches (launch.cuh).
__global__ void __launch_bounds__(256) zero_sums(float4* __restrict__ sums, int64_t count) {
  allow_successor();
  wait_for_predecessor();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x)
    sums[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
}

#undef FP4_SM90_ONLY

// The activations [m, k] as a TMA tensor map: boxes of 64 columns x `box_rows` rows in the
// 128-byte swizzle (the layout wgmma's descriptor reads), rows past m read as zero.
CUtensorMap activation_map(const void* x, fp4_dtype dtype, int64_t m, int64_t k, int box_rows) {
  return tma::map_2d(x, dtype == FP4_FLOAT16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, k, m,
                     k * 2, 64, box_rows, CU_TENSOR_MAP_SWIZZLE_128B, "x");
}

// Atoms per stage of the batch tiles of <= 128 rows where k % 256 == 0 (BN 256: 1).
constexpr int kSmallAtoms = 2;

// Sharing a grid's last wave pays where the SM time it saves outweighs the sums' trips through the
// workspace: idle tiles x k (a tile's time grows with k) >= kShareGain x slots x BN (a slot's
// bytes grow with BN). Measured on the H100, bf16 nf4, us without / with sharing (idle tiles x k /
// slots x BN): (28672, 8192) batch 64 90.0 / 86.7 (22.9), 128 119.5 / 114.8 (11.4), 256 180.5 /
// 178.6 (5.7), 512 361.1 / 331.2 (13.9), 1024 678.7 / 708.9 (3.8); (14336, 4096) batch 512 101.5 /
// 104.1 (2.9), 1024 194.9 / 183.1 (7.0).
constexpr int64_t kShareGain = 5;

// How the blocks share the tiles of batch m (WsWork). One wave or less: whole tiles, k split as in
// the register-operand kernel where that fills the SMs (one_wave_splits; every block then shares).
// More than one wave: whole tiles, and where it pays (kShareGain) the tiles of the last wave
// (rounded to whole feature tiles, so the finish writes nothing a whole block wrote) are shared by
// one block per SM. FP4_CUDA_WS_SHARE=0 never shares the last wave, =1 always does (as does a single
// wave then; tests).
template <typename C>
WsWork ws_work(int64_t m, int64_t n, int64_t k, int device) {
  const int64_t batch_tiles = (m + C::kBatchRows - 1) / C::kBatchRows, feature_tiles = (n + C::kTileRows - 1) / C::kTileRows;
  const int64_t tiles = batch_tiles * feature_tiles, tile_stages = k / C::kStageK, capacity = sm_count(device);
  if (tiles * tile_stages >= (int64_t(1) << 31) || capacity >= 1024)
    fail(FP4_ERROR_NOT_SUPPORTED, "gemm_4bit: m x n x k (tiles x stages >= 2^31) or the device's SM count (>= 1024) "
                                  "too large for the warp-specialized kernel's 32-bit stage walk");
  WsWork work{tile_stages, batch_tiles, tiles, tiles, 0, 0, 0, false};
  const int force = switch_setting("FP4_CUDA_WS_SHARE");
  int64_t shared_from = tiles;  // (the first shared tile)
  if (tiles <= capacity && force != 1) {
    if (one_wave_splits(tiles, tile_stages, C::kStageK, capacity) > 1) shared_from = 0;
  } else if (tiles % capacity != 0) {
    const int64_t from = tiles / capacity * capacity / batch_tiles * batch_tiles;
    const int64_t idle = (tiles + capacity - 1) / capacity * capacity - tiles;
    const int64_t slots = tiles - from + std::min(capacity, (tiles - from) * tile_stages / 2);
    if (force == 1 || (force != 0 && idle * k >= kShareGain * slots * C::kBatchRows)) shared_from = from;
  }
  if (shared_from < tiles) {
    work.whole_tiles = shared_from;
    work.shared_pairs = (tiles - shared_from) * tile_stages / 2;
    const int64_t splits = shared_from == 0 ? one_wave_splits(tiles, tile_stages, C::kStageK, capacity) : 0;
    work.shared_blocks = std::min(work.shared_pairs, splits > 1 ? tiles * splits : capacity);
    // (past one wave: shared tiles <= tiles - capacity + batch_tiles - 1, blocks <= capacity)
    work.in_slots = work.shared_blocks + (tiles - shared_from) <= tiles + batch_tiles;
    // (each of a tile's splits >= 1 pair: one_wave_splits keeps >= 1024 columns each; launch()
    // checks that all the clusters fit at once; FP4_CUDA_WS_CLUSTER=0 for the other way)
    if (splits > 1 && splits <= 8 && work.shared_blocks == tiles * splits && switch_setting("FP4_CUDA_WS_CLUSTER") != 0)
      work.cluster_splits = int(splits);
  }
  // Whole tiles by at most one wave of walkers (FP4_CUDA_WS_WALK=0: a block per tile, for tests and A/Bs).
  work.walkers = switch_setting("FP4_CUDA_WS_WALK") == 0 ? work.whole_tiles : std::min(work.whole_tiles, capacity);
  work.by_tile_stages = FastDivisor::of(tile_stages), work.by_batch_tiles = FastDivisor::of(batch_tiles);
  work.by_shared_blocks = FastDivisor::of(std::max<int64_t>(work.shared_blocks, 1));
  return work;
}

// Splits a single wave whose clusters do not all fit at once (`fit` do) into kClusters, its first
// `fit` tiles in clusters as before, and kRest (returned), the other tiles shared by as many blocks
// as the clusters leave SMs (WsWork). Returns a work of part kAll where the split does not pay:
// without dependent launch kRest would run after the clusters; it must have blocks enough (SMs and
// workspace slots) that none takes more stages than a cluster's block; and a cluster block's work
// (k / splits x BN) must outweigh kRest's later start and its wait for its tiles' blocks: more than
// kRestMinWork at 4 splits, twice that at 8 (clusters of 8 barely beat the workspace on their own).
// H100, bf16 nf4, same process, us, through the workspace / split (FP4_CUDA_WS_REST=0,1; the work
// in 2^16): (4096, 14336) batch 17 (1.75) 22.7 / 21.0, 64 25.5 / 23.2, 128 33.3 / 30.4, 256 54.5 /
// 47.2; (4096, 11008) 17 (1.3) 19.7 / 18.6, 256 45.2 / 38.3; (4096, 4096) 17 (0.5) 11.9 / 12.3, 64 (1)
// 13.5 / 14.2, 128 (2) 17.9 / 17.0, 256 27.5 / 22.4; 8 splits: (2048, 8192) 64 (1) 13.5 / 14.3, 128 (2)
// 17.2 / 17.7, 256 (4) 26.5 / 22.4; (2048, 14336) 64 (1.75) 17.2 / 16.9, 128 21.8 / 20.4, 256 34.0 / 28.4.
// FP4_CUDA_WS_REST=0 never splits (the sums then go through the workspace, as before), =1 always
// does where it can (tests).
constexpr int64_t kRestMinWork = int64_t(1) << 16;
template <typename C>
WsWork split_off_rest(WsWork& clusters, int64_t fit, int64_t capacity, bool dependent, float* workspace) {
  WsWork rest = clusters;
  rest.part = WsWork::kAll;
  const int64_t splits = clusters.cluster_splits, rest_tiles = clusters.tiles - fit;
  const int setting = switch_setting("FP4_CUDA_WS_REST");
  const bool pays = clusters.tile_stages * C::kStageK / splits * C::kBatchRows > (splits > 4 ? 2 : 1) * kRestMinWork;
  if (fit < 1 || !dependent || setting == 0 || (!pays && setting != 1)) return rest;
  rest.whole_tiles = fit, rest.walkers = 0, rest.cluster_splits = 0, rest.in_slots = true;
  rest.shared_pairs = rest_tiles * clusters.tile_stages / 2;
  // (slots j + s for block j and tile s, then one tile of sums for the counters: all in the
  // workspace's tiles + batch_tiles)
  rest.shared_blocks = std::min({rest.shared_pairs, capacity - fit * splits,
                                 clusters.tiles + clusters.batch_tiles - rest_tiles - 1});
  if (rest.shared_blocks < rest_tiles * splits) return rest;
  rest.part = WsWork::kRest;
  rest.rest_tiles = int(rest_tiles);
  rest.by_shared_blocks = FastDivisor::of(rest.shared_blocks);
  rest.counters = reinterpret_cast<unsigned*>(workspace + (rest.shared_blocks + rest_tiles) * C::kTileRows * C::kBatchRows);
  clusters.part = WsWork::kClusters;
  clusters.tiles = fit, clusters.shared_pairs = fit * clusters.tile_stages / 2, clusters.shared_blocks = fit * splits;
  clusters.by_shared_blocks = FastDivisor::of(clusters.shared_blocks);
  clusters.rest_tiles = rest.rest_tiles, clusters.counters = rest.counters;
  return rest;
}

template <typename T, int BN, int kAtoms, bool kNested, bool kGroupedScales>
void launch(const fp4_exec& exec, const T* x, int64_t m, int64_t k, const uint8_t* packed, const fp4_scales& scales,
            int64_t n, int blocksize_log2, const Code16& code, const T* bias, T* y, float* workspace) {
  using C = WsConfig<BN, kAtoms, kGroupedScales, kNested>;
  constexpr auto kernel = gemm_wgmma_ws_kernel<T, BN, kAtoms, kNested, kGroupedScales>;
  const int device = exec.device_index;
  allow_dynamic_smem<kernel>(device, C::kSmemBytes);
  // (the kernel takes a tile's stages in pairs, one per fragment buffer)
  if (k % (2 * C::kStageK) != 0) fail(FP4_ERROR_INTERNAL, "gemm_4bit warp-specialized kernel: k % (2 stages) != 0");
  WsWork work = ws_work<C>(m, n, k, device), rest{};
  // Clusters where all of them run at once (the H100 holds 30 of 4 blocks of this kernel, 15 of 8),
  // else those that do beside a kernel for the rest (split_off_rest), else none: the sums go through
  // the workspace. Fewer splits, so that the clusters fit, lost more than the workspace costs
  // ((4096, 14336) batch 64: 3 splits in clusters 27.3 us, 4 through the workspace 24.2).
  // FP4_CUDA_WS_CLUSTERS_FIT=d: as if at most d clusters fit (tests).
  if (work.cluster_splits > 1) {
    int64_t fit = max_active_clusters<kernel>(device, unsigned(work.cluster_splits), C::kThreads, C::kSmemBytes);
    const int fit_cap = switch_setting("FP4_CUDA_WS_CLUSTERS_FIT");
    if (fit_cap >= 0) fit = std::min<int64_t>(fit, fit_cap);
    if (fit < work.tiles) {
      rest = split_off_rest<C>(work, fit, sm_count(device), dependent_launch_enabled(device), workspace);
      if (rest.part != WsWork::kRest) work.cluster_splits = 0;
    }
  }
  const int cluster = std::max(work.cluster_splits, 1);
  const CUtensorMap x_map = activation_map(x, std::is_same_v<T, __half> ? FP4_FLOAT16 : FP4_BFLOAT16, m, k, BN);
  // (boxes of a stage's kRowBytes x the tile's rows in the swizzle of that span: weight_piece; every
  // GEMM's packed is 16-byte aligned, api.cpp)
  const CUtensorMap w_map =
      tma::map_2d(packed, CU_TENSOR_MAP_DATA_TYPE_UINT8, k / 2, n, k / 2, C::kRowBytes, C::kTileRows,
                  C::kRowBytes == 64 ? CU_TENSOR_MAP_SWIZZLE_64B : CU_TENSOR_MAP_SWIZZLE_32B, "packed");
  // kScaleBoxes: boxes of 4 scales (16 bytes) x the tile's rows (grouped scales are 16-byte aligned,
  // rows k / 16 bytes apart, k % 256 == 0); otherwise unused.
  const CUtensorMap scale_map =
      C::kScaleBoxes ? tma::map_2d(scales.absmax, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, k / 64, n, k / 16, 4, C::kTileRows,
                                   CU_TENSOR_MAP_SWIZZLE_NONE, "absmax")
                     : w_map;
  cudaStream_t stream = stream_of(exec);
  // (tiles + batch_tiles tiles of sums fit the workspace: gemm_4bit_wgmma_ws_sums_bytes)
  const int64_t shared_tiles = cluster > 1 ? 0 : work.shared_tiles();
  if (shared_tiles > 0 && !work.in_slots) {
    const int64_t count = shared_tiles * C::kTileRows * BN / 4;
    launch_dependent(device, zero_sums, dim3(unsigned(std::min<int64_t>((count + 255) / 256, 4 * sm_count(device)))),
                     256, 0, stream, "gemm_4bit warp-specialized zeroing kernel", reinterpret_cast<float4*>(workspace),
                     count);
  }
  // y in 16-byte pieces where they are aligned (store_tile_rows); FP4_CUDA_WS_PIECES=0 forces the
  // element stores (tests: both give the same bits).
  const bool y_in_pieces =
      n % 8 == 0 && reinterpret_cast<uintptr_t>(y) % 16 == 0 && switch_setting("FP4_CUDA_WS_PIECES") != 0;
  launch_dependent_clusters(device, unsigned(cluster), kernel, dim3(unsigned(work.blocks())), C::kThreads,
                            C::kSmemBytes, stream, "gemm_4bit warp-specialized wgmma kernel", x_map, w_map, scale_map,
                            m, k, packed, scales, nested_shift(scales), n, blocksize_log2, code, work, bias, y,
                            y_in_pieces, workspace);
  if (rest.part == WsWork::kRest)
    launch_dependent(device, kernel, dim3(unsigned(rest.blocks())), C::kThreads, C::kSmemBytes, stream,
                     "gemm_4bit warp-specialized wgmma kernel (the tiles beside the clusters)", x_map, w_map,
                     scale_map, m, k, packed, scales, nested_shift(scales), n, blocksize_log2, code, rest, bias, y,
                     y_in_pieces, workspace);
  if (shared_tiles > 0)
    launch_dependent(device, finish_shared_tiles<T, BN>, dim3(unsigned(shared_tiles), BN / 8), 256, 0, stream,
                     "gemm_4bit warp-specialized finish kernel", workspace, work, m, n, bias, y);
}

}  // namespace

bool gemm_4bit_wgmma_ws_takes_small_batch(int64_t k) { return k % (2 * WsConfig<64, kSmallAtoms>::kStageK) == 0; }

// Batch 9-16 (a 16-row batch tile) against the stream kernel (gemm_stream.cu), by their times measured
// on the H100 (bf16 nf4, same process; `tools/bench_env_ab.py FP4_CUDA_WS_BATCH16=0,1`; every shape in
// docs/perf-log.md, sections "Batch 9-16 on the warp-specialized kernel's 16-row batch tile" and item 7
// of the one after it). Whole tiles or 2-way cluster splits: this kernel ~3 us + 0.5 us per stage of
// its busiest block (128 features x 128 columns; decode-bound, a 16- or 32-row batch tile takes as
// long) + ~2 us for the split, against the stream kernel's ~8.5 us (its finish kernel, which at batch
// 9-16 runs only after it) + its per-SM share of the weights at 35.6K weights per us; taken where 3%
// faster ((14336, 4096) batch 16 22.0 -> 18.8 us), not past one wave of tiles ((28672, 4096) 35.9 /
// 41.1). Splits of 3-8 ways cost 1.8-4.5 us, no single number: taken where a block's share is at most
// 11 stages ((3584, 4096), 8 stages, 12.7 -> 9.1; (4096, 4096) 12.3 -> 11.4), not from 12 ((4096,
// 6144) a tie, (4096, 11008) 17.9 / 19.1). Below 2^23 weights the stream kernel's fixed costs are
// lower ((1024, 4096) 6.1 / 7.9); batch <= 8 stays with it everywhere ((14336, 4096) 8: 18.0 / 19.0).
bool gemm_4bit_wgmma_ws_takes_batch_16(int device, int64_t m, int64_t n, int64_t k) {
  constexpr double kMostStagesSplit = 11.0;  // (3-8 splits: a block's stages at most)
  if (m > 16 || !gemm_4bit_wgmma_ws_takes_small_batch(k)) return false;
  const int setting = switch_setting("FP4_CUDA_WS_BATCH16");
  if (setting >= 0) return setting != 0;
  using C = WsConfig<16, kSmallAtoms, true>;
  const int64_t tiles = (n + C::kTileRows - 1) / C::kTileRows, capacity = sm_count(device);
  if (m < 9 || tiles > capacity || n * k < (int64_t(1) << 23)) return false;
  const int64_t splits = one_wave_splits(tiles, k / C::kStageK, C::kStageK, capacity);
  if (splits > 8) return false;
  if (splits > 2) return double(k / C::kStageK) / double(splits) <= kMostStagesSplit;
  const double this_us = 3.0 + 0.5 * double(k / C::kStageK / splits) + (splits > 1 ? 2.0 : 0.0);
  const double stream_us = 8.5 + double(n) * double(k) / (double(capacity) * 35.6e3);
  return this_us < 0.97 * stream_us;
}

size_t gemm_4bit_wgmma_ws_sums_bytes(int64_t m, int64_t n) {
  // (the batch tile: gemm_4bit_wgmma_ws)
  const int64_t bn = m <= 16 ? 16 : m <= 32 ? 32 : m <= 64 ? 64 : m <= 128 ? 128 : 256;
  // (all the tiles and one more feature tile: WsWork's slots)
  return size_t((m + bn - 1) / bn * bn) * size_t((n + 127) / 128 * 128 + 128) * sizeof(float);
}

void gemm_4bit_wgmma_ws(const fp4_exec& exec, const Code16& code, fp4_dtype dtype, const void* x, int64_t m,
                        int64_t k, const uint8_t* packed, const fp4_scales& scales, int64_t n, int64_t blocksize,
                        const void* bias, void* y, float* workspace) {
  const int log2 = log2_of(blocksize);
  // The batch tile: 16 rows to batch 16, 32 to 32, 64 to 64, 128 to 128, else 256. Tiles of <= 128
  // rows take two atoms per stage where k % 256 == 0 (batch <= 64 comes here only then), the others one.
  // Blocksize 64 with k % 256 == 0: grouped scale copies, of plain absmax on 16-byte aligned
  // addresses or of nested absmax whose nested blocks hold whole groups of 4.
  const bool grouped = blocksize == 64 && k % 256 == 0 &&
                       (scales.nested_codes != nullptr ? scales.nested_blocksize % 4 == 0
                                                       : reinterpret_cast<uintptr_t>(scales.absmax) % 16 == 0);
  auto run = [&](auto* tag, auto bn, auto nested, auto atoms) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int kBn = decltype(bn)::value, kA = decltype(atoms)::value;
    constexpr bool kN = decltype(nested)::value;
    const T* xt = static_cast<const T*>(x);
    const T* bt = static_cast<const T*>(bias);
    T* yt = static_cast<T*>(y);
    if (grouped)
      launch<T, kBn, kA, kN, true>(exec, xt, m, k, packed, scales, n, log2, code, bt, yt, workspace);
    else
      launch<T, kBn, kA, kN, false>(exec, xt, m, k, packed, scales, n, log2, code, bt, yt, workspace);
  };
  const auto one = std::integral_constant<int, 1>();
  const auto two = std::integral_constant<int, kSmallAtoms>();
  // (scales are copied one by one or grouped: dispatch_variant's `paired` unused)
  auto with_two = [&](auto* tag, auto bn, auto nested, auto) { run(tag, bn, nested, two); };
  auto with_one = [&](auto* tag, auto bn, auto nested, auto) { run(tag, bn, nested, one); };
  if (m <= 16)
    dispatch_variant<16, 16>(dtype, m, 16, scales, blocksize, with_two, false);
  else if (m <= 64)
    dispatch_variant<32, 64>(dtype, m, 32, scales, blocksize, with_two, false);
  else if (m <= 128 && k % (2 * WsConfig<128, kSmallAtoms>::kStageK) == 0)
    dispatch_variant<128, 128>(dtype, m, 128, scales, blocksize, with_two, false);
  else
    dispatch_variant<128, 256>(dtype, m, 128, scales, blocksize, with_one, false);
}

}  // namespace fp4::cuda
