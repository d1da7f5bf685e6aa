// The 4-bit linear layer on Intel AMX tiles (Sapphire Rapids and later).
//
// y^T = W x^T one tile at a time: an A tile is 16 weight rows x 32 columns decoded to bf16, a B tile
// 32 columns x 16 input rows of x in the pairwise (VNNI) layout the tile dot product reads, and a
// C tile 16 x 16 fp32 sums held in a tile register across the whole row. Each decoded A tile serves
// every C tile of the pass before the next is decoded, so the layer is bound by the decode: three
// vector instructions per 32 weights (a byte permute that spreads the 16 bytes over 32 words, a
// per-word shift to its nibble, a word permute over the block's 16 bf16 values), against the
// vector kernel's one FMA per 16 weights per input row.
//
// Tiles multiply bf16, so wider activations are split exactly into P bf16 parts (fp16: 2, whose 11
// significant bits fit in 16; fp32: 3) and so are the fp32 weights code * scale (truncated parts
// and a rounded last one: 16 or 24 significant bits), and the tile products a_i b_j with i + j < P
// are summed (3 or 6 per tile; the ones left out are below 2^-16 / 2^-24 of the product). bf16
// activations take the weights rounded to bf16 (P = 1), as bitsandbytes dequantizes them for a
// bf16 matmul. Sums are fp32 throughout.
#include "cpu/linear_amx.hpp"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/avx512_load.hpp"
#include "cpu/avx512_store.hpp"
#include "cpu/isa.hpp"
#include "cpu/parallel.hpp"
#include "cpu/scales.hpp"

// (Linux on x86-64 only: the tile state is granted through arch_prctl)
#if defined(__linux__) && defined(__x86_64__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define FP4_AMX 1
#endif

namespace fp4::cpu {

#ifdef FP4_AMX
namespace {

constexpr int kTileRows = 16;  // A and C rows: weight rows; B and C columns: input rows
constexpr int kTileCols = 32;  // bf16 columns of an A row (64 bytes)
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

// The bf16 parts of an activation type: tiles 0..P-1 hold the A parts, tile P the B part being
// used, tiles P+1..7 the sums.
template <typename T>
constexpr int kParts = std::is_same_v<T, bfloat16_t> ? 1 : std::is_same_v<T, half_t> ? 2 : 3;

FP4_TARGET_BEGIN("amx-tile,amx-bf16,avx512f,avx512bw,avx512vbmi,avx512bf16,avx512vl")

// 16 bf16 values, twice (the word permute reads an index's low 5 bits).
__m512i twice(__m256i v) { return _mm512_inserti64x4(_mm512_castsi256_si512(v), v, 1); }

// Splits 16 fp32 values into P bf16 parts whose sum is each value: truncated parts (the rest is
// exact in fp32) and a last one rounded to nearest even (P = 1: just that).
template <int P>
void bf16_parts(__m512 rest, __m256i (&parts)[P]) {
  for (int i = 0; i < P; ++i) {
    if (i == P - 1) {
      parts[i] = (__m256i)_mm512_cvtneps_pbh(rest);
    } else {
      const __m512i bits = _mm512_castps_si512(rest);
      parts[i] = _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16));
      rest = _mm512_sub_ps(rest, _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32(int(0xffff0000u)))));
    }
  }
}

// The block's 16 scaled codes in P bf16 parts, each twice.
template <int P>
void code_tables(const float* code, float scale, __m512i (&tables)[P]) {
  __m256i parts[P];
  bf16_parts<P>(_mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(scale)), parts);
  for (int i = 0; i < P; ++i) tables[i] = twice(parts[i]);
}

using avx512_load::load16;

