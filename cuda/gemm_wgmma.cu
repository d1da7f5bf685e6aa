// The 4-bit linear layer on Hopper warpgroup MMA (sm_90a) for batch 17-64 where k % 256 != 0 (the
// warp-specialized kernel, gemm_wgmma_ws.cu, takes the rest), read straight from the bitsandbytes
// layout. As in mma_4bit.cuh the product is computed transposed, y^T = W x^T: the decoded weight is
// wgmma's A operand, taken from registers, and the activations its B operand, taken from shared
// memory (wgmma.cuh). Unlike the mma.sync kernels the k order is the natural one: the activations
// reach shared memory as 16-byte copies in wgmma's 128-byte swizzle, and each lane picks its
// fragment's bytes out of the weight words with a byte permute.
//
// A block covers 256 output features x BN batch rows (BN 32 to batch 32, else 64), one block per
// SM: 16 warps, 4 warpgroups of one m64 tile each (memory- and decode-bound: many warps hide the
// decode's latencies). Each stage is two 64-column slices of k (one swizzle atom of activations
// each: 64 bytes per weight row); every warp streams its weight rows and their scales through a
// private cp.async ring, the block's activations ride a shared ring, one barrier per stage. A
// multiply group is one m64 tile x one slice: its A fragments are decoded while the previous group
// runs on the tensor cores (fragments double-buffered).
// k is split across blockIdx.z only to give most SMs a block; split partial sums meet in the fp32
// workspace like the other GEMM kernels. Measurements: docs/perf-log.md.
#include "build_config.h"
#include "kernels.hpp"
#include "mma_4bit.cuh"
#include "wgmma.cuh"

#include <cstring>
#include <type_traits>

