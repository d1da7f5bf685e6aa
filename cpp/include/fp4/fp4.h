/*
 * libfp4 — the public C ABI.
 *
 * Every function:
 *   - takes caller-owned buffers (libfp4 never allocates device memory on a hot path),
 *   - runs on the device and stream named by an fp4_exec (CUDA work goes on that stream, never on
 *     the legacy default stream unless the caller passes NULL for it),
 *   - returns an fp4_status; on failure fp4_last_error() holds a message for this thread that names
 *     the argument and what was expected.
 *
 * Weight layout (the bitsandbytes 4-bit layout): the weight is flattened row-major; element 2i is the
 * high nibble of byte i and element 2i+1 the low nibble. One fp32 absmax per `blocksize` consecutive
 * elements; the last block may be partial. value = code[nibble] * absmax[element / blocksize].
 */
#ifndef FP4_FP4_H
#define FP4_FP4_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#  if defined(FP4_BUILDING_LIBRARY)
#    define FP4_API __declspec(dllexport)
#  else
#    define FP4_API __declspec(dllimport)
#  endif
#else
#  define FP4_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum fp4_status {
  FP4_SUCCESS = 0,
  FP4_ERROR_INVALID_ARGUMENT = 1, /* a pointer, size, dtype or option is wrong */
  FP4_ERROR_NOT_SUPPORTED = 2,    /* valid request this build cannot serve (e.g. CUDA not built) */
  FP4_ERROR_CUDA = 3,             /* the CUDA runtime reported an error */
  FP4_ERROR_INTERNAL = 4
} fp4_status;

typedef enum fp4_dtype { FP4_FLOAT32 = 0, FP4_FLOAT16 = 1, FP4_BFLOAT16 = 2 } fp4_dtype;

/* The 16-entry codebooks of bitsandbytes: "fp4" (sign bit + bnb's e2m1 ordering) and "nf4". */
typedef enum fp4_quant_type { FP4_QUANT_FP4 = 0, FP4_QUANT_NF4 = 1 } fp4_quant_type;

typedef enum fp4_device_type { FP4_DEVICE_CPU = 0, FP4_DEVICE_CUDA = 1 } fp4_device_type;

/* Where a call runs. For CUDA, `device_index` is the ordinal every pointer lives on and `stream`
 * is a cudaStream_t (NULL = legacy default stream). For CPU both are ignored. */
typedef struct fp4_exec {
  fp4_device_type device;
  int device_index;
  void* stream;
} fp4_exec;

/* The per-block scales of a quantized weight, plain or nested ("double quant").
 *  plain : absmax = fp32[num_blocks], nested_codes = NULL.
 *  nested: nested_codes = uint8[num_blocks] (8-bit codes of absmax - offset),
 *          absmax = fp32[ceil(num_blocks / nested_blocksize)] (scales of those codes),
 *          nested_code = fp32[256] (the 8-bit codebook), nested_offset = fp32[1] (the mean that was
 *          subtracted), all on the call's device.
 *          block scale = nested_code[nested_codes[b]] * absmax[b / nested_blocksize] + *nested_offset
 *          (an fp32 multiply then an fp32 add, as bitsandbytes computes it). */
typedef struct fp4_scales {
  const float* absmax;
  const uint8_t* nested_codes;
  const float* nested_code;
  const float* nested_offset;
  int64_t nested_blocksize;
} fp4_scales;

/* ---- library ---------------------------------------------------------------------------- */
FP4_API const char* fp4_version(void);
/* Message describing the last failure on this thread ("" when none). */
FP4_API const char* fp4_last_error(void);
/* 1 when this build contains CUDA kernels. */
FP4_API int fp4_cuda_built(void);
/* Semicolon-separated list of the CUDA architectures compiled in ("" without CUDA). */
FP4_API const char* fp4_cuda_archs(void);
/* How this libfp4 was built: "key=value" pairs separated by ';' (cuda, archs, nvcc, cccl, compiler). */
FP4_API const char* fp4_build_config(void);
/* Number of CUDA devices the runtime sees (0 without CUDA or without a driver). */
FP4_API int fp4_cuda_device_count(void);
/* Threads the CPU kernels may use (default: hardware concurrency). Callers embedded in a framework
 * set this to the framework's own thread count so the two never oversubscribe the cores. */
FP4_API fp4_status fp4_set_num_threads(int num_threads);
FP4_API int fp4_get_num_threads(void);
/* The CPU linear kernels this machine runs: "avx512 amx-bf16" (batches >= 4 in bf16, >= 8 in fp16,
 * >= 16 in fp32 on AMX tiles), "avx512", "avx2" or "generic"; the environment variable
 * FP4_CPU_ISA=avx512 / avx2 / generic lowers them (for testing). */
FP4_API const char* fp4_cpu_kernels(void);

/* ---- 4-bit blockwise quantization (bitsandbytes layout, bit-exact) -------------------------- */
/* Valid blocksizes: 32, 64, 128, 256, 512, 1024, 2048, 4096. Blocks of n elements: ceil(n /
 * blocksize); -1 when n < 0, n > 2^60 or blocksize <= 0. */
FP4_API int64_t fp4_num_blocks(int64_t n, int64_t blocksize);
/* Bytes of packed codes for n elements: ceil(n / 2); -1 when n < 0 or n > 2^60. */
FP4_API int64_t fp4_packed_bytes(int64_t n);

