// The 4-bit linear layer on Hopper (sm_90a) for batch > 16 (gemm_wgmma.cu's kernel takes batch
// 17-64 only where k % 256 != 0): a warp-specialized wgmma GEMM, read straight from the
// bitsandbytes layout. As everywhere the product is computed transposed, y^T = W x^T. One producer
// warpgroup only copies: the 4-bit weights and the activations by TMA (one box of weights per stage
// and one of activations per 64 columns), the scales by cp.async (a row's 4 blocksize-64 scales at
// once where they allow: WsConfig). Two consumer warpgroups decode the weights into A fragments (one
// pair-table load per byte, as in gemm_wgmma.cu) and multiply (m64nBNk16, A from registers, B from
// shared memory), decoding stage i while stage i - 1's multiplies run. Measured before: the
// producers decoding into a tile in shared memory that wgmma read from there (both operands in
// shared memory) kept the tensor cores at ~60% — the decode's table loads and tile stores competed
// with the multiplies' operand reads.
//
// A block covers 128 output features x BN batch rows (256 past batch 128, 128 for 65-128, 64 for
// 33-64, 32 for 17-32), one block per SM. A stage is kAtoms slices of 64 columns of k (one swizzle
// atom of activations each): 2 for the tiles of batch <= 128 (k % 256 == 0), 1 for BN 256. Below
// batch 256 shared memory bounds a stage, not the multiplies: ncu at batch 64 counted each 16-byte
// cp.async of weights (rows 2-4 KB apart) as its own wavefront, 45% of the block's, which the TMA
// box replaced, and each scale copy too (16%: now 4 atoms per copy); two atoms halve the per-stage
// waits and give the box 64-byte rows (perf log).
// The producers' scale copies complete the slot's first mbarrier (cp.async arrivals), the TMA boxes
// a second one; the consumers wait on both (each warpgroup on its own: no barrier couples the
// two). EMPTY[slot], a named barrier, tells the producers that the multiplies that read a slot are
// retired. The producers give most of their registers to the consumers (setmaxnreg): BN / 2
// accumulators and two stages of fragments per thread. k is split across blockIdx.z only to give
// most SMs a block (partial sums meet in the fp32 workspace). Measurements and what was tried:
// docs/perf-log.md.
#include "build_config.h"
#include "kernels.hpp"
#include "mma_4bit.cuh"
#include "tma.cuh"
#include "wgmma.cuh"


#include <type_traits>

