// A C++ program using libfp4 through its installed CMake package: quantize a weight to NF4 on the
// CPU, dequantize it, and check the result lands within the format's bound.
#include <fp4/fp4.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

int main() {
  const int64_t n = 4096 * 3 + 17, blocksize = 64;
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> normal;
  std::vector<float> w(n), back(n, NAN);
  for (float& v : w) v = normal(rng);

  std::vector<uint8_t> packed(fp4_packed_bytes(n));
  std::vector<float> absmax(fp4_num_blocks(n, blocksize));
  const fp4_exec cpu{FP4_DEVICE_CPU, 0, nullptr};
  if (fp4_quantize_4bit(&cpu, FP4_QUANT_NF4, w.data(), FP4_FLOAT32, n, blocksize, packed.data(), absmax.data()) !=
      FP4_SUCCESS) {
    std::fprintf(stderr, "quantize failed: %s\n", fp4_last_error());
    return 1;
  }
  const fp4_scales scales{absmax.data(), nullptr, nullptr, nullptr, 0};
  if (fp4_dequantize_4bit(&cpu, FP4_QUANT_NF4, packed.data(), &scales, n, blocksize, back.data(), FP4_FLOAT32) !=
      FP4_SUCCESS) {
    std::fprintf(stderr, "dequantize failed: %s\n", fp4_last_error());
    return 1;
  }
  // NF4's widest gap between neighbouring codes is 1 - 0.6962 (at -1): half of it bounds the error.
  double worst = 0.0;
  for (int64_t i = 0; i < n; ++i) worst = std::fmax(worst, std::fabs(back[i] - w[i]) / absmax[i / blocksize]);
  std::printf("libfp4 %s (CUDA built: %d): NF4 round trip of %lld values, worst error %.4f x absmax\n",
              fp4_version(), fp4_cuda_built(), static_cast<long long>(n), worst);
  return worst <= 0.5 * (1.0 - 0.6961928) + 1e-6 ? 0 : 1;
}
