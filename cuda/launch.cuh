// Launching kernels: device queries cached per device, and programmatic dependent launch.
//
// Programmatic dependent launch (sm_90+) lets a kernel start while the kernel before it in the
// stream is still running: its blocks take SMs as the predecessor's blocks leave, run what does not
// depend on the predecessor (shared-memory setup, L2 prefetches of the weights), and wait
// (wait_for_predecessor) before they read activations or write anything. Measured on the H100
// (torch profiler over CUDA-graph replays of one layer after another, bf16 nf4, batch 1-16), a
// call's memset (1.0-1.6 us), finish kernel (1.2-2.5 us) and the gaps around its kernels (3.4-7.6
// us) were 27-38% of its time on (14336, 4096), (4096, 14336) and (4096, 4096), 14-15% on
// (28672, 8192).
//
// The rules every kernel launched by launch_dependent follows:
//  - before wait_for_predecessor, read no global memory (a predecessor may be writing it) except by
//    L2 prefetch (the L2 is the point of coherence: a prefetched line is never stale), and write none;
//  - call wait_for_predecessor in every block (a kernel's completion then implies its predecessor's,
//    which keeps the chain transitive for the kernel after it);
//  - allow_successor may come any time: the successor's blocks then only wait.
// One exception, two kernels of one call that run side by side (gemm_wgmma_ws.cu's kClusters and
// kRest): the first calls allow_successor only after its wait, so the second's launch implies the
// kernel before the first has completed, and the second waits at its end instead of its start (it
// would otherwise wait for the first to complete): its completion still implies the first's.
#pragma once

#include <algorithm>
#include <atomic>
#include <utility>

#include "common.cuh"

namespace fp4::cuda {

// A device attribute, cached per device (the query costs microseconds per launch).
template <cudaDeviceAttr kAttribute>
int device_attribute(int device, int fallback) {
  static std::atomic<int> cached[64];  // (threads may race to fill it: they store the same value)
  if (device < 0 || device >= 64) return fallback;
  if (cached[device].load() == 0) {
    int value = 0;
    check(cudaDeviceGetAttribute(&value, kAttribute, device), "cudaDeviceGetAttribute");
    cached[device].store(value);
  }
  return cached[device].load();
}
// Multiprocessors on `device`.
inline int sm_count(int device) { return device_attribute<cudaDevAttrMultiProcessorCount>(device, 132); }
// The most dynamic shared memory one block may opt into on `device` (227 KB on sm_90, 163 KB on
// sm_80, 99 KB on sm_86 / sm_89).
inline size_t max_block_smem(int device) {
  return size_t(device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device, 0));
}

// Raises kKernel's dynamic shared-memory limit to `bytes` on `device`, once per device (the call
// costs microseconds per launch).
template <auto kKernel>
void allow_dynamic_smem(int device, size_t bytes) {
  static std::atomic<bool> done[64];  // (threads may race to set it: they set the same value)
  if (device >= 0 && device < 64 && done[device].load()) return;
  check(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
        "cudaFuncSetAttribute");
  if (device >= 0 && device < 64) done[device].store(true);
}

// Waits until the kernels this one depends on have completed and their writes are visible (a
// no-op when not launched as a dependent, and below sm_90).
__device__ __forceinline__ void wait_for_predecessor() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// Lets the next kernel in the stream launch once every block of this one has called it or exited.
__device__ __forceinline__ void allow_successor() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// Asks the L2 to fetch [p, p + bytes) (p and bytes multiples of 16); nothing below sm_90.
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#endif
}

// Whether kernels on `device` launch as dependents of their predecessor: sm_90 and later, unless
// FP4_CUDA_PDL=0 (for measuring and testing both ways).
inline bool dependent_launch_enabled(int device) {
  if (switch_setting("FP4_CUDA_PDL") == 0) return false;
  return device_attribute<cudaDevAttrComputeCapabilityMajor>(device, 0) >= 9;
}

// Launches in clusters of `cluster` blocks along x (sm_90).
inline cudaLaunchAttribute cluster_attribute(unsigned cluster) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim = {cluster, 1, 1};
  return attribute;
}

// The launch of `grid` blocks of `threads` in clusters of `cluster` blocks along x (1: none; sm_90),
// as a programmatic dependent of the stream's previous kernel where dependent_launch_enabled.
struct DependentLaunch {
  cudaLaunchAttribute attributes[2] = {};
  cudaLaunchConfig_t config = {};

  DependentLaunch(int device, dim3 grid, unsigned threads, size_t smem_bytes, cudaStream_t stream,
                  unsigned cluster = 1) {
    config.gridDim = grid;
    config.blockDim = dim3(threads);
    config.dynamicSmemBytes = smem_bytes;
    config.stream = stream;
    config.attrs = attributes;
    if (dependent_launch_enabled(device)) {
      attributes[config.numAttrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attributes[config.numAttrs++].val.programmaticStreamSerializationAllowed = 1;
    }
    if (cluster > 1) attributes[config.numAttrs++] = cluster_attribute(cluster);
  }
};

// kernel<<<grid, threads, smem_bytes, stream>>>(args...) in clusters of `cluster` blocks along x (1:
// none), as a programmatic dependent of the stream's previous kernel where dependent_launch_enabled;
// throws naming `what` if it fails. launch_dependent: without clusters.
template <typename... Params, typename... Args>
void launch_dependent_clusters(int device, unsigned cluster, void (*kernel)(Params...), dim3 grid, unsigned threads,
                               size_t smem_bytes, cudaStream_t stream, const char* what, Args&&... args) {
  DependentLaunch launch(device, grid, threads, smem_bytes, stream, cluster);
  check(cudaLaunchKernelEx(&launch.config, kernel, static_cast<Params>(args)...), what);
}
template <typename... Params, typename... Args>
void launch_dependent(int device, void (*kernel)(Params...), dim3 grid, unsigned threads, size_t smem_bytes,
                      cudaStream_t stream, const char* what, Args&&... args) {
  launch_dependent_clusters(device, 1, kernel, grid, threads, smem_bytes, stream, what, std::forward<Args>(args)...);
}

// How many clusters of `cluster` blocks of kKernel (threads, smem_bytes) `device` runs at once,
// cached per device and cluster size (2-8): a grid of more does not run in one wave.
template <auto kKernel>
int max_active_clusters(int device, unsigned cluster, unsigned threads, size_t smem_bytes) {
  static std::atomic<int> cached[64][9];  // (threads may race to fill it: they store the same value)
  if (device < 0 || device >= 64 || cluster < 2 || cluster > 8) return 0;
  if (cached[device][cluster].load() == 0) {
    cudaLaunchAttribute attribute = cluster_attribute(cluster);
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(cluster);
    config.blockDim = dim3(threads);
    config.dynamicSmemBytes = smem_bytes;
    config.attrs = &attribute;
    config.numAttrs = 1;
    int clusters = 0;
    // (a device or setup that cannot say runs no clusters: the caller's other path, not an error)
    if (cudaOccupancyMaxActiveClusters(&clusters, kKernel, &config) != cudaSuccess) {
      clusters = 0;
      (void)cudaGetLastError();
    }
    cached[device][cluster].store(clusters > 0 ? clusters : -1);
  }
  return std::max(cached[device][cluster].load(), 0);
}

}  // namespace fp4::cuda
