// The 4-bit linear layer for bf16 activations on Intel AMX (Sapphire Rapids and later).
//
// y^T = W x^T one tile at a time: an A tile is 16 weight rows x 32 columns decoded to bf16, a B tile
// 32 columns x 16 input rows of x in the pairwise (VNNI) layout the tile dot product reads, and a
// C tile 16 x 16 fp32 sums held in a tile register across the whole row. Each A tile serves up to 6
// C tiles (96 input rows) before the next is decoded, so the layer is bound by the decode: three
// vector instructions per 32 weights (a byte permute that spreads the 16 bytes over 32 words, a
// per-word shift to its nibble, a word permute over the block's 16 bf16 values), against the
// per-row FMA kernel's one FMA per 16 weights per input row. Weights are code * scale rounded to
// bf16, as bitsandbytes dequantizes them for a bf16 matmul; sums are fp32.
#include "cpu/linear_amx.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/parallel.hpp"
#include "cpu/scales.hpp"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define FP4_AMX 1
#endif

namespace fp4::cpu {

#ifdef FP4_AMX
namespace {

constexpr int kTileRows = 16;    // A and C rows: weight rows; B and C columns: input rows
constexpr int kTileCols = 32;    // bf16 columns of an A row (64 bytes)
constexpr int kMaxCTiles = 6;    // tiles 2..7 hold sums; 0 is A, 1 is B
constexpr long kReqTilePermission = 0x1023, kTileDataFeature = 18;  // arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)

bool cpu_has_amx_bf16() {
  unsigned a, b, c, d;
  __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
  return (d >> 22 & 1) && (d >> 24 & 1);  // AMX-BF16, AMX-TILE
}

struct TileConfig {
  uint8_t palette, start_row;
  uint8_t reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vbmi,avx512bf16,avx512vl"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vbmi,avx512bf16,avx512vl")
// GCC 12's own avx512fintrin.h trips -W(maybe-)uninitialized (its _mm*_undefined_* idiom).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

// The block's 16 scaled codes as bf16, twice (the word permute reads an index's low 5 bits).
__m512i code_table(const float* code, float scale) {
  const __m256bh values = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(scale)));
  const __m256i v = (__m256i)values;
  return _mm512_inserti64x4(_mm512_castsi256_si512(v), v, 1);
}

// 32 weights from 16 bytes, in element order (high nibble first within a byte), as bf16.
__m512i decode32(const uint8_t* bytes, __m512i table) {
  // Word w takes byte w / 2 (odd bytes of the vector zeroed), shifted so its nibble is lowest.
  const __m512i spread = _mm512_set_epi8(
      0, 15, 0, 15, 0, 14, 0, 14, 0, 13, 0, 13, 0, 12, 0, 12, 0, 11, 0, 11, 0, 10, 0, 10, 0, 9, 0, 9, 0, 8, 0, 8,
      0, 7, 0, 7, 0, 6, 0, 6, 0, 5, 0, 5, 0, 4, 0, 4, 0, 3, 0, 3, 0, 2, 0, 2, 0, 1, 0, 1, 0, 0, 0, 0);
  const __m512i shift = _mm512_set_epi16(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4,
                                         0, 4, 0, 4, 0, 4, 0, 4);
  const __m512i raw = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  const __m512i words = _mm512_maskz_permutexvar_epi8(0x5555555555555555ULL, spread, raw);
  return _mm512_permutexvar_epi16(_mm512_srlv_epi16(words, shift), table);
}

// C tile t (tile register 2 + t) += A x B.
void dot_into(int t) {
  switch (t) {
    case 0: _tile_dpbf16ps(2, 0, 1); break;
    case 1: _tile_dpbf16ps(3, 0, 1); break;
    case 2: _tile_dpbf16ps(4, 0, 1); break;
    case 3: _tile_dpbf16ps(5, 0, 1); break;
    case 4: _tile_dpbf16ps(6, 0, 1); break;
    default: _tile_dpbf16ps(7, 0, 1); break;
  }
}
void store_sums(int t, float* out) {
  switch (t) {
    case 0: _tile_stored(2, out, 64); break;
    case 1: _tile_stored(3, out, 64); break;
    case 2: _tile_stored(4, out, 64); break;
    case 3: _tile_stored(5, out, 64); break;
    case 4: _tile_stored(6, out, 64); break;
    default: _tile_stored(7, out, 64); break;
  }
}