namespace fp4::cuda {
namespace {

constexpr int kAtomK = 64;  // k columns per swizzle atom of activations (128 bytes of 16-bit values)

template <int BN>
struct WgmmaConfig {
  // 4 warpgroups of one m64 tile (128 registers each). BN 32 serves batch 17-32: half the
  // activation tile of BN 64 to read per multiply, and a deeper ring (measured (28672, 8192) batch
  // 32: 103 us vs 114 with BN 64). (Two m64 tiles per warpgroup, for BN 128, lost to the
  // warp-specialized kernel: gemm_4bit_wgmma below.)
  static_assert(BN == 32 || BN == 64, "batch 17-64");
  static constexpr int kWarps = 16, kThreads = kWarps * 32;
  static constexpr int kWarpRows = 16;                    // weight rows per warp
  static constexpr int kTileRows = kWarpRows * kWarps;    // output features per block: 256
  static constexpr int kAtoms = 2;                        // 64-column slices per stage
  static constexpr int kStages = BN == 64 ? 5 : 6;  // (as many as shared memory holds)
  // Stages between the one being multiplied and the one whose slot is refilled: 2 keeps the
  // multiplies going across the stage boundary (measured 2-3% better than 1 at batch 32-64).
  static constexpr int kLag = 2;
  static constexpr int kAhead = kStages - kLag;           // stages requested ahead of the multiply
  static constexpr int kStageK = kAtoms * kAtomK;
  static constexpr int kRowBytes = kStageK / 2;           // bytes of a weight row per stage
  static constexpr int kPieces = kRowBytes / 16;          // 16-byte pieces of it
  static constexpr size_t kWarpStageBytes = size_t(kWarpRows) * kRowBytes;
  static constexpr size_t kXStageBytes = size_t(BN) * 2 * kStageK;
  static constexpr size_t kXRingBytes = kStages * kXStageBytes;
  static constexpr size_t kWRingBytes = kStages * kWarps * kWarpStageBytes;
  // Per stage, row and slice: the scale as loaded (fp32 bits, or the aligned word holding the
  // nested code) and the nested group's absmax.
  static constexpr size_t kWarpScaleBytes = size_t(kWarpRows) * kAtoms * 2 * sizeof(uint32_t);
  static constexpr size_t kSRingBytes = kStages * kWarps * kWarpScaleBytes;
  // Pair-table rows of 128 bytes (measured: 256-byte rows, one instruction less per byte, cost
  // 4-15% at batch 128-256 for a 222 KB block).
  static constexpr size_t kTableBytes = 256 * 128;
  // (+1024: the activation ring is aligned to 1024 bytes by hand)
  static constexpr size_t kSmemBytes = 1024 + kXRingBytes + kWRingBytes + kSRingBytes + kTableBytes + kCodeBytes;
  static_assert(kAtoms % 2 == 0, "a stage holds an even number of groups (the fragment buffer parity)");
  static_assert(kSmemBytes <= 227 * 1024, "one block per SM");
  static_assert((BN * kAtoms) % (kThreads / 8) == 0, "the activation copies come in whole passes");
};

// Piece p of weight row r (of a warp's rows, kPieces pieces each) in a ring stage: swizzled so the
// rows g = 0..7 that one 16-byte load reads fall in 8 different bank groups.
template <int kPieces>
__device__ __forceinline__ int weight_piece_offset(int row, int piece) {
  constexpr int kRowsPerLine = 8 / kPieces;  // rows per 128 bytes
  return row * kPieces * 16 + ((piece ^ ((row / kRowsPerLine) % kPieces)) << 4);
}

template <typename T, int BN, bool kNested>
__global__ void __launch_bounds__(WgmmaConfig<BN>::kThreads, 1)
    gemm_wgmma_kernel(const T* __restrict__ x, int64_t m, int64_t k, const uint8_t* __restrict__ packed,
                      fp4_scales scales, int nested_log2, int64_t n, int blocksize_log2, Code16 code,
                      int64_t stages_per_split, const T* __restrict__ bias, T* __restrict__ y,
                      float* __restrict__ partial) {
  using C = WgmmaConfig<BN>;
  constexpr int kAtoms = C::kAtoms, kStages = C::kStages, kAhead = C::kAhead, kPieces = C::kPieces;
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  extern __shared__ __align__(16) uint8_t smem_raw[];
  // (an offset from smem_raw, not an integer cast, keeps the pointers in the shared address space)
  uint8_t* const xring = smem_raw + ((1024 - (uint32_t(__cvta_generic_to_shared(smem_raw)) & 1023)) & 1023);
  uint8_t* const wring = xring + C::kXRingBytes;  // [stage][warp][kWarpRows rows][kRowBytes]
  uint8_t* const sring = wring + C::kWRingBytes;  // [stage][warp][2][kWarpRows rows][kAtoms]
  uint8_t* const table = sring + C::kSRingBytes;
  float* const codes = reinterpret_cast<float*>(table + C::kTableBytes);
  float* const nested_code = codes + 16;
  build_pair_table<T, 128, kNested>(table, codes, code, scales);

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  // (the lookups' byte permute: wgmma::decode_slice)
  const uint32_t pair_select = 0x5504u | (uint32_t(t) << 4);
  const uint32_t lane_x8 = uint32_t(lane) * 8;
  const int64_t batch0 = int64_t(blockIdx.x) * BN;
  // Warp w covers rows 16 (w % 4) + [0, 16) of the block's m64 tile w / 4.
  const int64_t tile_row0 = int64_t(blockIdx.y) * C::kTileRows + (warp / 4) * 64 + (warp % 4) * 16;
  const int64_t total_stages = k / C::kStageK;
  const int64_t stage_begin = int64_t(blockIdx.z) * stages_per_split;
  const int64_t stage_end = min(total_stages, stage_begin + stages_per_split);
  if (stage_begin >= stage_end) return;  // (block-uniform)
  const int64_t stages = stage_end - stage_begin;
  const int rows = int(m - batch0 < BN ? m - batch0 : BN);  // real activation rows of this tile
  const float nested_offset = kNested ? *scales.nested_offset : 0.0f;

  // Activation rows past m stay zero in every slot (no copy ever writes them).
  for (int i = threadIdx.x; i < (BN - rows) * kStages * kAtoms * 8; i += C::kThreads) {
    const int unit = i % 8, rest = i / 8, row = rows + rest % (BN - rows), tile = rest / (BN - rows);
    *reinterpret_cast<uint4*>(xring + tile * (BN * 128) + wgmma::sw128_offset(row, unit)) = make_uint4(0, 0, 0, 0);
  }

  // This lane's weight rows: g and g + 8 of the warp's 16 (rows past n read row n - 1 and get
  // scale 0).
  int64_t row_elem[2];
  bool row_valid[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t f = tile_row0 + 8 * r + g;
    row_valid[r] = f < n;
    row_elem[r] = (row_valid[r] ? f : n - 1) * k;
  }
  // The lane's weight copies: warp row i of the ring is feature tile_row0 + i.
  constexpr int kCopies = C::kWarpRows * kPieces / 32;
  const uint8_t* copy_src[kCopies];
  int copy_dst[kCopies];
#pragma unroll
  for (int i = 0; i < kCopies; ++i) {
    const int p = i * 32 + lane, row = p / kPieces, piece = p % kPieces;
    copy_src[i] = packed + min(tile_row0 + row, n - 1) * (k / 2) + piece * 16;
    copy_dst[i] = weight_piece_offset<kPieces>(row, piece);
  }
  uint8_t* const warp_ring = wring + warp * C::kWarpStageBytes;
  constexpr int kWStageStride = C::kWarps * int(C::kWarpStageBytes);
  uint32_t* const warp_scales = reinterpret_cast<uint32_t*>(sring + warp * C::kWarpScaleBytes);
  constexpr int kSStageStride = C::kWarps * int(C::kWarpScaleBytes) / 4;  // (in words)
  constexpr int kGroupOffset = C::kWarpRows * kAtoms;                     // nested group absmax words
  // Lane l < kWarpRows copies the scales of warp row l (feature tile_row0 + l).
  const int64_t scale_row_elem = min(tile_row0 + lane, n - 1) * k;

  // The activation copies: thread i moves unit i % 8 of flat row q = i / 8 + kXRowsPerPass c in
  // pass c, flat row q being row q % BN of slice q / BN.
  constexpr int kXRowsPerPass = C::kThreads / 8;
  constexpr int kXPasses = BN * kAtoms / kXRowsPerPass;
  const int x_row = (threadIdx.x / 8) % BN, x_atom = (threadIdx.x / 8) / BN, x_unit8 = threadIdx.x % 8;
  const int x_dst = wgmma::sw128_offset(x_row, x_unit8);  // (+ 128 per row: row0 keeps row % 8)
  const T* const x_src = x + (batch0 + x_row) * k + x_unit8 * 8;

  // Request stage st's weights, scales and activations into ring slot `slot`: one commit group per
  // call, empty past the end. Scales ride the ring too: loads into registers this far ahead would
  // cost too many of them, and any nearer ones wait out the queue of copies ahead of them.
  auto issue = [&](int slot, int64_t st) {
    if (st < stage_end) {
#pragma unroll
      for (int i = 0; i < kCopies; ++i)
        cp_async16(warp_ring + slot * kWStageStride + copy_dst[i], copy_src[i] + st * C::kRowBytes);
#pragma unroll
      for (int a = 0; a < kAtoms; ++a) {
        if (lane >= C::kWarpRows) break;
        const int64_t block = (scale_row_elem + st * C::kStageK + a * kAtomK) >> blocksize_log2;
        uint32_t* const dst = warp_scales + slot * kSStageStride + lane * kAtoms + a;
        if constexpr (kNested) {
          cp_async4(dst, scales.nested_codes + (block & ~int64_t(3)));  // (gemm_4bit_wgmma_supports)
          cp_async4(dst + kGroupOffset,
                    scales.absmax + (nested_log2 >= 0 ? block >> nested_log2 : block / scales.nested_blocksize));
        } else {
          cp_async4(dst, scales.absmax + block);
        }
      }
#pragma unroll
      for (int c = 0; c < kXPasses; ++c) {
        // (a pass covers whole slices when BN < kXRowsPerPass, rows of one slice otherwise)
        constexpr int kRowPasses = BN >= kXRowsPerPass ? BN / kXRowsPerPass : 1;
        const int row0 = BN >= kXRowsPerPass ? kXRowsPerPass * (c % kRowPasses) : 0;
        const int atom = BN >= kXRowsPerPass ? c / kRowPasses : x_atom + c * (kXRowsPerPass / BN);
        if (row0 + x_row < rows)
          cp_async16(xring + slot * C::kXStageBytes + atom * (BN * 128) + row0 * 128 + x_dst,
                     x_src + row0 * k + st * C::kStageK + atom * kAtomK);
      }
    }
    cp_async_commit();
  };

  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
  // A fragments, double-buffered by multiply group (one group: one slice).
  uint32_t frag[2][4][4];  // [buffer][k16 step][A register]

  // Decode slice `a` of stage st (in `slot`) into frag[buf], then queue its 4 multiplies as one
  // group.
  auto multiply = [&](int slot, int64_t st, int a, int buf) {
    wgmma::keep(frag[buf]);  // (the group that read them is retired: see the waits below)
    const uint8_t* ws = warp_ring + slot * kWStageStride;
    uint32_t words[2][8];  // rows g, g + 8 of the tile: the slice's 32 bytes
    uint32_t scale_pair[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = 8 * r + g;
      const uint4 lo = *reinterpret_cast<const uint4*>(ws + weight_piece_offset<kPieces>(row, 2 * a));
      const uint4 hi = *reinterpret_cast<const uint4*>(ws + weight_piece_offset<kPieces>(row, 2 * a + 1));
      words[r][0] = lo.x, words[r][1] = lo.y, words[r][2] = lo.z, words[r][3] = lo.w;
      words[r][4] = hi.x, words[r][5] = hi.y, words[r][6] = hi.z, words[r][7] = hi.w;
      const uint32_t* const sc = warp_scales + slot * kSStageStride + row * kAtoms + a;
      float scale = __uint_as_float(sc[0]);
      if constexpr (kNested) {
        const int64_t block = (row_elem[r] + st * C::kStageK + a * kAtomK) >> blocksize_log2;
        const uint32_t code = (sc[0] >> (8 * (block & 3))) & 0xffu;
        scale = nested_scale(nested_code, code, __uint_as_float(sc[kGroupOffset]), nested_offset);
      }
      scale = row_valid[r] ? scale : 0.0f;
      scale_pair[r] = Pair<T>::of(scale, scale);
    }
    wgmma::decode_slice<T>(words, scale_pair, table, lane_x8, pair_select, frag[buf]);
    const uint64_t desc = wgmma::smem_desc_sw128(xring + slot * C::kXStageBytes + a * (BN * 128));
    wgmma::fence();
    wgmma::pin(acc);
#pragma unroll
    for (int j = 0; j < 4; ++j) wgmma::Mma<BN, kBf16>::run(acc, frag[buf][j], desc + 2 * j);
    wgmma::commit();
    wgmma::pin(acc);
  };

#pragma unroll
  for (int s = 0; s < kAhead; ++s) issue(s, stage_begin + s);
  for (int64_t st = 0; st < stages; st += kStages) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      if (st + s < stages) {
        // This thread's copies of stage st + s have landed; the multiplies that read the slot about
        // to be refilled (stage st + s - kLag) are retired in this warp; the barrier extends both
        // to the block.
        cp_async_wait<kAhead - 1>();
        wgmma::fence_proxy_async();
        wgmma::wait<C::kLag - 1>();
        wgmma::pin(acc);
        __syncthreads();
        issue((s + kAhead) % kStages, stage_begin + st + s + kAhead);
#pragma unroll
        for (int a = 0; a < kAtoms; ++a) {
          if (a > 0) {  // retire all but the last group: the buffer about to be filled is free
            wgmma::wait<1>();
            wgmma::pin(acc);
          }
          multiply(s, stage_begin + st + s, a, a % 2);
        }
      }
    }
  }
  wgmma::wait<0>();
  wgmma::pin(acc);
  wgmma::keep(frag[0]);
  wgmma::keep(frag[1]);