/* Quantize n elements of `input` (dtype) to packed[fp4_packed_bytes(n)] and absmax[num_blocks].
 * Matches bitsandbytes.functional.quantize_4bit on the same device: same bytes, same absmax.
 * Non-finite input (NaN, +-Inf) is rejected on CPU; on CUDA it is the caller's to check. */
FP4_API fp4_status fp4_quantize_4bit(const fp4_exec* exec, fp4_quant_type quant_type, const void* input,
                                     fp4_dtype dtype, int64_t n, int64_t blocksize, uint8_t* packed,
                                     float* absmax);

/* Dequantize n elements to `out` (dtype): out[i] = code[q_i] * scale(block) rounded to dtype. */
FP4_API fp4_status fp4_dequantize_4bit(const fp4_exec* exec, fp4_quant_type quant_type, const uint8_t* packed,
                                       const fp4_scales* scales, int64_t n, int64_t blocksize, void* out,
                                       fp4_dtype dtype);

/* ---- 4-bit linear layer ---------------------------------------------------------------------- */
/* y[m, n] = x[m, k] @ W^T (+ bias[n]), with W[n, k] the 4-bit weight in the bitsandbytes layout
 * (packed, scales, blocksize). x, y and bias share `dtype`; accumulation is fp32. bias may be NULL.
 * CPU: any m. CUDA: the fused GEMV serves m <= fp4_gemv_max_batch(); larger batches are the
 * caller's to run (e.g. fp4_dequantize_4bit into a workspace, then a dense GEMM). */
FP4_API int64_t fp4_gemv_max_batch(void);
FP4_API fp4_status fp4_linear_4bit(const fp4_exec* exec, fp4_quant_type quant_type, const void* x, fp4_dtype dtype,
                                   int64_t m, int64_t k, const uint8_t* packed, const fp4_scales* scales, int64_t n,
                                   int64_t blocksize, const void* bias, void* y);

/* The same product on tensor cores (CUDA, float16/bfloat16 x and y), for any batch m: reads the
 * 4-bit weight once per tile of batch rows (16 to 256), dequantizes on the fly. Needs k % 128 == 0,
 * x and packed 16-byte aligned (FP4_ERROR_NOT_SUPPORTED otherwise). Small batches split k across
 * blocks, and on Hopper a grid's last wave may be shared by all SMs; their partial sums meet in
 * `workspace`: fp4_gemm_4bit_workspace_size(m, n) bytes of device memory on
 * exec's device (contents are scratch; NULL is allowed only when that size is 0; for m <= 16 it is
 * at least 512 KiB per batch row). On GPUs whose blocks hold ~200 KB of shared memory (H100),
 * batches m <= 16 add the split sums in a fixed order: the same inputs give the same bits on every
 * call. 0 when m or n is <= 0; SIZE_MAX (no allocation has it) when the size would overflow. */
FP4_API size_t fp4_gemm_4bit_workspace_size(int64_t m, int64_t n);
FP4_API fp4_status fp4_gemm_4bit(const fp4_exec* exec, fp4_quant_type quant_type, const void* x, fp4_dtype dtype,
                                 int64_t m, int64_t k, const uint8_t* packed, const fp4_scales* scales, int64_t n,
                                 int64_t blocksize, const void* bias, void* y, void* workspace,
                                 size_t workspace_bytes);

/* 1 when fp4_gemm_4bit multiplies batches > 16 with Hopper warpgroup MMA on CUDA device
 * `device_index` (an sm_90 GPU, a library built for sm_90a: see fp4_cuda_archs) for k % 256 == 0 and
 * blocksize >= 64; it then beats or ties dequantize + dense GEMM up to batch ~1024 (measured on the
 * H100). 0 otherwise. */
FP4_API int fp4_gemm_4bit_uses_wgmma(int device_index);

/* ---- nested statistics ("double quant") ------------------------------------------------------- */
/* Compress num_blocks fp32 absmax values: offset = mean(absmax); (absmax - offset) is quantized
 * 8-bit blockwise (nested_blocksize, 256 in bitsandbytes) with the 256-entry `code`, exactly as
 * bitsandbytes.functional.quantize_blockwise does on the same device.
 * offset: fp32[1] on the device. If offset_is_input != 0 it is read (lets a caller reproduce another
 * library's reduction order, e.g. torch's mean); otherwise libfp4 computes the mean and writes it.
 * codes_out: uint8[num_blocks]; absmax2_out: fp32[ceil(num_blocks / nested_blocksize)]. */
FP4_API fp4_status fp4_compress_absmax(const fp4_exec* exec, const float* absmax, int64_t num_blocks,
                                       const float* code, int64_t nested_blocksize, float* offset,
                                       int offset_is_input, uint8_t* codes_out, float* absmax2_out);

/* Expand scales (plain or nested) to fp32[num_blocks]. */
FP4_API fp4_status fp4_expand_absmax(const fp4_exec* exec, const fp4_scales* scales, int64_t num_blocks,
                                     float* absmax_out);

/* The 256-entry signed dynamic 8-bit code bitsandbytes uses for nested absmax (host memory). */
FP4_API void fp4_dynamic_code(float code_out[256]);
/* The 16-entry codebook of a 4-bit format (host memory). */
FP4_API fp4_status fp4_codebook(fp4_quant_type quant_type, float code_out[16]);

#ifdef __cplusplus
}
#endif

#endif /* FP4_FP4_H */
