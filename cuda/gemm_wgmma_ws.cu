// The 4-bit linear layer on Hopper (sm_90a) for batches past 128: a warp-specialized wgmma GEMM,
// read straight from the bitsandbytes layout. As everywhere the product is computed transposed,
// y^T = W x^T, but here both operands come from shared memory: one producer warpgroup copies the
// 4-bit weights and their scales (cp.async) and the activations (one TMA copy per stage), and
// decodes the weights into a bf16/fp16 tile in wgmma's 128-byte swizzle, while two consumer
// warpgroups only multiply (m64n256k16 steps, one m64 tile of output features each). The decode
// thus runs beside the tensor cores instead of between their instructions (gemm_wgmma.cu decodes
// in the multiplying warps: at batch 256 its tensor cores sat idle more than half the time).
//
// A block covers 128 output features x 256 batch rows, one block per SM, 64 columns of k per
// stage. Producer thread p owns feature row p: it copies that row's 32 bytes and its scale per
// stage, so its decode waits on its own copies only. Stage hand-off uses named barriers: FULL[slot]
// (producers arrive once the stage's copies have landed and its decoded tile is stored; consumers
// wait, then wait for the slot's TMA mbarrier) and EMPTY[slot] (consumers arrive once the
// multiplies that read the slot are retired; producers wait before refilling it). k is split
// across blockIdx.z only to give most SMs a block (partial sums meet in the fp32 workspace).
// Measurements and what was tried: docs/perf-log.md.
#include "build_config.h"
#include "kernels.hpp"
#include "mma_4bit.cuh"
#include "wgmma.cuh"

#include <cuda.h>  // (CUtensorMap only: the encoder is reached through the runtime's entry-point query)
#include <cudaTypedefs.h>

#include <type_traits>

namespace fp4::cuda {
namespace {

struct WsConfig {
  static constexpr int kBatchRows = 256;  // batch rows per block (the m64n256k16 multiply's N)
  static constexpr int kThreads = 384;    // warpgroup 0 produces, 1 and 2 multiply
  static constexpr int kProducers = 128;
  static constexpr int kTileRows = 128;  // output features per block: one m64 tile per consumer
  static constexpr int kStageK = 64;     // k columns per stage: one swizzle atom
  static constexpr int kStages = 4;      // ring slots (as many as shared memory holds)
  // Stages between the multiply and the refill of a slot: with 2 the producers may decode stage
  // i + 1 while stages i - 1 and i are multiplied (with 1 they waited for i - 1 to retire);
  // decoded tiles are kept for kLag + 1 stages.
  static constexpr int kLag = 2;
  static constexpr int kDecodedSlots = kLag + 1;
  static constexpr size_t kXStageBytes = size_t(kBatchRows) * 128;  // rows of 64 16-bit values
  static constexpr size_t kAStageBytes = size_t(kTileRows) * 128;   // the decoded weight tile
  static constexpr size_t kWStageBytes = size_t(kTileRows) * 32;    // the 4-bit weights
  static constexpr size_t kSStageBytes = size_t(kTileRows) * 2 * 4;  // scale words (+ nested group absmax)
  // Pair-table rows of 64 bytes, 16 copies (a 16 KB table, to fit a third decoded tile).
  static constexpr int kTableRow = 64;
  static constexpr size_t kTableBytes = 256 * kTableRow;
  // (+1024: the rings are aligned to 1024 bytes by hand)
  static constexpr size_t kSmemBytes = 1024 + kStages * (kXStageBytes + kWStageBytes + kSStageBytes) +
                                       kDecodedSlots * kAStageBytes + kTableBytes + kCodeBytes +
                                       kStages * sizeof(uint64_t);
  static_assert(kSmemBytes <= 227 * 1024, "one block per SM");
  static_assert(1 + 2 * kStages <= 16, "named barriers: 0 for __syncthreads, FULL and EMPTY per slot");
};

// Named barriers between the producer and the consumer warpgroups (all 384 threads take part: the
// arriving side does not wait).
__device__ __forceinline__ void barrier_sync(int id) { asm volatile("bar.sync %0, 384;" ::"r"(id) : "memory"); }
__device__ __forceinline__ void barrier_arrive(int id) { asm volatile("bar.arrive %0, 384;" ::"r"(id) : "memory"); }

// The activation tile's arrival: one mbarrier per ring slot, completed by the bytes of a TMA copy.
// (sm_90 instructions: like wgmma they exist only in the sm_90a code, FP4_WGMMA_DEVICE)
#ifdef FP4_WGMMA_DEVICE
#define FP4_SM90_ONLY(...) __VA_ARGS__
__device__ __forceinline__ uint32_t shared_address(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }
#else
#define FP4_SM90_ONLY(...) __trap()
#endif
__device__ __forceinline__ void mbarrier_init(uint64_t* bar) {
  FP4_SM90_ONLY(asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_address(bar)) : "memory"));
}
__device__ __forceinline__ void mbarrier_expect(uint64_t* bar, uint32_t bytes) {
  FP4_SM90_ONLY(asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(bar)),
                             "r"(bytes)
                             : "memory"));
}
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  FP4_SM90_ONLY(asm volatile("{\n.reg .pred done;\nWAIT:\n"
                             "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                             "@!done bra WAIT;\n}\n" ::"r"(shared_address(bar)),
                             "r"(parity)
                             : "memory"));
}
// Copies the box at (column c0, row c1) of the tensor map into shared memory (the map's swizzle,
// rows past the tensor's end zero), completing `bar` with its bytes.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar) {
  FP4_SM90_ONLY(asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];" ::"r"(shared_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(shared_address(bar))
      : "memory"));
}