  wgmma::store_accumulators(acc, tile_row0, batch0, m, n, bias, y, partial);
}

template <typename T, int BN, bool kNested>
void launch(const fp4_exec& exec, const T* x, int64_t m, int64_t k, const uint8_t* packed, const fp4_scales& scales,
            int64_t n, int blocksize_log2, const Code16& code, const T* bias, T* y, float* workspace) {
  using C = WgmmaConfig<BN>;
  constexpr auto kernel = gemm_wgmma_kernel<T, BN, kNested>;
  constexpr size_t smem = C::kSmemBytes;
  const int device = exec.device_index;
  allow_dynamic_smem<kernel>(device, smem);
  int64_t per_split = 0;
  const dim3 grid = one_block_per_sm_grid(m, n, BN, C::kTileRows, k / C::kStageK, C::kStageK, device, per_split);
  cudaStream_t stream = stream_of(exec);
  with_partial_sums(grid.z > 1, workspace, m, n, bias, y, stream, [&](float* partial) {
    kernel<<<grid, C::kThreads, smem, stream>>>(x, m, k, packed, scales, nested_shift(scales), n, blocksize_log2,
                                                code, per_split, bias, y, partial);
    check_launch("gemm_4bit wgmma kernel");
  });
}

// Whether FP4_CUDA_ARCHS (space-separated CMake architectures) has sm_90a code.
bool built_for_sm90a() {
  const char* archs = FP4_CUDA_ARCHS;
  for (const char* at = std::strstr(archs, "90a"); at != nullptr; at = std::strstr(at + 1, "90a"))
    if ((at == archs || at[-1] == ' ') && (at[3] == '\0' || at[3] == ' ' || at[3] == '-')) return true;
  return false;
}