namespace fp4::cuda {
namespace {

// BN 256 for batch > 128, BN 128 for batch 65-128 (a half-empty 256-row tile would multiply zeros),
// 64 and 32 below; kAtoms 64-column slices of k per stage (2 fit a stage beside BN <= 128 only);
// kGroupedScales: see the scale ring below.
template <int BN, int kAtoms, bool kGroupedScales = false>
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
  static constexpr size_t kFixedBytes = 1024 + kTableBytes + kCodeBytes;  // (+1024: the rings are aligned by hand)
  static constexpr size_t kPerStage = kXStageBytes + kWStageBytes + kSStageBytes + 2 * sizeof(uint64_t);
  static constexpr size_t kBudget = 227 * 1024;  // (one block per SM)
  // Grouped scales (plain blocksize-64 absmax, 16-byte aligned, k % 256 == 0): a row's 4 scales of 4
  // consecutive atoms come by one 16-byte copy, issued with the group's first stage, into a ring of
  // kScaleSlots groups of their own: each copy is a shared-memory wavefront of its own (the rows lie
  // 4 KB apart), so 4 atoms per copy instead of 1 (ncu: the scale copies were 16% of a block's
  // wavefronts at batch 64). A slot is refilled only after the stages of the group kScaleSlots
  // before it are retired: kScaleSlots groups span kStages + kGroupStages stages.
  // (The per-stage scale words, unused then, stay in the layout: freeing them would fit BN 32 an
  // 11th stage, not measured.)
  static constexpr int kGroupStages = 4 / kAtoms;
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
  static_assert(1 + kStages <= 16, "named barriers: 0 for __syncthreads, EMPTY per slot");
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

template <typename T, int BN, int kAtoms, bool kNested, bool kGroupedScales>
__global__ void __launch_bounds__(WsConfig<BN, kAtoms, kGroupedScales>::kThreads, 1)
    gemm_wgmma_ws_kernel(const __grid_constant__ CUtensorMap x_map, const __grid_constant__ CUtensorMap w_map,
                         int64_t m, int64_t k,
                         const uint8_t* __restrict__ packed, fp4_scales scales, int nested_log2, int64_t n,
                         int blocksize_log2, Code16 code, int64_t stages_per_split, const T* __restrict__ bias,
                         T* __restrict__ y, float* __restrict__ partial) {
  using C = WsConfig<BN, kAtoms, kGroupedScales>;
  constexpr int S = C::kStages;
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  extern __shared__ __align__(16) uint8_t smem_raw[];
  // (an offset from smem_raw, not an integer cast, keeps the pointers in the shared address space)
  uint8_t* const xring = smem_raw + ((1024 - (uint32_t(__cvta_generic_to_shared(smem_raw)) & 1023)) & 1023);
  uint8_t* const wring = xring + S * C::kXStageBytes;
  uint8_t* const sring = wring + S * C::kWStageBytes;
  uint8_t* const gring = sring + S * C::kSStageBytes;  // [scale slot][row][4 atoms] (kGroupedScales)
  uint8_t* const table = gring + C::kScaleSlots * C::kGroupBytes;
  float* const codes = reinterpret_cast<float*>(table + C::kTableBytes);
  uint64_t* const x_arrived = reinterpret_cast<uint64_t*>(codes + kCodeBytes / sizeof(float));  // [slot]
  uint64_t* const w_arrived = x_arrived + S;                                                      // [slot]
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) tma::mbarrier_init(x_arrived + s, 1), tma::mbarrier_init(w_arrived + s, C::kProducers);
    tma::fence_barrier_init();
  }
  build_pair_table<T, 128, kNested>(table, codes, code, scales);  // (its barrier orders the inits)
  __syncthreads();  // the pair table

  const int64_t batch0 = int64_t(blockIdx.x) * BN;
  const int64_t tile_row0 = int64_t(blockIdx.y) * C::kTileRows;
  const int64_t stage_begin = int64_t(blockIdx.z) * stages_per_split;
  const int64_t stage_end = min(k / C::kStageK, stage_begin + stages_per_split);
  if (stage_begin >= stage_end) return;  // (block-uniform)
  const int stages = int(stage_end - stage_begin);
  constexpr int kEmpty = 1;  // named barrier id of slot 0's EMPTY

