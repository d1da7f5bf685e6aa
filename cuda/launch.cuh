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
#pragma once

#include <atomic>

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

// kernel<<<grid, threads, smem_bytes, stream>>>(args...) as a programmatic dependent of the
// stream's previous kernel where dependent_launch_enabled; throws naming `what` if it fails.
template <typename... Params, typename... Args>
void launch_dependent(int device, void (*kernel)(Params...), dim3 grid, unsigned threads, size_t smem_bytes,
                      cudaStream_t stream, const char* what, Args&&... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = dependent_launch_enabled(device) ? 1 : 0;
  check(cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...), what);
}

}  // namespace fp4::cuda
