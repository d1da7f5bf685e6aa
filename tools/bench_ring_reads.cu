// How fast can one block per SM stream the 117 MB of (28672, 8192) 4-bit weights into a shared-memory
// ring fed by one producer thread (TMA: 1D bulk chunks, or 2D boxes in the stream kernel's (tile,
// stage) order), against plain grid-stride 16-byte loads? Sets what the stream kernel's producer-fed
// form can reach (docs/perf-log.md). Build and run on the GPU:
//   nvcc -O3 -arch=sm_90a -std=c++17 -o /tmp/ring_reads tools/bench_ring_reads.cu && /tmp/ring_reads
// `/tmp/ring_reads sizes` instead times the plain loads on the bytes of smaller and larger layers (4 to
// 132 MB), one launch at a time and back to back over copies beyond the L2 (as the bench's CUDA
// graphs run them): what a read of each size costs at least, fixed costs included.
#include <cstdio>
#include <cstdint>
#include <vector>
#include <algorithm>
#include <string>
#include <cuda.h>
#include <cuda_runtime.h>

__device__ __forceinline__ uint4 ldg(const uint8_t* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}
template <int U>
__global__ void seq_kernel(const uint8_t* w, int64_t bytes, uint32_t* out) {
  uint32_t acc = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x * 16;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 16; i < bytes; i += U * stride) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = (i + u * stride < bytes) ? ldg(w + i + u * stride) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (acc == 0x12345678) out[0] = acc;
}

__device__ __forceinline__ uint32_t smem(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void bar_init(uint32_t b, uint32_t c) {
  asm volatile("mbarrier.init.shared.b64 [%0], %1;" ::"r"(b), "r"(c) : "memory");
}
__device__ __forceinline__ void bar_expect(uint32_t b, uint32_t tx) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(tx) : "memory");
}
__device__ __forceinline__ void bar_arrive(uint32_t b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(b) : "memory");
}
__device__ __forceinline__ void bar_wait(uint32_t b, uint32_t parity) {
  asm volatile("{\n.reg .pred p;\nW:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra W;\n}" ::"r"(b), "r"(parity)
               : "memory");
}
__device__ __forceinline__ void bulk_1d(uint32_t dst, const void* src, uint32_t bytes, uint32_t b) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst), "l"(src),
               "r"(bytes), "r"(b)
               : "memory");
}
__device__ __forceinline__ void tma_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t b) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(dst),
               "l"(map), "r"(c0), "r"(c1), "r"(b)
               : "memory");
}

// Persistent: block b streams units [U*b/G, U*(b+1)/G). kMode 0: 1D chunks of kUnit bytes; 1: 2D boxes
// (256 rows x kUnit/256 bytes) in (tile, stage) order of a row-major (n, row_bytes) matrix.
template <int kMode, int kUnit, int kStages, int kConsumers>
__global__ void __launch_bounds__(32 * (kConsumers + 1), 1)
    ring_kernel(const __grid_constant__ CUtensorMap map, const uint8_t* w, int64_t units, int64_t stages_per_tile,
                uint32_t* out) {
  extern __shared__ __align__(1024) uint8_t ring[];
  __shared__ uint64_t full[kStages], empty[kStages];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0)
    for (int s = 0; s < kStages; ++s) bar_init(smem(&full[s]), 1), bar_init(smem(&empty[s]), kConsumers);
  __syncthreads();
  const int64_t begin = units * blockIdx.x / gridDim.x, end = units * (blockIdx.x + 1) / gridDim.x;
  if (warp == kConsumers) {
    if (lane == 0) {
      for (int64_t u = begin; u < end; ++u) {
        const int i = int(u - begin), s = i % kStages;
        if (i >= kStages) bar_wait(smem(&empty[s]), ((i / kStages) - 1) & 1);
        bar_expect(smem(&full[s]), kUnit);
        if (kMode == 0) bulk_1d(smem(ring + s * kUnit), w + u * kUnit, kUnit, smem(&full[s]));
        else {
          const int64_t tile = u / stages_per_tile, st = u % stages_per_tile;
          tma_2d(smem(ring + s * kUnit), &map, int(st * (kUnit / 256)), int(tile * 256), smem(&full[s]));
        }
      }
    }
    return;
  }
  uint32_t acc = 0;
  for (int64_t u = begin; u < end; ++u) {
    const int i = int(u - begin), s = i % kStages;
    bar_wait(smem(&full[s]), (i / kStages) & 1);
    const uint4 v = *reinterpret_cast<const uint4*>(ring + s * kUnit + (threadIdx.x * 16) % kUnit);
    acc ^= v.x ^ v.w;
    __syncwarp();
    if (lane == 0) bar_arrive(smem(&empty[s]));
  }
  if (acc == 0x12345678) out[0] = acc;
}