  if (threadIdx.x < C::kProducers) {
    registers_down<C::kProducerRegisters>();
    // Thread p copies the scales of weight row p of the tile (rows past n read row n - 1's; the
    // consumers give them scale 0); thread 0 also the stage's weight box and activation tiles, by TMA.
    const int p = threadIdx.x;
    const int64_t row_elem = min(tile_row0 + p, n - 1) * k;
    // Request stage st into ring slot `slot` (nothing past the end).
    auto issue = [&](int slot, int64_t st) {
      if (st < stage_end) {
        if constexpr (kGroupedScales) {
          const int atom0 = int(st) * kAtoms;
          if (atom0 % 4 == 0 || st == stage_begin)  // (a split may begin inside a group)
            cp_async16(gring + (atom0 / 4 % C::kScaleSlots) * C::kGroupBytes + p * 16,
                       scales.absmax + (row_elem >> 6) + (atom0 & ~3));
        } else {
          // Scale words of row p, atom a at [p][a] (nested group absmax kProducers * kAtoms words on).
          uint32_t* const scale_dst = reinterpret_cast<uint32_t*>(sring + slot * C::kSStageBytes) + p * kAtoms;
#pragma unroll
          for (int a = 0; a < kAtoms; ++a) {
            const int64_t block = (row_elem + (st * kAtoms + a) * 64) >> blocksize_log2;
            if constexpr (kNested) {
              cp_async4(scale_dst + a, scales.nested_codes + (block & ~int64_t(3)));  // (gemm_4bit_wgmma_supports)
              cp_async4(scale_dst + C::kProducers * kAtoms + a,
                        scales.absmax + (nested_log2 >= 0 ? block >> nested_log2 : block / scales.nested_blocksize));
            } else {
              cp_async4(scale_dst + a, scales.absmax + block);
            }
          }
        }
        tma::mbarrier_arrive_on_copies(w_arrived + slot);
        if (p == 0) {
          tma::mbarrier_expect(x_arrived + slot, uint32_t(C::kXStageBytes + C::kWStageBytes));
#pragma unroll
          for (int a = 0; a < kAtoms; ++a)
            tma::load_2d(xring + slot * C::kXStageBytes + a * C::kXAtomBytes, &x_map, int((st * kAtoms + a) * 64),
                         int(batch0), x_arrived + slot);
          // (rows past n read as zero; the consumers give them scale 0)
          tma::load_2d(wring + slot * C::kWStageBytes, &w_map, int(st * C::kRowBytes), int(tile_row0),
                       x_arrived + slot);
        }
      }
    };
#pragma unroll
    for (int s = 0; s < S; ++s) issue(s, stage_begin + s);
    // Refill each slot once the multiplies that read it are retired.
    for (int i = 0, slot = 0; i + S < stages; ++i, slot = slot + 1 == S ? 0 : slot + 1) {
      barrier_sync(kEmpty + slot);
      issue(slot, stage_begin + i + S);
    }
    cp_async_commit();  // (this thread's copies land before it exits)
    cp_async_wait<0>();
    return;
  }

  // Consumers: warpgroup c decodes and multiplies features 64 c + [0, 64) of the tile; warp w of it
  // rows 16 w + [0, 16), the lane rows g and g + 8 of those.
  registers_up<C::kConsumerRegisters>();
  const int c = threadIdx.x / 128 - 1, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int warp_row = 64 * c + 16 * ((threadIdx.x / 32) % 4);
  const float nested_offset = kNested ? *scales.nested_offset : 0.0f;
  int64_t row_elem[2];
  bool row_valid[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t f = tile_row0 + warp_row + 8 * r + g;
    row_valid[r] = f < n;
    row_elem[r] = (row_valid[r] ? f : n - 1) * k;
  }
  // (the lookups' byte permute: wgmma::decode_slice)
  const uint32_t pair_select = 0x5504u | (uint32_t(t) << 4);
  const uint32_t lane_x8 = uint32_t(lane) * 8;

