// The C entry points: check every argument (naming it in the message), then dispatch to the CPU
// or CUDA implementation. Nothing here does arithmetic.
#include <cstdint>
#include <cstring>
#include <string>

#include "build_config.h"
#include "cpu/kernels.hpp"
#include "cpu/parallel.hpp"
#include "error.hpp"
#include "formats.hpp"
#include "fp4/fp4.h"

#ifdef FP4_WITH_CUDA
#include "kernels.hpp"  // cuda/kernels.hpp
#endif


namespace fp4 {
namespace {

constexpr int64_t kMaxElements = int64_t(1) << 60;

void check_not_null(const void* p, const char* name) {
  if (p == nullptr) invalid_argument(name, ": must not be NULL");
}

void check_quant_type(fp4_quant_type t) {
  if (t != FP4_QUANT_FP4 && t != FP4_QUANT_NF4)
    invalid_argument("quant_type: expected FP4_QUANT_FP4 (0) or FP4_QUANT_NF4 (1), got ", int(t));
}

void check_dtype(fp4_dtype d, const char* name) {
  if (d != FP4_FLOAT32 && d != FP4_FLOAT16 && d != FP4_BFLOAT16)
    invalid_argument(name, ": expected FP4_FLOAT32, FP4_FLOAT16 or FP4_BFLOAT16, got ", int(d));
}

void check_count(int64_t n, const char* name) {
  if (n < 0 || n > kMaxElements) invalid_argument(name, ": expected 0 <= ", name, " <= 2^60, got ", n);
}

void check_blocksize(int64_t blocksize) {
  if (!valid_blocksize(blocksize))
    invalid_argument("blocksize: expected one of 32, 64, 128, 256, 512, 1024, 2048, 4096, got ", blocksize);
}

const fp4_exec& check_exec(const fp4_exec* exec) {
  check_not_null(exec, "exec");
  if (exec->device == FP4_DEVICE_CPU) return *exec;
  if (exec->device != FP4_DEVICE_CUDA)
    invalid_argument("exec.device: expected FP4_DEVICE_CPU or FP4_DEVICE_CUDA, got ", int(exec->device));
#ifdef FP4_WITH_CUDA
  const int count = cuda::device_count();
  if (exec->device_index < 0 || exec->device_index >= count)
    invalid_argument("exec.device_index: expected 0 <= index < ", count, " (visible CUDA devices), got ",
                     exec->device_index);
  return *exec;
#else
  fail(FP4_ERROR_NOT_SUPPORTED, "exec.device: this libfp4 was built without CUDA (configure with -DFP4_CUDA=ON)");
#endif
}

// Pointers handed to a CUDA call must be device memory of that device.
void check_memory(const fp4_exec& exec, const void* p, const char* name) {
  check_not_null(p, name);
#ifdef FP4_WITH_CUDA
  if (exec.device == FP4_DEVICE_CUDA) cuda::check_device_pointer(p, exec.device_index, name);
#else
  (void)exec;
#endif
}

void check_scales(const fp4_exec& exec, const fp4_scales* scales) {
  check_not_null(scales, "scales");
  check_memory(exec, scales->absmax, "scales.absmax");
  if (scales->nested_codes == nullptr) return;
  check_memory(exec, scales->nested_codes, "scales.nested_codes");
  check_memory(exec, scales->nested_code, "scales.nested_code");
  check_memory(exec, scales->nested_offset, "scales.nested_offset");
  if (scales->nested_blocksize <= 0)
    invalid_argument("scales.nested_blocksize: expected a positive block size, got ", scales->nested_blocksize);
}

}  // namespace
}  // namespace fp4

using namespace fp4;

