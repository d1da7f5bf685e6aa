// Device selection, pointer checks and device queries.
#include "common.cuh"
#include "kernels.hpp"

namespace fp4::cuda {

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver / no device: not an error for a query
    return 0;
  }
  return count;
}

DeviceGuard::DeviceGuard(int device_index) {
  check(cudaGetDevice(&previous_), "cudaGetDevice");
  if (previous_ != device_index) check(cudaSetDevice(device_index), "cudaSetDevice");
}

DeviceGuard::~DeviceGuard() {
  int current = -1;
  if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
}

void check_device_pointer(const void* ptr, int device_index, const char* name) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
    cudaGetLastError();
    invalid_argument(name, ": not a pointer the CUDA runtime knows");
  }
  const bool on_device = attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged;
  if (!on_device) invalid_argument(name, ": expected CUDA device memory, got host memory");
  if (attr.type == cudaMemoryTypeDevice && attr.device != device_index)
    invalid_argument(name, ": expected memory on cuda:", device_index, ", got cuda:", attr.device);
}

}  // namespace fp4::cuda