// Plain 16-byte loads over layers of 4-132 MB (codes + fp32 scales: (4096, 4096) is 9.4 MB, (14336,
// 4096) 33.0, with nested absmax 30.3, (28672, 8192) 132.1): median of 30 single launches and of 30 chains of launches, one
// per copy, the copies spanning >= 600 MB.
int time_sizes(int sms) {
  const int64_t total = int64_t(600) << 20;
  uint8_t* w;
  uint32_t* out;
  cudaMalloc(&w, total);
  cudaMalloc(&out, 4);
  cudaMemset(w, 1, total);
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  for (const double mb : {4.2, 9.4, 16.8, 30.3, 33.0, 36.7, 73.4, 132.1}) {
    const int64_t bytes = int64_t(mb * 1e6) / 4096 * 4096;
    const int copies = int(std::min<int64_t>(64, total / bytes));
    const auto launch = [&](int c) { seq_kernel<8><<<sms * 8, 256>>>(w + c * bytes, bytes, out); };
    for (int c = 0; c < copies; ++c) launch(c);
    std::vector<float> single, chained;
    for (int r = 0; r < 30; ++r) {
      float ms;
      cudaEventRecord(a);
      launch(r % copies);
      cudaEventRecord(b);
      cudaEventSynchronize(b);
      cudaEventElapsedTime(&ms, a, b);
      single.push_back(ms * 1e3f);
      cudaEventRecord(a);
      for (int c = 0; c < copies; ++c) launch(c);
      cudaEventRecord(b);
      cudaEventSynchronize(b);
      cudaEventElapsedTime(&ms, a, b);
      chained.push_back(ms * 1e3f / copies);
    }
    std::sort(single.begin(), single.end());
    std::sort(chained.begin(), chained.end());
    const cudaError_t e = cudaGetLastError();
    printf("%6.1f MB  single %6.2f us (%.2f TB/s)  back to back x%2d %6.2f us (%.2f TB/s) %s\n", bytes / 1e6,
           single[15], bytes / single[15] / 1e6, copies, chained[15], bytes / chained[15] / 1e6,
           e == cudaSuccess ? "" : cudaGetErrorString(e));
  }
  return 0;
}

int main(int argc, char** argv) {
  int sms;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  if (argc > 2 || (argc == 2 && std::string(argv[1]) != "sizes")) {
    fprintf(stderr, "usage: %s [sizes]\n", argv[0]);
    return 2;
  }
  if (argc == 2) return time_sizes(sms);
  const int64_t n = 28672, row_bytes = 4096, bytes = n * row_bytes;
  const int copies = 4;
  uint8_t* w;
  uint32_t* out;
  cudaMalloc(&w, bytes * copies);
  cudaMalloc(&out, 4);
  cudaMemset(w, 1, bytes * copies);
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  auto time = [&](auto launch, const char* name) {
    for (int i = 0; i < 4; ++i) launch(i % copies);
    std::vector<float> t;
    for (int i = 0; i < 40; ++i) {
      cudaEventRecord(a);
      launch(i % copies);
      cudaEventRecord(b);
      cudaEventSynchronize(b);
      float ms;
      cudaEventElapsedTime(&ms, a, b);
      t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    const cudaError_t e = cudaGetLastError();
    printf("%-40s best %6.1f us median %6.1f us  %5.2f TB/s (median) %s\n", name, t[0] * 1e3, t[20] * 1e3,
           bytes / (t[20] * 1e-3) / 1e12, e == cudaSuccess ? "" : cudaGetErrorString(e));
  };
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found;
  cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found);
  auto encode = reinterpret_cast<decltype(&cuTensorMapEncodeTiled)>(fn);
  CUtensorMap maps[4][3];
  const int box_bytes[3] = {64, 128, 256};
  for (int c = 0; c < copies; ++c)
    for (int j = 0; j < 3; ++j) {
      cuuint64_t dims[2] = {cuuint64_t(row_bytes), cuuint64_t(n)};
      cuuint64_t strides[1] = {cuuint64_t(row_bytes)};
      cuuint32_t box[2] = {cuuint32_t(box_bytes[j]), 256}, elem[2] = {1, 1};
      CUresult r = encode(&maps[c][j], CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, w + c * bytes, dims, strides, box, elem,
                                          CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                                          CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
      if (r != CUDA_SUCCESS) printf("encode failed %d\n", int(r));
    }
  time([&](int c) { seq_kernel<4><<<sms * 8, 256>>>(w + c * bytes, bytes, out); }, "ldg seq U=4 8x256");
  time([&](int c) { seq_kernel<8><<<sms * 8, 256>>>(w + c * bytes, bytes, out); }, "ldg seq U=8 8x256");
  time([&](int c) { seq_kernel<8><<<sms * 4, 512>>>(w + c * bytes, bytes, out); }, "ldg seq U=8 4x512");
#define RING(MODE, UNIT, STAGES, CONS, J, NAME)                                                                   \
  {                                                                                                               \
    auto k = ring_kernel<MODE, UNIT, STAGES, CONS>;                                                               \
    const int sm_bytes = UNIT * STAGES;                                                                           \
    cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, sm_bytes);                               \
    const int64_t units = bytes / UNIT, spt = row_bytes / (UNIT / 256);                                           \
    time([&](int c) { k<<<sms, 32 * (CONS + 1), sm_bytes>>>(maps[c][J], w + c * bytes, units, spt, out); }, NAME); \
  }
  RING(0, 16384, 8, 4, 0, "bulk1d 16K x 8");
  RING(0, 16384, 12, 4, 0, "bulk1d 16K x 12");
  RING(0, 32768, 6, 4, 0, "bulk1d 32K x 6");
  RING(0, 8192, 16, 4, 0, "bulk1d 8K x 16");
  RING(1, 16384, 8, 4, 0, "tma2d 256x64 x 8");
  RING(1, 16384, 12, 4, 0, "tma2d 256x64 x 12");
  RING(1, 32768, 4, 4, 1, "tma2d 256x128 x 4");
  RING(1, 32768, 6, 4, 1, "tma2d 256x128 x 6");
  RING(1, 65536, 3, 4, 2, "tma2d 256x256 x 3");
  return 0;
}