// x in P bf16 parts as B tiles (part j at base + j * part_elements): tile (batch tile bt, column
// chunk c) row r holds, for each of its 16 input rows, columns 32 c + 2 r and 2 r + 1 side by side
// (rows past the batch stay zero). Each row's 32 columns become 16 pairs per part, transposed into
// the tile a 16 x 16 block at a time.
template <int P, typename T>
void pack_activations(const T* x, int64_t m, int64_t k, uint16_t* base, size_t part_elements) {
  const int64_t chunks = k / kTileCols;
  alignas(64) uint32_t rows[P][kTileRows][kTileRows];  // [part][input row][pair]
  for (int64_t b0 = 0; b0 < m; b0 += kTileRows) {
    const int batch = int(std::min<int64_t>(kTileRows, m - b0));
    std::memset(rows, 0, sizeof(rows));
    for (int64_t c = 0; c < chunks; ++c) {
      for (int bb = 0; bb < batch; ++bb) {
        const T* in = x + (b0 + bb) * k + c * kTileCols;
        if constexpr (P == 1) {
          std::memcpy(rows[0][bb], in, 64);  // (bf16 pairs as they are)
        } else {
          __m256i low[P], high[P];
          bf16_parts<P>(load16(in), low);
          bf16_parts<P>(load16(in + 16), high);
          for (int j = 0; j < P; ++j)
            _mm512_store_si512(rows[j][bb], _mm512_inserti64x4(_mm512_castsi256_si512(low[j]), high[j], 1));
        }
      }
      uint32_t* tile = reinterpret_cast<uint32_t*>(base) + (b0 / kTileRows * chunks + c) * kTileRows * kTileRows;
      for (int j = 0; j < P; ++j)
        for (int r = 0; r < kTileRows; ++r)
          for (int bb = 0; bb < kTileRows; ++bb) tile[j * part_elements / 2 + r * kTileRows + bb] = rows[j][bb][r];
    }
  }
}

// The code indices of 32 weights from 16 bytes, one per word in element order (high nibble first
// within a byte), in each word's low 4 bits.
__m512i code_indices(const uint8_t* bytes) {
  // Word w takes byte w / 2 (the odd bytes of the vector zeroed), shifted so its nibble is lowest.
  const __m512i spread = _mm512_set_epi8(
      0, 15, 0, 15, 0, 14, 0, 14, 0, 13, 0, 13, 0, 12, 0, 12, 0, 11, 0, 11, 0, 10, 0, 10, 0, 9, 0, 9, 0, 8, 0, 8,
      0, 7, 0, 7, 0, 6, 0, 6, 0, 5, 0, 5, 0, 4, 0, 4, 0, 3, 0, 3, 0, 2, 0, 2, 0, 1, 0, 1, 0, 0, 0, 0);
  const __m512i shift = _mm512_set_epi16(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4,
                                         0, 4, 0, 4, 0, 4, 0, 4);
  const __m512i raw = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  return _mm512_srlv_epi16(_mm512_maskz_permutexvar_epi8(0x5555555555555555ULL, spread, raw), shift);
}

// y[r][f] = sums[f][r] + bias[f] for input rows r < rows (y's row stride n) and features f <
// features: a sum tile row holds one feature's sums, so each row of y gathers a column of the tile.
// (Scalar stores, one value at a time across y's rows, were 0.74 of 3.7 ms at (4096, 4096) bf16
// batch 128.)
template <typename T>
void store_sum_tile(const float* sums, const float* bias, int features, int rows, T* y, int64_t n) {
  const __m512i column =
      _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(kTileRows));
  const __mmask16 live = __mmask16((1u << features) - 1);
  const __m512 b = _mm512_load_ps(bias);
  for (int r = 0; r < rows; ++r)
    avx512_store::store16(y + r * n,
                          _mm512_add_ps(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, column, sums + r, 4), b), live);
}

// The tile instructions name their registers in the instruction (GCC's intrinsics paste the
// literal into the assembly), so these take a register number at run time through a switch.
#define FP4_TILE_CASE(t, statement) \
  case t:                           \
    statement;                      \
    break;
