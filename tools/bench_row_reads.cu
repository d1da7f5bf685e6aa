// How fast can the H100 read a row-major 4-bit weight (28672 rows of 4 KB) when each warp covers 32
// rows and steps through them S bytes per row at a time? The answer sets the GEMM kernels' stage
// shape (docs/perf-log.md). Build and run on the GPU:
//   nvcc -O3 -arch=sm_90a -o /tmp/row_reads tools/bench_row_reads.cu && /tmp/row_reads
#include <cstdio>
#include <cstdint>
#include <cuda_runtime.h>
__device__ __forceinline__ uint4 ldg(const uint8_t* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}
template <int S>
__global__ void rows_kernel(const uint8_t* w, int64_t row_bytes, int64_t n, int splits, uint32_t* out) {
  const int lane = threadIdx.x % 32;
  const int64_t gw = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int64_t row_group = gw / splits, split = gw % splits;
  if (row_group * 32 >= n) return;
  const int64_t span = row_bytes / splits, b0 = split * span;
  constexpr int kLanesPerRow = S / 16, kRowsPerInst = 32 / kLanesPerRow, kInst = 32 / kRowsPerInst;
  uint32_t acc = 0;
  const int sub_row = lane / kLanesPerRow, sub_col = lane % kLanesPerRow;
  for (int64_t off = b0; off < b0 + span; off += 2 * S) {
    uint4 v[2][kInst];
#pragma unroll
    for (int u = 0; u < 2; ++u)
#pragma unroll
    for (int i = 0; i < kInst; ++i) {
      const int64_t row = row_group * 32 + i * kRowsPerInst + sub_row;
      v[u][i] = ldg(w + row * row_bytes + off + u * S + sub_col * 16);
    }
#pragma unroll
    for (int u = 0; u < 2; ++u)
#pragma unroll
    for (int i = 0; i < kInst; ++i) acc ^= v[u][i].x ^ v[u][i].y ^ v[u][i].z ^ v[u][i].w;
  }
  if (acc == 0x12345678) out[0] = acc;
}
__global__ void seq_kernel(const uint8_t* w, int64_t bytes, uint32_t* out) {
  uint32_t acc = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x * 16;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 16; i < bytes; i += 4 * stride) {
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = (i + u * stride < bytes) ? ldg(w + i + u * stride) : make_uint4(0,0,0,0);
#pragma unroll
    for (int u = 0; u < 4; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (acc == 0x12345678) out[0] = acc;
}
int main() {
  const int64_t n = 28672, row_bytes = 4096, bytes = n * row_bytes;
  const int copies = 4;
  uint8_t* w; uint32_t* out;
  cudaMalloc(&w, bytes * copies); cudaMalloc(&out, 4);
  cudaMemset(w, 1, bytes * copies);
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  auto time = [&](auto launch, const char* name) {
    for (int i = 0; i < 3; ++i) launch(w + (i % copies) * bytes);
    float best = 1e9, sum = 0;
    for (int i = 0; i < 20; ++i) {
      cudaEventRecord(a); launch(w + (i % copies) * bytes); cudaEventRecord(b); cudaEventSynchronize(b);
      float ms; cudaEventElapsedTime(&ms, a, b); best = ms < best ? ms : best; sum += ms;
    }
    printf("%-28s best %7.1f us  %5.2f TB/s\n", name, best * 1e3, bytes / (best * 1e-3) / 1e12);
  };
  time([&](const uint8_t* p) { seq_kernel<<<132 * 8, 256>>>(p, bytes, out); }, "sequential");
  for (int splits : {1, 2, 4, 8}) {
    char name[64];
    const int64_t warps = (n / 32) * splits;
    sprintf(name, "S=64  splits=%d", splits);
    time([&](const uint8_t* p) { rows_kernel<64><<<(warps * 32 + 255) / 256, 256>>>(p, row_bytes, n, splits, out); }, name);
    sprintf(name, "S=128 splits=%d", splits);
    time([&](const uint8_t* p) { rows_kernel<128><<<(warps * 32 + 255) / 256, 256>>>(p, row_bytes, n, splits, out); }, name);
    sprintf(name, "S=256 splits=%d", splits);
    time([&](const uint8_t* p) { rows_kernel<256><<<(warps * 32 + 255) / 256, 256>>>(p, row_bytes, n, splits, out); }, name);
    sprintf(name, "S=512 splits=%d", splits);
    time([&](const uint8_t* p) { rows_kernel<512><<<(warps * 32 + 255) / 256, 256>>>(p, row_bytes, n, splits, out); }, name);
  }
  return 0;
}