// The 16-byte piece q of producer p's weight row in a ring slot: rows of 32 bytes, the pieces of
// rows 4-7 of every 8 swapped so one 16-byte load of 8 rows touches 8 different bank groups.
__device__ __forceinline__ int weight_piece(int p, int q) { return p * 32 + ((q ^ ((p >> 2) & 1)) << 4); }

template <typename T, bool kNested>
__global__ void __launch_bounds__(WsConfig::kThreads, 1)
    gemm_wgmma_ws_kernel(const __grid_constant__ CUtensorMap x_map, int64_t m, int64_t k,
                         const uint8_t* __restrict__ packed, fp4_scales scales, int nested_log2, int64_t n,
                         int blocksize_log2, Code16 code, int64_t stages_per_split, const T* __restrict__ bias,
                         T* __restrict__ y, float* __restrict__ partial) {
  using C = WsConfig;
  constexpr int BN = C::kBatchRows, S = C::kStages, kLag = C::kLag;
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  extern __shared__ __align__(16) uint8_t smem_raw[];
  // (an offset from smem_raw, not an integer cast, keeps the pointers in the shared address space)
  uint8_t* const xring = smem_raw + ((1024 - (uint32_t(__cvta_generic_to_shared(smem_raw)) & 1023)) & 1023);
  uint8_t* const aring = xring + S * C::kXStageBytes;  // decoded tiles (1024-aligned: BN * 128 is)
  uint8_t* const wring = aring + C::kDecodedSlots * C::kAStageBytes;
  uint8_t* const sring = wring + S * C::kWStageBytes;
  uint8_t* const table = sring + S * C::kSStageBytes;
  float* const codes = reinterpret_cast<float*>(table + C::kTableBytes);
  uint64_t* const x_arrived = reinterpret_cast<uint64_t*>(codes + kCodeBytes / sizeof(float));  // [slot]
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) mbarrier_init(x_arrived + s);
    FP4_SM90_ONLY(asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"));
  }
  build_pair_table<T, C::kTableRow, kNested>(table, codes, code, scales);  // (ends in a __syncthreads)

  const int64_t batch0 = int64_t(blockIdx.x) * BN;
  const int64_t tile_row0 = int64_t(blockIdx.y) * C::kTileRows;
  const int64_t stage_begin = int64_t(blockIdx.z) * stages_per_split;
  const int64_t stage_end = min(k / C::kStageK, stage_begin + stages_per_split);
  if (stage_begin >= stage_end) return;  // (block-uniform)
  const int stages = int(stage_end - stage_begin);
  constexpr int kFull = 1, kEmpty = 1 + S;  // barrier ids of slot 0

  if (threadIdx.x < C::kProducers) {
    const int p = threadIdx.x, lane = p % 32;
    // This thread's weight row (rows past n read row n - 1 and get scale 0).
    const int64_t feature = tile_row0 + p;
    const bool row_valid = feature < n;
    const int64_t row_elem = (row_valid ? feature : n - 1) * k;
    const uint8_t* const weight_src = packed + row_elem / 2;
    const float nested_offset = kNested ? *scales.nested_offset : 0.0f;
    // Request stage st into ring slot `slot`: one commit group per call (empty past the end), the
    // activations by TMA.
    auto issue = [&](int slot, int64_t st) {
      if (st < stage_end) {
#pragma unroll
        for (int q = 0; q < 2; ++q)
          cp_async16(wring + slot * C::kWStageBytes + weight_piece(p, q), weight_src + st * 32 + q * 16);
        const int64_t block = (row_elem + st * C::kStageK) >> blocksize_log2;
        uint32_t* const scale_dst = reinterpret_cast<uint32_t*>(sring + slot * C::kSStageBytes) + p;
        if constexpr (kNested) {
          cp_async4(scale_dst, scales.nested_codes + (block & ~int64_t(3)));  // (gemm_4bit_wgmma_supports)
          cp_async4(scale_dst + C::kProducers,
                    scales.absmax + (nested_log2 >= 0 ? block >> nested_log2 : block / scales.nested_blocksize));
        } else {
          cp_async4(scale_dst, scales.absmax + block);
        }
        if (p == 0) {  // the activation tile: one TMA copy
          mbarrier_expect(x_arrived + slot, uint32_t(C::kXStageBytes));
          tma_load_2d(xring + slot * C::kXStageBytes, &x_map, int(st * C::kStageK), int(batch0), x_arrived + slot);
        }
      }
      cp_async_commit();
    };

    // Decode this thread's row of stage st (ring slot `slot`) into decoded slot `aslot`: byte b of
    // the row's 32 holds columns 2b, 2b + 1, one table pair; 4 bytes make a 16-byte unit.
    const uint32_t copy_x16 = uint32_t(lane % 16) * 16;
    auto decode = [&](int slot, int aslot, int64_t st) {
      const uint8_t* const w = wring + slot * C::kWStageBytes;
      const uint4 lo = *reinterpret_cast<const uint4*>(w + weight_piece(p, 0));
      const uint4 hi = *reinterpret_cast<const uint4*>(w + weight_piece(p, 1));
      const uint32_t words[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
      const uint32_t* const sc = reinterpret_cast<const uint32_t*>(sring + slot * C::kSStageBytes) + p;
      float scale = __uint_as_float(sc[0]);
      if constexpr (kNested) {
        const int64_t block = (row_elem + st * C::kStageK) >> blocksize_log2;
        scale = nested_scale(codes + 16, (sc[0] >> (8 * (block & 3))) & 0xffu, __uint_as_float(sc[C::kProducers]),
                             nested_offset);
      }
      const uint32_t scale_pair = Pair<T>::of(row_valid ? scale : 0.0f, row_valid ? scale : 0.0f);
      // All 32 lookups first, then the multiplies and stores: the loads' latencies overlap
      // (this warp is alone on its scheduler, nothing else hides them).
      uint32_t pairs[32];
#pragma unroll
      for (int u = 0; u < 8; ++u)
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          // byte b of the word beside the copy's offset: (byte * 256 + copy * 16) >> 2
          const uint32_t offset = __byte_perm(words[u], copy_x16, 0x5504u | (uint32_t(b) << 4)) >> 2;
          pairs[4 * u + b] = load_pair(table, offset);
        }
      uint8_t* const a = aring + aslot * C::kAStageBytes;
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        uint32_t v[4];
#pragma unroll
        for (int b = 0; b < 4; ++b) v[b] = Pair<T>::mul(pairs[4 * u + b], scale_pair);
        *reinterpret_cast<uint4*>(a + wgmma::sw128_offset(p, u)) = make_uint4(v[0], v[1], v[2], v[3]);
      }
    };

