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
// flushing its sums to the fp32 workspace whenever the tile changes. Batch <= 8 reads activations
// through L1 (every warp of the block reads the same ones); batch 9-16 copies each stage's slice
// once per block into shared memory (see kSharedX). The mma runs on unscaled codes when blocksize
// is 64 (the block scale multiplies each 64-column partial sum once), and those scales travel by
// cp.async with their stage's weights into spare shared memory (one copy per lane and stage instead
// of eight loads into a register ring: batch 16 on (28672, 8192) 88 -> 83 us).
#include "mma_4bit.cuh"

#include <cstdlib>
#include <cstring>
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
  // EMPTY[slot] when every warp is done with it.
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

// kBlock64: blocksize 64 with k % 256 == 0 (scales through the ring, see gemm_4bit_stream).
template <typename T, int NT, bool kBlock64, bool kNested>
__global__ void __launch_bounds__(StreamConfig<NT>::kThreads, 1)
    gemm_stream_kernel(const T* __restrict__ x, int64_t m, int64_t k, const uint8_t* __restrict__ packed,
                       fp4_scales scales, int nested_log2, int64_t n, int blocksize_log2, Code16 code,
                       int64_t stages_per_tile, int64_t total_stages, float* __restrict__ partial) {
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
  if constexpr (C::kSharedX) {
    if (threadIdx.x == 0)
      for (int s = 0; s < C::kXSlots; ++s)
        mbarrier_init(x_full + s * 8, C::kThreads), mbarrier_init(x_empty + s * 8, C::kWarps);
  }
  build_pair_table<T, 256, kNested>(table, codes, code, scales);  // (its barrier orders the inits)

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const uint32_t lane_bytes = uint32_t(lane) * 4;
  const int64_t chunks = k / kChunk;
  const int64_t begin = total_stages * blockIdx.x / gridDim.x, end = total_stages * (blockIdx.x + 1) / gridDim.x;
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
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int64_t b = nt * 8 + g;
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            if constexpr (C::kSharedX) {  // (rows past the batch hold stale values: their sums are never stored)
              const int unit = 16 * j + 8 * h + 2 * t + u, row = nt * 8 + g;
              xu[nt][u] = ld_shared_v4(x_ring + uint32_t(x_slot * 16 + row) * C::kXRowBytes + ((unit ^ (row & 7)) * 16));
            } else {
              xu[nt][u] = b < m ? __ldg(reinterpret_cast<const uint4*>(x_lane + nt * 8 * k + c * kChunk + 64 * h) + u)
                                : make_uint4(0, 0, 0, 0);
            }
          }
        }
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
              uint32_t lo = load_pair(table, s == 0 ? pair_offset_wide<0>(word, lane_bytes)
                                                    : pair_offset_wide<2>(word, lane_bytes));
              uint32_t hi = load_pair(table, s == 0 ? pair_offset_wide<1>(word, lane_bytes)
                                                    : pair_offset_wide<3>(word, lane_bytes));
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
    }
    if constexpr (C::kSharedX) {  // this warp is done with the stage's activations
      __syncwarp();
      if (lane == 0) mbarrier_arrive(x_empty + x_slot * 8);
    }
    // The tile ends here (or the block's range does): add this warp's sums to the workspace.
    c0 += kSpan;
    if (c0 >= chunks || gs + 1 == end) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int64_t f = row0 + g + (i / 2) * 8, b = nt * 8 + 2 * t + (i % 2);
          if (f < n && b < m) atomicAdd(partial + b * n + f, acc[nt][i]);
          acc[nt][i] = 0.0f;
        }
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
  const int64_t total = tiles * stages_per_tile;
  const int64_t grid = std::min<int64_t>(sm_count(device), total);
  const int nested_log2 = nested_shift(scales);
  cudaStream_t stream = stream_of(exec);
  with_partial_sums(true, workspace, m, n, bias, y, stream, [&](float* partial) {  // (ranges always meet there)
    kernel<<<unsigned(grid), C::kThreads, C::kSmemBytes, stream>>>(x, m, k, packed, scales, nested_log2, n, log2,
                                                                   code, stages_per_tile, total, partial);
    check_launch("gemm_4bit stream kernel");
  });
}

}  // namespace

bool gemm_4bit_stream_fits(int device, int64_t m) {
  if (const char* forced = std::getenv("FP4_CUDA_STREAM"); forced && std::strcmp(forced, "0") == 0)
    return false;  // testing: the path of devices without room for it
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
