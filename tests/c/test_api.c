/* Calls the C API directly, from C: quantize and dequantize on the CPU, nested statistics, and the
 * status/message contract for bad arguments. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp4/fp4.h"

static int checks = 0, failures = 0;
#define EXPECT(cond, ...)                                         \
  do {                                                            \
    ++checks;                                                     \
    if (!(cond)) {                                                \
      fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);        \
      fprintf(stderr, __VA_ARGS__);                               \
      fprintf(stderr, "\n");                                      \
      ++failures;                                                 \
    }                                                             \
  } while (0)

/* A deterministic pseudo-random normal sample (no zeros, fresh per seed). */
static float next_normal(unsigned* state) {
  float s = 0.0f;
  for (int i = 0; i < 12; ++i) {
    *state = *state * 1664525u + 1013904223u;
    s += (float)(*state >> 8) / 16777216.0f;
  }
  return s - 6.0f;
}

static void round_trip(fp4_quant_type type, int64_t n, int64_t blocksize, int nested, unsigned seed) {
  const fp4_exec cpu = {FP4_DEVICE_CPU, 0, NULL};
  float* x = malloc(sizeof(float) * n);
  float* y = malloc(sizeof(float) * n);
  uint8_t* packed = malloc(fp4_packed_bytes(n));
  const int64_t blocks = fp4_num_blocks(n, blocksize);
  float* absmax = malloc(sizeof(float) * blocks);
  uint8_t* qabsmax = malloc(blocks);
  float* absmax2 = malloc(sizeof(float) * (blocks / 256 + 1));
  float code8[256], code4[16], offset = 0.0f;
  for (int64_t i = 0; i < n; ++i) x[i] = next_normal(&seed);
  for (int64_t i = 0; i < n; ++i) y[i] = NAN; /* poison: every element must be written */

  EXPECT(fp4_quantize_4bit(&cpu, type, x, FP4_FLOAT32, n, blocksize, packed, absmax) == FP4_SUCCESS, "quantize: %s",
         fp4_last_error());
  fp4_scales scales = {absmax, NULL, NULL, NULL, 0};
  if (nested) {
    fp4_dynamic_code(code8);
    EXPECT(fp4_compress_absmax(&cpu, absmax, blocks, code8, 256, &offset, 0, qabsmax, absmax2) == FP4_SUCCESS,
           "compress: %s", fp4_last_error());
    scales.absmax = absmax2;
    scales.nested_codes = qabsmax;
    scales.nested_code = code8;
    scales.nested_offset = &offset;
    scales.nested_blocksize = 256;
  }
  EXPECT(fp4_dequantize_4bit(&cpu, type, packed, &scales, n, blocksize, y, FP4_FLOAT32) == FP4_SUCCESS,
         "dequantize: %s", fp4_last_error());

  /* Each value lands on the nearest code point of its block: the error is at most half the widest
   * gap between neighbouring codes times the block absmax. Nested statistics add the 8-bit error of
   * the scale, at most ~1% of the largest deviation of any absmax from their mean. */
  fp4_codebook(type, code4);
  float max_gap = 0.0f, largest_absmax = 0.0f;
  for (int q = 0; q < 16; ++q)
    for (int r = 0; r < 16; ++r) {
      float gap = code4[r] - code4[q], inside = 0;
      for (int k = 0; k < 16; ++k) inside += code4[k] > code4[q] && code4[k] < code4[r];
      if (gap > 0 && inside == 0 && gap > max_gap) max_gap = gap;
    }
  for (int64_t b = 0; b < blocks; ++b) largest_absmax = fmaxf(largest_absmax, absmax[b]);
  for (int64_t i = 0; i < n; ++i) {
    const float am = absmax[i / blocksize];
    const float tol = 0.5f * max_gap * am * 1.0001f + (nested ? 0.01f * largest_absmax : 0.0f) + 1e-6f;
    if (!(fabsf(y[i] - x[i]) <= tol)) {
      EXPECT(0, "type %d n %lld bs %lld nested %d: |y-x| = %g > %g at %lld", (int)type, (long long)n,
             (long long)blocksize, nested, fabsf(y[i] - x[i]), tol, (long long)i);
      break;
    }
  }
  free(x), free(y), free(packed), free(absmax), free(qabsmax), free(absmax2);
}