#pragma unroll
    for (int s = 0; s < S; ++s) issue(s, stage_begin + s);
    int slot = 0, aslot = 0;
    for (int i = 0; i < stages; ++i) {
      cp_async_wait<S - kLag - 1>();  // this thread's copies of stage i have landed
      decode(slot, aslot, stage_begin + i);
      wgmma::fence_proxy_async();  // (its copies and stores, before the consumers' wgmma reads)
      barrier_arrive(kFull + slot);
      if (i >= kLag) {
        // Refill the slot of stage i - kLag once its multiplies are retired.
        const int old = (slot + S - kLag) % S;
        barrier_sync(kEmpty + old);
        issue(old, stage_begin + i - kLag + S);
      } else {
        cp_async_commit();  // (one group per iteration keeps the wait count uniform)
      }
      slot = slot + 1 == S ? 0 : slot + 1;
      aslot = aslot + 1 == C::kDecodedSlots ? 0 : aslot + 1;
    }
    cp_async_wait<0>();
    return;
  }

  // Consumers: warpgroup c multiplies features 64 c + [0, 64) of the tile.
  const int c = threadIdx.x / 128 - 1;
  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
  int slot = 0, aslot = 0;
  for (int i = 0; i < stages; ++i) {
    barrier_sync(kFull + slot);
    mbarrier_wait(x_arrived + slot, uint32_t(i / S) & 1);
    const uint64_t desc_a = wgmma::smem_desc_sw128(aring + aslot * C::kAStageBytes + c * 64 * 128);
    const uint64_t desc_b = wgmma::smem_desc_sw128(xring + slot * C::kXStageBytes);
    wgmma::fence();
    wgmma::pin(acc);
#pragma unroll
    for (int j = 0; j < 4; ++j) wgmma::MmaSS<BN, kBf16>::run(acc, desc_a + 2 * j, desc_b + 2 * j);
    wgmma::commit();
    wgmma::pin(acc);
    wgmma::wait<1>();  // stage i - 1's multiplies are retired: its slot may be refilled
    wgmma::pin(acc);
    if (i >= 1 && i - 1 < stages - kLag) barrier_arrive(kEmpty + (slot + S - 1) % S);
    slot = slot + 1 == S ? 0 : slot + 1;
    aslot = aslot + 1 == C::kDecodedSlots ? 0 : aslot + 1;
  }
  wgmma::wait<0>();
  wgmma::pin(acc);

  const int64_t warp_row0 = tile_row0 + 64 * c + 16 * ((threadIdx.x / 32) % 4);
  wgmma::store_accumulators(acc, warp_row0, batch0, m, n, bias, y, partial);
}