void tile_load(int tile, const void* p) {
  switch (tile) {
    FP4_TILE_CASE(0, _tile_loadd(0, p, 64)) FP4_TILE_CASE(1, _tile_loadd(1, p, 64))
    FP4_TILE_CASE(2, _tile_loadd(2, p, 64)) FP4_TILE_CASE(3, _tile_loadd(3, p, 64))
  }
}
void tile_zero(int tile) {
  switch (tile) {
    FP4_TILE_CASE(2, _tile_zero(2)) FP4_TILE_CASE(3, _tile_zero(3)) FP4_TILE_CASE(4, _tile_zero(4))
    FP4_TILE_CASE(5, _tile_zero(5)) FP4_TILE_CASE(6, _tile_zero(6)) FP4_TILE_CASE(7, _tile_zero(7))
  }
}
void tile_store(int tile, void* p) {
  switch (tile) {
    FP4_TILE_CASE(2, _tile_stored(2, p, 64)) FP4_TILE_CASE(3, _tile_stored(3, p, 64))
    FP4_TILE_CASE(4, _tile_stored(4, p, 64)) FP4_TILE_CASE(5, _tile_stored(5, p, 64))
    FP4_TILE_CASE(6, _tile_stored(6, p, 64)) FP4_TILE_CASE(7, _tile_stored(7, p, 64))
  }
}
// Tile c += tile a x tile b, for the (c, a, b) the kernel uses: b = P, a < P, c > P.
#define FP4_TILE_DOT(c, a, b) FP4_TILE_CASE(c * 100 + a * 10 + b, _tile_dpbf16ps(c, a, b))
void tile_dot(int c, int a, int b) {
  switch (c * 100 + a * 10 + b) {
    FP4_TILE_DOT(2, 0, 1) FP4_TILE_DOT(3, 0, 1) FP4_TILE_DOT(4, 0, 1) FP4_TILE_DOT(5, 0, 1) FP4_TILE_DOT(6, 0, 1)
    FP4_TILE_DOT(7, 0, 1) FP4_TILE_DOT(3, 0, 2) FP4_TILE_DOT(4, 0, 2) FP4_TILE_DOT(5, 0, 2) FP4_TILE_DOT(6, 0, 2)
    FP4_TILE_DOT(7, 0, 2) FP4_TILE_DOT(3, 1, 2) FP4_TILE_DOT(4, 1, 2) FP4_TILE_DOT(5, 1, 2) FP4_TILE_DOT(6, 1, 2)
    FP4_TILE_DOT(7, 1, 2) FP4_TILE_DOT(4, 0, 3) FP4_TILE_DOT(5, 0, 3) FP4_TILE_DOT(6, 0, 3) FP4_TILE_DOT(7, 0, 3)
    FP4_TILE_DOT(4, 1, 3) FP4_TILE_DOT(5, 1, 3) FP4_TILE_DOT(6, 1, 3) FP4_TILE_DOT(7, 1, 3) FP4_TILE_DOT(4, 2, 3)
    FP4_TILE_DOT(5, 2, 3) FP4_TILE_DOT(6, 2, 3) FP4_TILE_DOT(7, 2, 3)
  }
}
#undef FP4_TILE_DOT
#undef FP4_TILE_CASE

// Tiles 0..P-1 hold the A parts, tile P the B part in use, tiles P+1..7 the sums.
template <int P>
void multiply_into(int sum_tile, int b_part) {
  for (int a = 0; a + b_part < P; ++a) tile_dot(sum_tile, a, P);
}