static void bad_arguments(void) {
  const fp4_exec cpu = {FP4_DEVICE_CPU, 0, NULL};
  /* The size helpers: -1 (or SIZE_MAX for a workspace) rather than a wrapped value past 2^60. */
  EXPECT(fp4_num_blocks(INT64_MAX, 64) == -1 && fp4_num_blocks(-1, 64) == -1 && fp4_num_blocks(64, 0) == -1,
         "num_blocks of an impossible count: %lld", (long long)fp4_num_blocks(INT64_MAX, 64));
  EXPECT(fp4_num_blocks((int64_t)1 << 60, 64) == ((int64_t)1 << 54) && fp4_num_blocks(65, 64) == 2,
         "num_blocks at the bounds");
  EXPECT(fp4_packed_bytes(INT64_MAX) == -1 && fp4_packed_bytes(-1) == -1 && fp4_packed_bytes(3) == 2,
         "packed_bytes of an impossible count: %lld", (long long)fp4_packed_bytes(INT64_MAX));
  EXPECT(fp4_gemm_4bit_workspace_size(INT64_MAX, INT64_MAX) == SIZE_MAX &&
             fp4_gemm_4bit_workspace_size((int64_t)1 << 40, (int64_t)1 << 40) == SIZE_MAX,
         "workspace size wrapped: %zu", fp4_gemm_4bit_workspace_size((int64_t)1 << 40, (int64_t)1 << 40));
  EXPECT(fp4_gemm_4bit_workspace_size(0, 5) == 0 && fp4_gemm_4bit_workspace_size(-1, 5) == 0, "empty workspace");
  float x[64] = {1.0f};
  uint8_t packed[32];
  float absmax[2];
  EXPECT(fp4_quantize_4bit(&cpu, FP4_QUANT_FP4, x, FP4_FLOAT32, 64, 48, packed, absmax) == FP4_ERROR_INVALID_ARGUMENT,
         "blocksize 48 accepted");
  EXPECT(strstr(fp4_last_error(), "blocksize") != NULL, "message does not name blocksize: %s", fp4_last_error());
  EXPECT(fp4_quantize_4bit(&cpu, (fp4_quant_type)7, x, FP4_FLOAT32, 64, 64, packed, absmax) ==
             FP4_ERROR_INVALID_ARGUMENT,
         "quant_type 7 accepted");
  EXPECT(strstr(fp4_last_error(), "quant_type") != NULL, "message: %s", fp4_last_error());
  EXPECT(fp4_quantize_4bit(&cpu, FP4_QUANT_FP4, NULL, FP4_FLOAT32, 64, 64, packed, absmax) ==
             FP4_ERROR_INVALID_ARGUMENT,
         "NULL input accepted");
  EXPECT(strstr(fp4_last_error(), "input") != NULL, "message: %s", fp4_last_error());
  x[3] = NAN;
  EXPECT(fp4_quantize_4bit(&cpu, FP4_QUANT_FP4, x, FP4_FLOAT32, 64, 64, packed, absmax) ==
             FP4_ERROR_INVALID_ARGUMENT,
         "NaN accepted");
  EXPECT(fp4_quantize_4bit(NULL, FP4_QUANT_FP4, x, FP4_FLOAT32, 64, 64, packed, absmax) ==
             FP4_ERROR_INVALID_ARGUMENT,
         "NULL exec accepted");
  const fp4_exec gpu = {FP4_DEVICE_CUDA, 0, NULL};
  fp4_status s = fp4_quantize_4bit(&gpu, FP4_QUANT_FP4, x, FP4_FLOAT32, 64, 64, packed, absmax);
  EXPECT(s == FP4_ERROR_NOT_SUPPORTED || s == FP4_ERROR_INVALID_ARGUMENT, "host pointers on CUDA accepted (%d)", s);
  EXPECT(fp4_quantize_4bit(&cpu, FP4_QUANT_FP4, x, FP4_FLOAT32, 0, 64, packed, absmax) == FP4_SUCCESS,
         "n = 0 must be a no-op");
  EXPECT(strcmp(fp4_last_error(), "") == 0, "success leaves a message: %s", fp4_last_error());
}

int main(void) {
  printf("libfp4 %s, CUDA built: %d\n", fp4_version(), fp4_cuda_built());
  const int64_t sizes[] = {1, 63, 64, 1000, 4097, 70001};
  const int64_t blocksizes[] = {32, 64, 128, 256, 512, 1024, 2048, 4096};
  unsigned seed = 12345u;
  for (int t = 0; t < 2; ++t)
    for (size_t s = 0; s < sizeof sizes / sizeof *sizes; ++s)
      for (size_t b = 0; b < sizeof blocksizes / sizeof *blocksizes; ++b)
        for (int nested = 0; nested < 2; ++nested)
          round_trip((fp4_quant_type)t, sizes[s], blocksizes[b], nested, seed++);
  bad_arguments();
  printf("%d passed, %d failed\n", checks - failures, failures);
  return failures ? 1 : 0;
}
