// Hopper (sm_90) bulk copies for the kernels fed by a producer warp (gemm_wgmma_ws.cu,
// gemm_stream.cu): mbarriers that count arrivals and bytes, TMA tensor-map copies, and the host
// encoder of 2D tensor maps. Like wgmma these instructions are compiled only into the sm_90a code
// (FP4_WGMMA_DEVICE); elsewhere they trap, and the kernels that use them are launched only where
// gemm_4bit_wgmma_available() says so.
#pragma once

#include <cuda.h>  // (CUtensorMap only: the encoder is reached through the runtime's entry-point query)
#include <cudaTypedefs.h>

#include <cstdint>

#include "common.cuh"
#include "wgmma.cuh"

namespace fp4::cuda::tma {

#ifdef FP4_WGMMA_DEVICE
#define FP4_TMA_ONLY(...) __VA_ARGS__
#else
#define FP4_TMA_ONLY(...) __trap()
#endif
__device__ __forceinline__ uint32_t shared_address(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

// An mbarrier completes a phase when `count` threads have arrived and the bytes it expects landed.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
  FP4_TMA_ONLY(
      asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(shared_address(bar)), "r"(count) : "memory"));
}
// Makes the initialized barriers visible to the copy engines (one thread, after its inits).
__device__ __forceinline__ void fence_barrier_init() {
  FP4_TMA_ONLY(asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"));
}
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  FP4_TMA_ONLY(asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(shared_address(bar)) : "memory"));
}
// Arrives on `bar` once this thread's cp.async copies issued so far have landed.
__device__ __forceinline__ void mbarrier_arrive_on_copies(uint64_t* bar) {
  FP4_TMA_ONLY(asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(shared_address(bar))
                            : "memory"));
}
// Arrives on `bar` and adds `bytes` to what its phase waits for.
__device__ __forceinline__ void mbarrier_expect(uint64_t* bar, uint32_t bytes) {
  FP4_TMA_ONLY(asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(bar)),
                            "r"(bytes)
                            : "memory"));
}
// Waits until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  FP4_TMA_ONLY(asm volatile("{\n.reg .pred done;\nWAIT:\n"
                            "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                            "@!done bra WAIT;\n}\n" ::"r"(shared_address(bar)),
                            "r"(parity)
                            : "memory"));
}
// Copies the box at (column c0, row c1) of the tensor map into shared memory (the map's swizzle,
// elements past the tensor's end zero), completing `bar` with its bytes.
__device__ __forceinline__ void load_2d(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar) {
  FP4_TMA_ONLY(asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];" ::"r"(shared_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(shared_address(bar))
      : "memory"));
}
#undef FP4_TMA_ONLY

// A row-major 2D tensor (`rows` x `columns` elements of `type`, rows `row_bytes` apart) as a TMA map
// of boxes of box_columns x box_rows in `swizzle`; `what` names it in errors.
inline CUtensorMap map_2d(const void* base, CUtensorMapDataType type, int64_t columns, int64_t rows, int64_t row_bytes,
                          int box_columns, int box_rows, CUtensorMapSwizzle swizzle, const char* what) {
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
  const cuuint64_t dims[2] = {cuuint64_t(columns), cuuint64_t(rows)};
  const cuuint64_t row_stride[1] = {cuuint64_t(row_bytes)};
  const cuuint32_t box[2] = {cuuint32_t(box_columns), cuuint32_t(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult status = encode(&map, type, 2, const_cast<void*>(base), dims, row_stride, box, element_strides,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                 CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (status != CUDA_SUCCESS) fail(FP4_ERROR_CUDA, "cuTensorMapEncodeTiled failed for ", what, " (error ", int(status), ")");
  return map;
}

}  // namespace fp4::cuda::tma