// 1 in the sm_90a code of this module, 0 in every other architecture's.
__device__ int sm90a_code_loaded;
__global__ void wgmma_probe_kernel() {
#ifdef FP4_WGMMA_DEVICE
  sm90a_code_loaded = 1;
#else
  sm90a_code_loaded = 0;
#endif
}

// Whether the runtime runs sm_90a code on the current device (a library built for both sm_90 and
// sm_90a leaves the choice to the driver): one probe launch on a private stream, its answer in a
// module variable (no allocation), with the capture mode relaxed so that a first call inside a
// CUDA-graph capture does not break the capture.
bool probe_sm90a() {
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  check(cudaThreadExchangeStreamCaptureMode(&mode), "cudaThreadExchangeStreamCaptureMode");
  int result = 0;
  cudaStream_t stream = nullptr;
  cudaError_t status = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  if (status == cudaSuccess) {
    wgmma_probe_kernel<<<1, 1, 0, stream>>>();
    status = cudaGetLastError();
    if (status == cudaSuccess)
      status = cudaMemcpyFromSymbolAsync(&result, sm90a_code_loaded, sizeof(int), 0, cudaMemcpyDeviceToHost, stream);
    if (status == cudaSuccess) status = cudaStreamSynchronize(stream);
  }
  if (stream != nullptr) cudaStreamDestroy(stream);
  cudaThreadExchangeStreamCaptureMode(&mode);
  check(status, "the sm_90a probe");
  return result == 1;
}