// Features [j_begin, j_end) of y for the input rows of batch tiles [t_begin, t_end), in passes of
// 7 - P batch tiles (one sum tile each). x_parts[j]: part j of x in B-tile order ([batch
// tile][column chunk] 1 KB tiles).
template <int P, typename T>
void linear_features(const uint16_t* const (&x_parts)[P], int64_t m, int64_t k, const uint8_t* packed,
                     const fp4_scales& scales, int64_t n, int64_t blocksize, const float* code, const T* bias, T* y,
                     int64_t j_begin, int64_t j_end, int64_t t_begin, int64_t t_end) {
  constexpr int kSumTiles = 7 - P, kTileElements = kTileRows * kTileCols;
  alignas(64) TileConfig config{};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) config.rows[t] = kTileRows, config.bytes_per_row[t] = 64;
  _tile_loadconfig(&config);
  alignas(64) float sums[kTileRows * kTileRows];
  const int64_t chunks = k / kTileCols, blocks_per_row = k / blocksize;
  const int chunks_per_block = int(blocksize / kTileCols);
  std::vector<float> row_scales(size_t(kTileRows * blocks_per_row));
  // The decoded A tiles: one chunk's in a buffer that stays in L1, or, when the batch needs more
  // than one pass over the sum tiles, every chunk's, decoded in the first pass and reloaded in the
  // others (decoding again per pass cost batch 128 in bf16 about twice batch 64).
  const bool passes = t_end - t_begin > kSumTiles;
  std::vector<uint16_t> a_storage(size_t((passes ? chunks : 1) * P * kTileElements) + 32);
  uint16_t* const a_tiles = a_storage.data() + (32 - reinterpret_cast<uintptr_t>(a_storage.data()) / 2 % 32) % 32;
  for (int64_t j0 = j_begin; j0 < j_end; j0 += kTileRows) {
    const int features = int(std::min<int64_t>(kTileRows, j_end - j0));
    for (int f = 0; f < features; ++f)
      fill_block_scales(scales, (j0 + f) * blocks_per_row, int(blocks_per_row), &row_scales[f * blocks_per_row]);
    alignas(64) float bias_values[kTileRows] = {};
    for (int f = 0; bias && f < features; ++f) bias_values[f] = to_float(bias[j0 + f]);
    if (features < kTileRows)  // (rows past the last feature stay zero)
      std::fill(a_tiles, a_tiles + (passes ? chunks : 1) * P * kTileElements, uint16_t(0));
    for (int64_t t0 = t_begin; t0 < t_end; t0 += kSumTiles) {
      const int tiles = int(std::min<int64_t>(kSumTiles, t_end - t0));
      for (int t = 0; t < tiles; ++t) tile_zero(P + 1 + t);
      __m512i tables[kTileRows][P];
      for (int64_t c = 0; c < chunks; ++c) {
        uint16_t* const a_parts = a_tiles + (passes ? c : 0) * P * kTileElements;
        if (t0 == t_begin || !passes) {
          if (c % chunks_per_block == 0)
            for (int f = 0; f < features; ++f)
              code_tables<P>(code, row_scales[f * blocks_per_row + c / chunks_per_block], tables[f]);
          for (int f = 0; f < features; ++f) {
            const __m512i indices = code_indices(packed + ((j0 + f) * k + c * kTileCols) / 2);
            for (int i = 0; i < P; ++i)
              _mm512_store_si512(a_parts + i * kTileElements + f * kTileCols,
                                 _mm512_permutexvar_epi16(indices, tables[f][i]));
          }
        }
        for (int i = 0; i < P; ++i) tile_load(i, a_parts + i * kTileElements);
        for (int t = 0; t < tiles; ++t)
          for (int j = 0; j < P; ++j) {
            tile_load(P, x_parts[j] + ((t0 + t) * chunks + c) * kTileElements);
            multiply_into<P>(P + 1 + t, j);
          }
      }
      for (int t = 0; t < tiles; ++t) {
        tile_store(P + 1 + t, sums);
        const int64_t row0 = (t0 + t) * kTileRows;
        store_sum_tile(sums, bias_values, features, int(std::min<int64_t>(kTileRows, m - row0)), y + row0 * n + j0, n);
      }
    }
  }
  _tile_release();
}

FP4_TARGET_END