// Features [j_begin, j_end) of y; x_pairs: x in B-tile order ([batch tile][column chunk] 1 KB tiles).
void linear_features(const uint16_t* x_pairs, int64_t m, int64_t k, const uint8_t* packed, const fp4_scales& scales,
                     int64_t n, int64_t blocksize, const float* code, const bfloat16_t* bias, bfloat16_t* y,
                     int64_t j_begin, int64_t j_end) {
  alignas(64) TileConfig config{};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) config.rows[t] = kTileRows, config.bytes_per_row[t] = 64;
  _tile_loadconfig(&config);
  alignas(64) uint16_t a_tile[kTileRows * kTileCols];
  alignas(64) float sums[kTileRows * kTileRows];
  const int64_t chunks = k / kTileCols, blocks_per_row = k / blocksize, batch_tiles = (m + kTileRows - 1) / kTileRows;
  const int chunks_per_block = int(blocksize / kTileCols);
  std::vector<float> row_scales(size_t(kTileRows * blocks_per_row));
  for (int64_t j0 = j_begin; j0 < j_end; j0 += kTileRows) {
    const int features = int(std::min<int64_t>(kTileRows, j_end - j0));
    for (int f = 0; f < features; ++f)
      fill_block_scales(scales, (j0 + f) * blocks_per_row, int(blocks_per_row), &row_scales[f * blocks_per_row]);
    std::memset(a_tile, 0, sizeof(a_tile));  // (rows past the last feature stay zero)
    for (int64_t t0 = 0; t0 < batch_tiles; t0 += kMaxCTiles) {
      const int tiles = int(std::min<int64_t>(kMaxCTiles, batch_tiles - t0));
      _tile_zero(2);
      _tile_zero(3);
      _tile_zero(4);
      _tile_zero(5);
      _tile_zero(6);
      _tile_zero(7);
      __m512i table[kTileRows];
      for (int64_t c = 0; c < chunks; ++c) {
        if (c % chunks_per_block == 0)
          for (int f = 0; f < features; ++f)
            table[f] = code_table(code, row_scales[f * blocks_per_row + c / chunks_per_block]);
        for (int f = 0; f < features; ++f)
          _mm512_store_si512(a_tile + f * kTileCols, decode32(packed + ((j0 + f) * k + c * kTileCols) / 2, table[f]));
        _tile_loadd(0, a_tile, 64);
        for (int t = 0; t < tiles; ++t) {
          _tile_loadd(1, x_pairs + ((t0 + t) * chunks + c) * (kTileRows * kTileCols), 64);
          dot_into(t);
        }
      }
      for (int t = 0; t < tiles; ++t) {
        store_sums(t, sums);
        for (int f = 0; f < features; ++f) {
          const float b = bias ? to_float(bias[j0 + f]) : 0.0f;
          for (int r = 0; r < kTileRows && (t0 + t) * kTileRows + r < m; ++r)
            y[((t0 + t) * kTileRows + r) * n + j0 + f] = from_float<bfloat16_t>(sums[f * kTileRows + r] + b);
        }
      }
    }
  }
  _tile_release();
}

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

}  // namespace

bool amx_bf16_usable() {
  // Linux hands out the tile state only on request, once per process.
  static const bool usable = cpu_has_amx_bf16() && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vbmi") &&
                             syscall(SYS_arch_prctl, kReqTilePermission, kTileDataFeature) == 0;
  return usable;
}

void linear_amx_bf16(const bfloat16_t* x, int64_t m, int64_t k, const uint8_t* packed, const fp4_scales& scales,
                     int64_t n, int64_t blocksize, const Codebook& code, const bfloat16_t* bias, bfloat16_t* y) {
  // x as B tiles: tile (batch tile bt, column chunk c) row r holds, for each of its 16 input rows,
  // columns 32 c + 2 r and 2 r + 1 side by side; rows past the batch are zero.
  const int64_t chunks = k / kTileCols, batch_tiles = (m + kTileRows - 1) / kTileRows;
  std::vector<uint16_t> storage(size_t(batch_tiles * chunks * kTileRows * kTileCols) + 32, 0);
  uint16_t* x_pairs = storage.data() + (32 - reinterpret_cast<uintptr_t>(storage.data()) / 2 % 32) % 32;
  for (int64_t b = 0; b < m; ++b)
    for (int64_t col = 0; col < k; ++col) {
      const int64_t c = col / kTileCols, r = col % kTileCols / 2;
      x_pairs[((b / kTileRows * chunks + c) * kTileRows + r) * kTileCols + (b % kTileRows) * 2 + col % 2] =
          x[b * k + col].bits;
    }
  const int64_t grain = kTileRows * std::max<int64_t>(1, 4096 / k);
  parallel_for((n + kTileRows - 1) / kTileRows, std::max<int64_t>(1, grain / kTileRows), [&](int64_t t0, int64_t t1) {
    linear_features(x_pairs, m, k, packed, scales, n, blocksize, code.data(), bias, y, t0 * kTileRows,
                    std::min(n, t1 * kTileRows));
  });
}

#else
bool amx_bf16_usable() { return false; }
void linear_amx_bf16(const bfloat16_t*, int64_t, int64_t, const uint8_t*, const fp4_scales&, int64_t, int64_t,
                     const Codebook&, const bfloat16_t*, bfloat16_t*) {}
#endif

}  // namespace fp4::cpu