// Batch 17-64: the warp-specialized kernel wherever it can run (k % 256 == 0), this one elsewhere.
// H100 bf16 nf4, us, this kernel (forced by FP4_CUDA_WS_SMALL=0) / that one, batch 17 / 64:
// (28672, 8192) 104.1 / 78.9, 121.6 / 94.7; (14336, 4096) 36.5 / 25.3, 43.6 / 28.1; (4096, 14336)
// 34.4 / 24.9, 40.9 / 29.4; (4096, 4096) 19.1 / 12.7, 24.0 / 16.0; (11008, 4096) 27.4 / 22.2,
// 33.4 / 26.4; (8192, 8192) 35.9 / 27.8, 42.3 / 32.9.
bool small_batch_goes_warp_specialized(int64_t k) {
  if (!gemm_4bit_wgmma_ws_takes_small_batch(k)) return false;
  return switch_setting("FP4_CUDA_WS_SMALL") != 0;
}

}  // namespace

bool gemm_4bit_wgmma_available(int device_index) {
  static const bool built = built_for_sm90a();
  static std::atomic<int> cached[64];  // 0 unknown, 1 no, 2 yes (racing threads store the same value)
  if (!built || device_index < 0 || device_index >= 64) return false;
  if (cached[device_index].load() == 0) {
    int major = 0, minor = 0;
    check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device_index), "cudaDeviceGetAttribute");
    check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device_index), "cudaDeviceGetAttribute");
    bool yes = major == 9 && minor == 0;
    if (yes) {
      DeviceGuard guard(device_index);
      yes = probe_sm90a();
    }
    cached[device_index].store(yes ? 2 : 1);
  }
  return cached[device_index].load() == 2;
}