  // Atom `atom` of stage st's A fragments (ring slot `slot`) for its 4 k16 steps.
  auto decode = [&](uint32_t (&a)[4][4], int slot, int64_t st, int atom) {
    uint32_t words[2][8];
    uint32_t scale_pair[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp_row + 8 * r + g;
      const uint8_t* const w = wring + slot * C::kWStageBytes;
      const uint4 lo = *reinterpret_cast<const uint4*>(w + weight_piece<C::kRowBytes>(row, 2 * atom));
      const uint4 hi = *reinterpret_cast<const uint4*>(w + weight_piece<C::kRowBytes>(row, 2 * atom + 1));
      words[r][0] = lo.x, words[r][1] = lo.y, words[r][2] = lo.z, words[r][3] = lo.w;
      words[r][4] = hi.x, words[r][5] = hi.y, words[r][6] = hi.z, words[r][7] = hi.w;
      const uint32_t* const sc = reinterpret_cast<const uint32_t*>(sring + slot * C::kSStageBytes) + row * kAtoms + atom;
      float scale;
      if constexpr (kGroupedScales) {
        const int a = int(st) * kAtoms + atom;
        scale = *reinterpret_cast<const float*>(gring + (a / 4 % C::kScaleSlots) * C::kGroupBytes + row * 16 + (a % 4) * 4);
      } else {
        scale = __uint_as_float(sc[0]);
      }
      if constexpr (kNested) {
        const int64_t block = (row_elem[r] + (st * kAtoms + atom) * 64) >> blocksize_log2;
        scale = nested_scale(codes + 16, (sc[0] >> (8 * (block & 3))) & 0xffu,
                             __uint_as_float(sc[C::kProducers * kAtoms]), nested_offset);
      }
      scale = row_valid[r] ? scale : 0.0f;
      scale_pair[r] = Pair<T>::of(scale, scale);
    }
    wgmma::decode_slice<T>(words, scale_pair, table, lane_x8, pair_select, a);
  };

  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
  uint32_t frag[2][kAtoms][4][4];  // A fragments of two stages: one decoded while the other's multiplies run
  // Stage i (ring slot `slot`, fragments frag[buf]): decode it while stage i - 1 multiplies, queue
  // its multiplies, then retire stage i - 1's and free its slot.
  auto step = [&](int i, int slot, auto buf) {
    constexpr int b = decltype(buf)::value;
    tma::mbarrier_wait(w_arrived + slot, uint32_t(i / S) & 1);
    tma::mbarrier_wait(x_arrived + slot, uint32_t(i / S) & 1);
#pragma unroll
    for (int a = 0; a < kAtoms; ++a) decode(frag[b][a], slot, stage_begin + i, a);
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
  // (stages is even: see launch. A conditional second step would merge two versions of the
  // fragments and accumulators while a group is in flight, and ptxas would serialize the multiplies.)
  int slot = 0;
  for (int i = 0; i < stages; i += 2) {
    step(i, slot, std::integral_constant<int, 0>());
    slot = slot + 1 == S ? 0 : slot + 1;
    step(i + 1, slot, std::integral_constant<int, 1>());
    slot = slot + 1 == S ? 0 : slot + 1;
  }
  wgmma::wait<0>();
  wgmma::pin(acc);
#pragma unroll
  for (int a = 0; a < kAtoms; ++a) wgmma::keep(frag[0][a]), wgmma::keep(frag[1][a]);

  wgmma::store_accumulators(acc, tile_row0 + warp_row, batch0, m, n, bias, y, partial);
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

// The grid for batch m (batch tiles vary fastest: the blocks that share a weight tile run together
// and read it once). The kernel takes its stages in pairs (one per fragment buffer), so every
// split's count is even; k % (2 * C::kStageK) == 0 (checked by the callers).
template <typename C>
dim3 ws_grid(int64_t m, int64_t n, int64_t k, int device, int64_t& per_split) {
  const int64_t stages = k / C::kStageK;
  dim3 grid = one_block_per_sm_grid(m, n, C::kBatchRows, C::kTileRows, stages, C::kStageK, device, per_split);
  per_split += per_split % 2;
  grid.z = unsigned((stages + per_split - 1) / per_split);
  return grid;
}

template <typename T, int BN, int kAtoms, bool kNested, bool kGroupedScales>
void launch(const fp4_exec& exec, const T* x, int64_t m, int64_t k, const uint8_t* packed, const fp4_scales& scales,
            int64_t n, int blocksize_log2, const Code16& code, const T* bias, T* y, float* workspace) {
  using C = WsConfig<BN, kAtoms, kGroupedScales>;
  constexpr auto kernel = gemm_wgmma_ws_kernel<T, BN, kAtoms, kNested, kGroupedScales>;
  allow_dynamic_smem<kernel>(exec.device_index, C::kSmemBytes);
  if (k % (2 * C::kStageK) != 0) fail(FP4_ERROR_INTERNAL, "gemm_4bit warp-specialized kernel: k % (2 stages) != 0");
  int64_t per_split = 0;
  const dim3 grid = ws_grid<C>(m, n, k, exec.device_index, per_split);
  const CUtensorMap x_map = activation_map(x, std::is_same_v<T, __half> ? FP4_FLOAT16 : FP4_BFLOAT16, m, k, BN);
  // (boxes of a stage's kRowBytes x the tile's rows in the swizzle of that span: weight_piece; every
  // GEMM's packed is 16-byte aligned, api.cpp)
  const CUtensorMap w_map =
      tma::map_2d(packed, CU_TENSOR_MAP_DATA_TYPE_UINT8, k / 2, n, k / 2, C::kRowBytes, C::kTileRows,
                  C::kRowBytes == 64 ? CU_TENSOR_MAP_SWIZZLE_64B : CU_TENSOR_MAP_SWIZZLE_32B, "packed");
  cudaStream_t stream = stream_of(exec);
  with_partial_sums(grid.z > 1, workspace, m, n, bias, y, stream, [&](float* partial) {
    kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(x_map, w_map, m, k, packed, scales, nested_shift(scales), n,
                                                         blocksize_log2, code, per_split, bias, y, partial);
    check_launch("gemm_4bit warp-specialized wgmma kernel");
  });
}

}  // namespace

bool gemm_4bit_wgmma_ws_takes_small_batch(int64_t k) { return k % (2 * WsConfig<64, kSmallAtoms>::kStageK) == 0; }

void gemm_4bit_wgmma_ws(const fp4_exec& exec, const Code16& code, fp4_dtype dtype, const void* x, int64_t m,
                        int64_t k, const uint8_t* packed, const fp4_scales& scales, int64_t n, int64_t blocksize,
                        const void* bias, void* y, float* workspace) {
  const int log2 = log2_of(blocksize);
  // The batch tile: 32 rows to batch 32, 64 to 64, 128 to 128, else 256. Tiles of <= 128 rows take
  // two atoms per stage where k % 256 == 0 (batch <= 64 comes here only then), the others one.
  // Plain blocksize-64 absmax on 16-byte aligned addresses with k % 256 == 0: grouped scale copies.
  const bool grouped = scales.nested_codes == nullptr && blocksize == 64 && k % 256 == 0 &&
                       reinterpret_cast<uintptr_t>(scales.absmax) % 16 == 0;
  auto run = [&](auto* tag, auto bn, auto nested, auto atoms) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int kBn = decltype(bn)::value, kA = decltype(atoms)::value;
    constexpr bool kN = decltype(nested)::value;
    const T* xt = static_cast<const T*>(x);
    const T* bt = static_cast<const T*>(bias);
    T* yt = static_cast<T*>(y);
    if (!kN && grouped)
      launch<T, kBn, kA, false, true>(exec, xt, m, k, packed, scales, n, log2, code, bt, yt, workspace);
    else
      launch<T, kBn, kA, kN, false>(exec, xt, m, k, packed, scales, n, log2, code, bt, yt, workspace);
  };
  const auto one = std::integral_constant<int, 1>();
  const auto two = std::integral_constant<int, kSmallAtoms>();
  // (scales are copied one by one or grouped: dispatch_variant's `paired` unused)
  auto with_two = [&](auto* tag, auto bn, auto nested, auto) { run(tag, bn, nested, two); };
  auto with_one = [&](auto* tag, auto bn, auto nested, auto) { run(tag, bn, nested, one); };
  if (m <= 64)
    dispatch_variant<32, 64>(dtype, m, 32, scales, blocksize, with_two, false);
  else if (m <= 128 && k % (2 * WsConfig<128, kSmallAtoms>::kStageK) == 0)
    dispatch_variant<128, 128>(dtype, m, 128, scales, blocksize, with_two, false);
  else
    dispatch_variant<128, 256>(dtype, m, 128, scales, blocksize, with_one, false);
}

}  // namespace fp4::cuda