#undef FP4_SM90_ONLY

// The activations [m, k] as a TMA tensor map: boxes of 64 columns x `box_rows` rows in the
// 128-byte swizzle (the layout wgmma's descriptor reads), rows past m read as zero.
CUtensorMap activation_map(const void* x, fp4_dtype dtype, int64_t m, int64_t k, int box_rows) {
  static const auto encode = [] {
    void* function = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    check(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &function, 12000, cudaEnableDefault, &found),
          "cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled)");
    if (found != cudaDriverEntryPointSuccess || function == nullptr)
      fail(FP4_ERROR_CUDA, "the CUDA driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(function);
  }();
  CUtensorMap map;
  const cuuint64_t dims[2] = {cuuint64_t(k), cuuint64_t(m)};
  const cuuint64_t row_stride[1] = {cuuint64_t(k) * 2};
  const cuuint32_t box[2] = {64, cuuint32_t(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult status =
      encode(&map, dtype == FP4_FLOAT16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2,
             const_cast<void*>(x), dims, row_stride, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
             CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (status != CUDA_SUCCESS) fail(FP4_ERROR_CUDA, "cuTensorMapEncodeTiled failed for x (error ", int(status), ")");
  return map;
}

template <typename T, bool kNested>
void launch(const fp4_exec& exec, const T* x, int64_t m, int64_t k, const uint8_t* packed, const fp4_scales& scales,
            int64_t n, int blocksize_log2, const Code16& code, const T* bias, T* y, float* workspace) {
  using C = WsConfig;
  constexpr int BN = C::kBatchRows;
  constexpr auto kernel = gemm_wgmma_ws_kernel<T, kNested>;
  allow_dynamic_smem<kernel>(exec.device_index, C::kSmemBytes);
  // (batch tiles vary fastest: the blocks that share a weight tile run together and read it once)
  int64_t per_split = 0;
  const dim3 grid =
      one_block_per_sm_grid(m, n, BN, C::kTileRows, k / C::kStageK, C::kStageK, exec.device_index, per_split);
  const CUtensorMap x_map = activation_map(x, std::is_same_v<T, __half> ? FP4_FLOAT16 : FP4_BFLOAT16, m, k, BN);
  cudaStream_t stream = stream_of(exec);
  with_partial_sums(grid.z > 1, workspace, m, n, bias, y, stream, [&](float* partial) {
    kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(x_map, m, k, packed, scales, nested_shift(scales), n,
                                                         blocksize_log2, code, per_split, bias, y, partial);
    check_launch("gemm_4bit warp-specialized wgmma kernel");
  });
}

}  // namespace

void gemm_4bit_wgmma_ws(const fp4_exec& exec, const Code16& code, fp4_dtype dtype, const void* x, int64_t m,
                        int64_t k, const uint8_t* packed, const fp4_scales& scales, int64_t n, int64_t blocksize,
                        const void* bias, void* y, float* workspace) {
  const int log2 = log2_of(blocksize);
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xt = static_cast<const T*>(x);
    const T* bt = static_cast<const T*>(bias);
    if (scales.nested_codes != nullptr)
      launch<T, true>(exec, xt, m, k, packed, scales, n, log2, code, bt, static_cast<T*>(y), workspace);
    else
      launch<T, false>(exec, xt, m, k, packed, scales, n, log2, code, bt, static_cast<T*>(y), workspace);
  };
  if (dtype == FP4_FLOAT16)
    run(static_cast<__half*>(nullptr));
  else
    run(static_cast<__nv_bfloat16*>(nullptr));
}

}  // namespace fp4::cuda