bool gemm_4bit_wgmma_supports(int64_t n, int64_t k, int64_t blocksize, const fp4_scales& scales) {
  // (whole stages of both kernels: 128 columns here, pairs of 64 in gemm_wgmma_ws.cu)
  if (k % WgmmaConfig<64>::kStageK != 0 || blocksize < kAtomK) return false;
  if (n > 65535 * 128) return false;  // (grid.y: gemm_wgmma_ws.cu's tiles of 128 features)
  if (scales.nested_codes == nullptr) return true;
  // Nested codes are copied as the aligned 4-byte words that hold them: every such word must lie
  // inside the array.
  const int64_t blocks = (n * k + blocksize - 1) / blocksize;
  return reinterpret_cast<uintptr_t>(scales.nested_codes) % 4 == 0 && blocks % 4 == 0;
}

void gemm_4bit_wgmma(const fp4_exec& exec, const Code16& code, fp4_dtype dtype, const void* x, int64_t m, int64_t k,
                     const uint8_t* packed, const fp4_scales& scales, int64_t n, int64_t blocksize, const void* bias,
                     void* y, float* workspace) {
  // Past batch 64 the warp-specialized kernel (measured on the H100, bf16 nf4, us, this kernel with
  // two m64 tiles per warpgroup / that one with 128-row batch tiles: batch 128 on (28672, 8192)
  // 173.5 / 157.1, (14336, 4096) 61.1 / 42.3, (4096, 14336) 57.6 / 45.4, (4096, 4096) 33.1 / 21.8;
  // batch 80 on (28672, 8192) ~171 / 151.5), and batch 17-64 wherever it can run (see above).
  if (m > 64 || small_batch_goes_warp_specialized(k))
    return gemm_4bit_wgmma_ws(exec, code, dtype, x, m, k, packed, scales, n, blocksize, bias, y, workspace);
  const int log2 = log2_of(blocksize);
  // (the batch tile: 32 rows to batch 32, else 64; scales are read one by one: `paired` unused)
  dispatch_variant<32, 64>(
      dtype, m, 32, scales, blocksize,
      [&](auto* tag, auto bn, auto nested, auto /*paired*/) {
        using T = std::remove_pointer_t<decltype(tag)>;
        launch<T, decltype(bn)::value, decltype(nested)::value>(exec, static_cast<const T*>(x), m, k, packed, scales, n,
                                                                log2, code, static_cast<const T*>(bias),
                                                                static_cast<T*>(y), workspace);
      },
      false);
}

}  // namespace fp4::cuda