extern "C" {

const char* fp4_version(void) { return FP4_VERSION_STRING; }

int fp4_cuda_built(void) {
#ifdef FP4_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

const char* fp4_cuda_archs(void) { return FP4_CUDA_ARCHS; }

const char* fp4_build_config(void) { return FP4_BUILD_CONFIG; }

int fp4_cuda_device_count(void) {
#ifdef FP4_WITH_CUDA
  return cuda::device_count();
#else
  return 0;
#endif
}

fp4_status fp4_set_num_threads(int num_threads) {
  return guarded(__func__, [&] {
    if (num_threads < 1) invalid_argument("num_threads: expected >= 1, got ", num_threads);
    cpu::set_num_threads(num_threads);
  });
}

int fp4_get_num_threads(void) { return cpu::num_threads(); }

const char* fp4_cpu_kernels(void) { return cpu::linear_kernels(); }

int64_t fp4_num_blocks(int64_t n, int64_t blocksize) {
  if (n < 0 || n > kMaxElements || blocksize <= 0) return -1;  // (n + blocksize - 1 would overflow past 2^63)
  return (n + blocksize - 1) / blocksize;
}

int64_t fp4_packed_bytes(int64_t n) { return n < 0 || n > kMaxElements ? -1 : (n + 1) / 2; }

fp4_status fp4_quantize_4bit(const fp4_exec* exec, fp4_quant_type quant_type, const void* input, fp4_dtype dtype,
                             int64_t n, int64_t blocksize, uint8_t* packed, float* absmax) {
  return guarded(__func__, [&] {
    const fp4_exec& ex = check_exec(exec);
    check_quant_type(quant_type);
    check_dtype(dtype, "dtype");
    check_count(n, "n");
    check_blocksize(blocksize);
    if (n == 0) return;
    check_memory(ex, input, "input");
    check_memory(ex, packed, "packed");
    check_memory(ex, absmax, "absmax");
    if (ex.device == FP4_DEVICE_CPU) return cpu::quantize_4bit(quant_type, input, dtype, n, blocksize, packed, absmax);
#ifdef FP4_WITH_CUDA
    cuda::DeviceGuard guard(ex.device_index);
    cuda::quantize_4bit(ex, quant_type, input, dtype, n, blocksize, packed, absmax);
#endif
  });
}

fp4_status fp4_dequantize_4bit(const fp4_exec* exec, fp4_quant_type quant_type, const uint8_t* packed,
                               const fp4_scales* scales, int64_t n, int64_t blocksize, void* out, fp4_dtype dtype) {
  return guarded(__func__, [&] {
    const fp4_exec& ex = check_exec(exec);
    check_quant_type(quant_type);
    check_dtype(dtype, "dtype");
    check_count(n, "n");
    check_blocksize(blocksize);
    if (n == 0) return;
    check_memory(ex, packed, "packed");
    check_scales(ex, scales);
    check_memory(ex, out, "out");
    if (ex.device == FP4_DEVICE_CPU) return cpu::dequantize_4bit(quant_type, packed, *scales, n, blocksize, out, dtype);
#ifdef FP4_WITH_CUDA
    cuda::DeviceGuard guard(ex.device_index);
    cuda::dequantize_4bit(ex, quant_type, packed, *scales, n, blocksize, out, dtype);
#endif
  });
}

int64_t fp4_gemv_max_batch(void) {
#ifdef FP4_WITH_CUDA
  return cuda::gemv_max_batch();
#else
  return 0;
#endif
}

// The arguments fp4_linear_4bit and fp4_gemm_4bit share: format, dtype and the shape [m, k] x [n, k].
static void check_linear_shape(fp4_quant_type quant_type, fp4_dtype dtype, int64_t m, int64_t k, int64_t n,
                               int64_t blocksize) {
  check_quant_type(quant_type);
  check_dtype(dtype, "dtype");
  check_count(m, "m");
  check_count(k, "k");
  check_count(n, "n");
  check_blocksize(blocksize);
  if (n > 0 && k > kMaxElements / n) invalid_argument("n, k: the weight has more than 2^60 elements");
}

fp4_status fp4_linear_4bit(const fp4_exec* exec, fp4_quant_type quant_type, const void* x, fp4_dtype dtype, int64_t m,
                           int64_t k, const uint8_t* packed, const fp4_scales* scales, int64_t n, int64_t blocksize,
                           const void* bias, void* y) {
  return guarded(__func__, [&] {
    const fp4_exec& ex = check_exec(exec);
    check_linear_shape(quant_type, dtype, m, k, n, blocksize);
    if (m == 0 || n == 0) return;
    check_memory(ex, y, "y");
    if (bias != nullptr) check_memory(ex, bias, "bias");
    if (k == 0) invalid_argument("k: expected in_features >= 1, got 0");
    check_memory(ex, x, "x");
    check_memory(ex, packed, "packed");
    check_scales(ex, scales);
    if (ex.device == FP4_DEVICE_CPU)
      return cpu::linear_4bit(quant_type, x, dtype, m, k, packed, *scales, n, blocksize, bias, y);
#ifdef FP4_WITH_CUDA
    if (m > cuda::gemv_max_batch())
      fail(FP4_ERROR_NOT_SUPPORTED, "m: the CUDA GEMV takes batches up to ", cuda::gemv_max_batch(), ", got ", m,
           "; dequantize and use a dense GEMM for larger batches");
    cuda::DeviceGuard guard(ex.device_index);
    cuda::linear_4bit(ex, quant_type, x, dtype, m, k, packed, *scales, n, blocksize, bias, y);
#endif
  });
}

size_t fp4_gemm_4bit_workspace_size(int64_t m, int64_t n) {
  if (m <= 0 || n <= 0) return 0;
  // (a size no allocation can have, rather than a wrapped product that fp4_gemm_4bit would accept)
  if (m > kMaxElements || n > kMaxElements || uint64_t(m) > SIZE_MAX / 1024 / uint64_t(n)) return SIZE_MAX;
#ifdef FP4_WITH_CUDA
  return cuda::gemm_4bit_workspace_size(m, n);
#else
  return size_t(m) * size_t(n) * sizeof(float);  // (the GEMM runs on CUDA only)
#endif
}

fp4_status fp4_gemm_4bit(const fp4_exec* exec, fp4_quant_type quant_type, const void* x, fp4_dtype dtype, int64_t m,
                         int64_t k, const uint8_t* packed, const fp4_scales* scales, int64_t n, int64_t blocksize,
                         const void* bias, void* y, void* workspace, size_t workspace_bytes) {
  return guarded(__func__, [&] {
    const fp4_exec& ex = check_exec(exec);
    check_linear_shape(quant_type, dtype, m, k, n, blocksize);
    if (ex.device != FP4_DEVICE_CUDA) fail(FP4_ERROR_NOT_SUPPORTED, "exec: fp4_gemm_4bit runs on CUDA only");
    if (dtype == FP4_FLOAT32) fail(FP4_ERROR_NOT_SUPPORTED, "dtype: the tensor-core GEMM takes float16 or bfloat16");
    if (k % 128 != 0) fail(FP4_ERROR_NOT_SUPPORTED, "k: the tensor-core GEMM needs in_features % 128 == 0, got ", k);
    if (m == 0 || n == 0) return;
    check_memory(ex, x, "x");
    check_memory(ex, packed, "packed");
    check_memory(ex, y, "y");
    if (bias != nullptr) check_memory(ex, bias, "bias");
    check_scales(ex, scales);
    if (reinterpret_cast<uintptr_t>(x) % 16 != 0 || reinterpret_cast<uintptr_t>(packed) % 16 != 0)
      fail(FP4_ERROR_NOT_SUPPORTED, "x, packed: the tensor-core GEMM needs x and packed 16-byte aligned");
    const size_t needed = fp4_gemm_4bit_workspace_size(m, n);
    if (workspace_bytes < needed)
      invalid_argument("workspace_bytes: expected at least ", needed, " (fp4_gemm_4bit_workspace_size), got ",
                       workspace_bytes);
    check_memory(ex, workspace, "workspace");
#ifdef FP4_WITH_CUDA
    cuda::DeviceGuard guard(ex.device_index);
    cuda::gemm_4bit(ex, quant_type, x, dtype, m, k, packed, *scales, n, blocksize, bias, y, workspace);
#endif
  });
}

int fp4_gemm_4bit_uses_wgmma(int device_index) {
#ifdef FP4_WITH_CUDA
  try {
    return device_index >= 0 && device_index < cuda::device_count() && cuda::gemm_4bit_wgmma_available(device_index);
  } catch (...) {
    return 0;
  }
#else
  (void)device_index;
  return 0;
#endif
}

fp4_status fp4_compress_absmax(const fp4_exec* exec, const float* absmax, int64_t num_blocks, const float* code,
                               int64_t nested_blocksize, float* offset, int offset_is_input, uint8_t* codes_out,
                               float* absmax2_out) {
  return guarded(__func__, [&] {
    const fp4_exec& ex = check_exec(exec);
    check_count(num_blocks, "num_blocks");
    if (nested_blocksize <= 0 || nested_blocksize > 4096)
      invalid_argument("nested_blocksize: expected 1..4096 (bitsandbytes uses 256), got ", nested_blocksize);
    check_memory(ex, offset, "offset");
    if (num_blocks == 0) invalid_argument("num_blocks: the mean of zero absmax values is undefined; expected >= 1");
    check_memory(ex, absmax, "absmax");
    check_memory(ex, code, "code");
    check_memory(ex, codes_out, "codes_out");
    check_memory(ex, absmax2_out, "absmax2_out");
    if (ex.device == FP4_DEVICE_CPU)
      return cpu::compress_absmax(absmax, num_blocks, code, nested_blocksize, offset, offset_is_input != 0,
                                  codes_out, absmax2_out);
#ifdef FP4_WITH_CUDA
    cuda::DeviceGuard guard(ex.device_index);
    cuda::compress_absmax(ex, absmax, num_blocks, code, nested_blocksize, offset, offset_is_input != 0, codes_out,
                          absmax2_out);
#endif
  });
}

fp4_status fp4_expand_absmax(const fp4_exec* exec, const fp4_scales* scales, int64_t num_blocks, float* absmax_out) {
  return guarded(__func__, [&] {
    const fp4_exec& ex = check_exec(exec);
    check_count(num_blocks, "num_blocks");
    if (num_blocks == 0) return;
    check_scales(ex, scales);
    check_memory(ex, absmax_out, "absmax_out");
    if (ex.device == FP4_DEVICE_CPU) return cpu::expand_absmax(*scales, num_blocks, absmax_out);
#ifdef FP4_WITH_CUDA
    cuda::DeviceGuard guard(ex.device_index);
    cuda::expand_absmax(ex, *scales, num_blocks, absmax_out);
#endif
  });
}

void fp4_dynamic_code(float code_out[256]) {
  if (code_out != nullptr) std::memcpy(code_out, kDynamicCode.data(), sizeof(float) * 256);
}

fp4_status fp4_codebook(fp4_quant_type quant_type, float code_out[16]) {
  return guarded(__func__, [&] {
    check_quant_type(quant_type);
    check_not_null(code_out, "code_out");
    std::memcpy(code_out, codebook(quant_type).data(), sizeof(float) * 16);
  });
}

}  // extern "C"