template <typename T>
void linear_amx_typed(const T* x, int64_t m, int64_t k, const uint8_t* packed, const fp4_scales& scales, int64_t n,
                      int64_t blocksize, const Codebook& code, const T* bias, T* y) {
  constexpr int P = kParts<T>;
  // x's parts as B tiles (see pack_activations).
  const int64_t chunks = k / kTileCols, batch_tiles = (m + kTileRows - 1) / kTileRows;
  const size_t part_elements = size_t(batch_tiles * chunks * kTileRows * kTileCols);
  std::vector<uint16_t> storage(P * part_elements + 32);
  uint16_t* const base = storage.data() + (32 - reinterpret_cast<uintptr_t>(storage.data()) / 2 % 32) % 32;
  const uint16_t* x_parts[P];
  for (int j = 0; j < P; ++j) x_parts[j] = base + j * part_elements;
  pack_activations<P>(x, m, k, base, part_elements);
  // Each feature tile meets the B tiles of all its passes; once those pass the ~2 MB L2 they come
  // from L3 for every feature tile, so larger x runs one pass at a time over all features instead
  // (decoding the weights again per pass). (4096, 4096) batch 128 / 256, us, all passes per
  // feature tile vs one pass at a time: bf16 (1 / 2 MB of x) 3253 / 7668 vs 4183-4201 / 7464-7606;
  // fp16 (2 / 4 MB) 7618 / 18911 vs 7044-7208 / 14288-17840; fp32 (3 / 6 MB) 14702 / 33709 vs
  // 10744-11095 / 22509-22536.
  const int64_t grain = std::max<int64_t>(1, 4096 / k);  // feature tiles per task
  const int64_t pass_tiles = P * part_elements * 2 <= (size_t(1) << 20) ? batch_tiles : 7 - P;
  for (int64_t t0 = 0; t0 < batch_tiles; t0 += pass_tiles)
    parallel_for((n + kTileRows - 1) / kTileRows, grain, [&](int64_t f0, int64_t f1) {
      linear_features<P>(x_parts, m, k, packed, scales, n, blocksize, code.data(), bias, y, f0 * kTileRows,
                         std::min(n, f1 * kTileRows), t0, std::min(t0 + pass_tiles, batch_tiles));
    });
}

}  // namespace

bool amx_bf16_usable() {
  // Linux hands out the tile state only on request, once per process.
  static const bool usable = cpu_has_amx_bf16() && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vbmi") &&
                             syscall(SYS_arch_prctl, kReqTilePermission, kTileDataFeature) == 0;
  return usable;
}

void linear_amx(const bfloat16_t* x, int64_t m, int64_t k, const uint8_t* packed, const fp4_scales& scales, int64_t n,
                int64_t blocksize, const Codebook& code, const bfloat16_t* bias, bfloat16_t* y) {
  linear_amx_typed(x, m, k, packed, scales, n, blocksize, code, bias, y);
}
void linear_amx(const half_t* x, int64_t m, int64_t k, const uint8_t* packed, const fp4_scales& scales, int64_t n,
                int64_t blocksize, const Codebook& code, const half_t* bias, half_t* y) {
  linear_amx_typed(x, m, k, packed, scales, n, blocksize, code, bias, y);
}
void linear_amx(const float* x, int64_t m, int64_t k, const uint8_t* packed, const fp4_scales& scales, int64_t n,
                int64_t blocksize, const Codebook& code, const float* bias, float* y) {
  linear_amx_typed(x, m, k, packed, scales, n, blocksize, code, bias, y);
}

#else
bool amx_bf16_usable() { return false; }
void linear_amx(const bfloat16_t*, int64_t, int64_t, const uint8_t*, const fp4_scales&, int64_t, int64_t,
                const Codebook&, const bfloat16_t*, bfloat16_t*) {}
void linear_amx(const half_t*, int64_t, int64_t, const uint8_t*, const fp4_scales&, int64_t, int64_t, const Codebook&,
                const half_t*, half_t*) {}
void linear_amx(const float*, int64_t, int64_t, const uint8_t*, const fp4_scales&, int64_t, int64_t, const Codebook&,
                const float*, float*) {}
#endif

}  // namespace fp4::cpu
