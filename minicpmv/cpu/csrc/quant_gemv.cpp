// Few-row products with int8 / int4 weight-only matrices on AVX-512 (built and loaded by
// cpu/native.py only on CPUs with avx512f/bw/vl/dq, VNNI and VBMI; torch's kernels serve the rest).
//
// int8: q [N, K] int8 row-major, one bf16 scale per row; y[m, n] = s[n] * sum_k q[n, k] x[m, k].
//   K % 64 == 0: the activations rounded to int8 per block of 32 inputs (max|x| / 127, as llama.cpp's
//   Q8_0 dot products round them) and multiplied on VNNI (vpdpbusd, 64 code pairs per instruction),
//   int32 sums per block scaled into fp32; error within ~1% of the product's scale. Other K: fp32
//   activations and fp32 accumulation (codes sign-extended and converted in registers).
// int4: torch's `_convert_weight_to_int4pack_for_cpu` layout: per block of 64 rows, K x 32 bytes,
//   byte (k, j) holding row j (low nibble) and row j + 32 (high nibble); scale/offset pairs
//   [K / group, n_pad, 2] bf16; w = (q - 8) s + z, so per group
//   sum_k w x = s * sum_k (q - 8) x + z * sum_k x.
//   sum_k (q - 8) x runs on VNNI (vpdpbusd: the codes are unsigned bytes) in int32 with x rounded to int8
//   per block of 32 inputs, as the int8 rows round it; sum_k x in fp32. The rounding of x is the
//   error against the fp32 product with the dequantized matrix: within ~1% of the product's scale,
//   far below what 4-bit weights themselves change. (Until 2026-12 x was rounded to int16 and
//   multiplied by vpdpwssd, two pairs per lane instead of four: within ~1e-4, and on a Zen 4 about
//   1.5x slower per weight.)
#include <type_traits>
#include "kernels.h"
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace {

// Software prefetch distances (bytes ahead in each weight stream): one core's hardware
// prefetcher alone left these streams at ~10 GB/s on the AMX Xeon; 8-16 KB ahead reached
// 17-20 GB/s (1 KB: ~8, 32 KB: no better). The single-stream walks (int8_walk, int4_block: one
// weight stream per thread) and the int8 / vdpbf16ps tiles of several activation rows prefetch as
// the plan says (walk_ahead): into L1 (the Xeon's choice), into L2 only, or none. On a Zen 4, L2
// lifted int8 / int4 decode 1.16-1.24x over none, where L1 slowed the walks below none (and neither
// helped bf16_dot.cpp's one-row walk there); the tiles' L1 prefetch cost that CPU a third of
// batched decode (16-bit 8 rows 76 -> 110 tok/s with L2).
constexpr int64_t PF_ROWS = 8192;  // per row, 4 rows at a time (int8, bf16)
constexpr int64_t PF_INT4 = 16384;  // one stream per 64-row block

// 16 weights of a row as fp32: int8 codes (sign-extended, converted) or bf16 values (exact).
inline __m512 widen16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 widen16(const uint16_t* p) { return simd::load_bf16(p); }

// R weight rows (int8 codes or bf16 values, T) against MR activation rows; K a multiple of 16.
// `scale` (one bf16 per row) or nullptr.
template <int R, int MR, typename T>
void rows_tile(const T* q, const uint16_t* scale, const float* x, float* y,
               int64_t K, int64_t N, int64_t n0, int64_t m0) {
  __m512 acc[R][MR];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = _mm512_loadu_ps(x + (m0 + m) * K + k);
    if (((k * sizeof(T)) & 63) == 0)
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(q + (n0 + r) * K + k) + PF_ROWS, _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
      const __m512 w = widen16(q + (n0 + r) * K + k);
      for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_fmadd_ps(w, xv[m], acc[r][m]);
    }
  }
  float s[R];
  for (int r = 0; r < R; ++r) s[r] = scale ? bf16_to_float(scale[n0 + r]) : 1.0f;
  store_sums<R, MR>(acc, y, N, n0, m0, s);
}

template <int R, typename T>
void rows_of(const T* q, const uint16_t* scale, const float* x, float* y,
             int64_t K, int64_t N, int64_t M, int64_t n0) {
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) rows_tile<R, 4>(q, scale, x, y, K, N, n0, m0);
  switch (M - m0) {
    case 3: rows_tile<R, 3>(q, scale, x, y, K, N, n0, m0); break;
    case 2: rows_tile<R, 2>(q, scale, x, y, K, N, n0, m0); break;
    case 1: rows_tile<R, 1>(q, scale, x, y, K, N, n0, m0); break;
    default: break;
  }
}

template <typename T>
void rows_mm(const T* q, const uint16_t* scale, const float* x, float* y, int64_t K, int64_t N, int64_t M) {
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * 4;
      if (n0 + 4 <= N) {
        rows_of<4>(q, scale, x, y, K, N, M, n0);
      } else {
        for (int64_t n = n0; n < N; ++n) rows_of<1>(q, scale, x, y, K, N, M, n);
      }
    }
  });
}

// Activations of the int8 rows: per row and block of 32 inputs a = round(x / d), d = max|x| / 127,
// signed; d spread over the 8 int32 lanes its block's products land in (lanes 0-7: inputs 0-31 of
// every 64, lanes 8-15: 32-63), and per lane o = -128 (the sum of its 4 codes). vpdpbusd multiplies
// unsigned bytes by signed ones: the weights go in as w + 128 (one xor), and starting the sums at o
// takes the 128 back out, so each lane's int32 is exactly sum w a.
struct Int8Activations {
  std::vector<int8_t> q;   // [M, K]
  std::vector<float> d;    // [M, K / 64, 16]
  std::vector<int32_t> o;  // [M, K / 64, 16]
};

Int8Activations int8_activations(const float* x, int64_t M, int64_t K) {
  Int8Activations a{std::vector<int8_t>(M * K), std::vector<float>(M * K / 4), std::vector<int32_t>(M * K / 4)};
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; k += 32) {
      int8_t* qb = a.q.data() + m * K + k;
      const float d = round_block32(x + m * K + k, qb);
      const int64_t lane = (m * K + k) / 4;  // 8 lanes of the block's 64-input group
      std::fill(a.d.data() + lane, a.d.data() + lane + 8, d);
      for (int l = 0; l < 8; ++l) a.o[lane + l] = -128 * (qb[4 * l] + qb[4 * l + 1] + qb[4 * l + 2] + qb[4 * l + 3]);
    }
  }
  return a;
}

// The step every (weight row, activation row) pair takes per 64 inputs, in k order: the int32 sums
// of the two 32-input blocks, converted, times their d, added to the pair's fp32 lanes.
inline __m512 int8_step(__m512 acc, __m512i u, const Int8Activations& a, int64_t at) {
  const __m512i s = _mm512_dpbusd_epi32(_mm512_loadu_si512(a.o.data() + at / 4), u,
                                        _mm512_loadu_si512(a.q.data() + at));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_loadu_ps(a.d.data() + at / 4), acc);
}

inline __m512i int8_unsigned(const int8_t* p) {  // 64 codes w as w + 128
  return _mm512_xor_si512(_mm512_loadu_si512(p), _mm512_set1_epi8(static_cast<char>(0x80)));
}

// R weight rows against MR activation rows (several activation rows: batched decode). Tiles of 4 x 4:
// per activation row and 64 inputs its codes, offsets and scales are loaded once for 4 weight rows
// (2 x 8 tiles loaded them for 2: on a Zen 4 the 4 x 4 tiles ran 1.2-1.5x faster at 4 and 8 rows).
template <int R, int MR>
void int8_tile(const int8_t* q, const uint16_t* scale, const Int8Activations& a, float* y,
               int64_t K, int64_t N, int64_t n0, int64_t m0) {
  __m512 acc[R][MR];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 64) {
    __m512i u[R];
    for (int r = 0; r < R; ++r) {
      const int8_t* p = q + (n0 + r) * K + k;
      walk_ahead(reinterpret_cast<const char*>(p) + PF_ROWS);
      u[r] = int8_unsigned(p);
    }
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < R; ++r) acc[r][m] = int8_step(acc[r][m], u[r], a, (m0 + m) * K + k);
  }
  float s[R];
  for (int r = 0; r < R; ++r) s[r] = bf16_to_float(scale[n0 + r]);
  store_sums<R, MR>(acc, y, N, n0, m0, s);
}

// One activation row (the usual decode step): each weight row read front to back, one after
// another, so a thread walks one sequential stream (on a Zen 4 two interleaved row streams ran at
// about half the rate); the same sums as int8_tile's, bit for bit.
void int8_walk(const int8_t* q, const uint16_t* scale, const Int8Activations& a, float* y, int64_t K,
               int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc = _mm512_setzero_ps();
    const int8_t* row = q + n * K;
    for (int64_t k = 0; k < K; k += 64) {
      walk_ahead(row + k + PF_ROWS);
      acc = int8_step(acc, int8_unsigned(row + k), a, k);
    }
    y[n] = _mm512_reduce_add_ps(acc) * bf16_to_float(scale[n]);
  }
}

template <int R>
void int8_rows(const int8_t* q, const uint16_t* scale, const Int8Activations& a, float* y,
               int64_t K, int64_t N, int64_t M, int64_t n0) {
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) int8_tile<R, 4>(q, scale, a, y, K, N, n0, m0);
  switch (M - m0) {
    case 3: int8_tile<R, 3>(q, scale, a, y, K, N, n0, m0); break;
    case 2: int8_tile<R, 2>(q, scale, a, y, K, N, n0, m0); break;
    case 1: int8_tile<R, 1>(q, scale, a, y, K, N, n0, m0); break;
    default: break;
  }
}

void int8_vnni_mm(const int8_t* q, const uint16_t* scale, const float* x, float* y, int64_t K, int64_t N,
                  int64_t M) {
  const Int8Activations a = int8_activations(x, M, K);
  if (M == 1) {
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { int8_walk(q, scale, a, y, K, n0, n1); });
    return;
  }
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * 4;
      if (n0 + 4 <= N) int8_rows<4>(q, scale, a, y, K, N, M, n0);
      else for (int64_t n = n0; n < N; ++n) int8_rows<1>(q, scale, a, y, K, N, M, n);
    }
  });
}

// bf16 rows on AMX for a few activation rows (batched decode): one tile product multiplies 16
// weight rows by 32 inputs of every activation row. The weight tile is read straight from the
// row-major matrix (16 rows, 64 bytes each, the row stride apart); the activations, rounded to
// bf16 once, are laid out as the B operand wants them ([K / 2][M][2]). y^T blocks of 64 weight rows
// accumulate in four fp32 tiles over k in order, so a row's result does not depend on how many
// activation rows share the call. K % 32 == 0; weight rows past the last whole 64 take the FMA
// kernel above.
struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_permitted() {  // Linux hands out the tile state per process on request
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

__attribute__((target("amx-tile,amx-bf16"))) void amx_blocks(const uint16_t* w, const uint16_t* xp, float* y,
                                                             int64_t K, int64_t N, int64_t M, int64_t b0,
                                                             int64_t b1) {
  TileConfig cfg;
  for (int t = 0; t < 4; ++t) cfg.rows[t] = 16, cfg.colsb[t] = static_cast<uint16_t>(M * 4);  // y^T blocks
  cfg.rows[4] = 16, cfg.colsb[4] = static_cast<uint16_t>(M * 4);                               // activations
  cfg.rows[5] = cfg.rows[6] = 16, cfg.colsb[5] = cfg.colsb[6] = 64;                            // weights
  _tile_loadconfig(&cfg);
  alignas(64) float out[16 * 16];
  const int64_t ws = K * 2;  // bytes between weight rows
  for (int64_t b = b0; b < b1; ++b) {
    const uint16_t* wb = w + b * 64 * K;
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    // the band of 64 rows is one contiguous run of 128 K bytes: while this band is multiplied, the
    // next one is prefetched in address order, 4 KB per k step (the 64 row streams of the tile
    // loads defeat the hardware prefetcher)
    const char* next = reinterpret_cast<const char*>(wb + 64 * K);
    const bool more = b + 1 < b1;
    for (int64_t k = 0; k < K; k += 32) {
      if (more)
        for (int l = 0; l < 4096; l += 64) _mm_prefetch(next + k * 128 + l, _MM_HINT_T0);
      _tile_loadd(4, xp + k * M, M * 4);
      _tile_loadd(5, wb + k, ws);
      _tile_dpbf16ps(0, 5, 4);
      _tile_loadd(6, wb + 16 * K + k, ws);
      _tile_dpbf16ps(1, 6, 4);
      _tile_loadd(5, wb + 32 * K + k, ws);
      _tile_dpbf16ps(2, 5, 4);
      _tile_loadd(6, wb + 48 * K + k, ws);
      _tile_dpbf16ps(3, 6, 4);
    }
    float* yb = y + b * 64;
#define MINICPMV_STORE_BLOCK(t)                                                        \
    _tile_stored(t, out, M * 4);                                                       \
    for (int i = 0; i < 16; ++i)                                                       \
      for (int64_t m = 0; m < M; ++m) yb[m * N + 16 * t + i] = out[i * M + m];
    MINICPMV_STORE_BLOCK(0) MINICPMV_STORE_BLOCK(1) MINICPMV_STORE_BLOCK(2) MINICPMV_STORE_BLOCK(3)
#undef MINICPMV_STORE_BLOCK
  }
  _tile_release();
}

// Activations for the int4 kernel: per row and block of 32 inputs x ~ a d, a int8 (round to nearest
// on d = max|x| / 127, as llama.cpp's Q8_0 / Q8_K dot products round them) and -8 sum a (the codes
// q are multiplied as q - 8, centred, so the rounding of x is not scaled by the codes' mean), plus
// the exact fp32 sum of x per group of the matrix (for its offsets).
struct Int4Activations {
  std::vector<int8_t> q;     // [M, K]
  std::vector<float> d;      // [M, K / 32]
  std::vector<int32_t> off;  // [M, K / 32]
  std::vector<float> sum;    // [M, G]
};

Int4Activations quantize_activations(const float* x, int64_t M, int64_t K, int64_t group) {
  const int64_t G = K / group;
  Int4Activations a{std::vector<int8_t>(M * K), std::vector<float>(M * K / 32), std::vector<int32_t>(M * K / 32),
                    std::vector<float>(M * G)};
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; k += 32) {
      int8_t* qb = a.q.data() + m * K + k;
      a.d[(m * K + k) / 32] = round_block32(x + m * K + k, qb);
      int32_t sum_a = 0;
      for (int i = 0; i < 32; ++i) sum_a += qb[i];
      a.off[(m * K + k) / 32] = -8 * sum_a;
    }
    for (int64_t g = 0; g < G; ++g) {
      float sum = 0.f;
      for (int64_t k = 0; k < group; ++k) sum += x[m * K + g * group + k];
      a.sum[m * G + g] = sum;
    }
  }
  return a;
}

// One block of 64 rows against MR activation rows, 4 inputs at a time with VNNI: two byte
// permutes gather, for each row, the codes of 4 consecutive inputs into one 32-bit lane (low
// nibbles: rows 0-31, high: 32-63); a mask (and a shift) leave them as the unsigned bytes vpdpbusd
// multiplies by 4 int8 activations, summing into the row's int32 lane, which starts at -8 sum a: per
// block of 32 inputs sum (q - 8) a, converted and scaled by the block's d times the group's s; per
// group the offsets add z sum x. Every (row, activation row) pair takes the same steps whatever MR is.
template <int MR>
void int4_block(const uint8_t* w, const uint32_t* sz, const Int4Activations& a, float* y,
                int64_t K, int64_t group, int64_t n_pad, int64_t nb, int64_t m0) {
  const int64_t G = K / group;
  const __m512i nib = _mm512_set1_epi8(0x0f);
  const __m512i hi16 = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  alignas(64) uint8_t i0[64], i1[64];
  for (int r = 0; r < 16; ++r) {  // lane r: A[r], A[32 + r], B[r], B[32 + r] (A = inputs k, k+1; B = k+2, k+3)
    i0[4 * r] = r; i0[4 * r + 1] = 32 + r; i0[4 * r + 2] = 64 + r; i0[4 * r + 3] = 96 + r;
    i1[4 * r] = 16 + r; i1[4 * r + 1] = 48 + r; i1[4 * r + 2] = 80 + r; i1[4 * r + 3] = 112 + r;
  }
  const __m512i idx0 = _mm512_load_si512(i0), idx1 = _mm512_load_si512(i1);
  const int32_t* a4 = reinterpret_cast<const int32_t*>(a.q.data());  // 4 activation codes at a time
  __m512 tot[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int i = 0; i < 4; ++i) tot[m][i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 s[4];
    for (int i = 0; i < 4; ++i)
      s[i] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(sz + g * n_pad + nb + 16 * i), 16));
    for (int64_t kb = g * group; kb < (g + 1) * group; kb += 32) {
      __m512i acc[MR][4];
      for (int m = 0; m < MR; ++m)
        for (int i = 0; i < 4; ++i) acc[m][i] = _mm512_set1_epi32(a.off[((m0 + m) * K + kb) / 32]);
      for (int64_t k = kb; k < kb + 32; k += 4) {
        const uint8_t* p = w + k * 32;
        walk_ahead(p + PF_INT4);
        walk_ahead(p + PF_INT4 + 64);
        const __m512i A = _mm512_loadu_si512(p), B = _mm512_loadu_si512(p + 64);
        const __m512i v0 = _mm512_permutex2var_epi8(A, idx0, B), v1 = _mm512_permutex2var_epi8(A, idx1, B);
        const __m512i c[4] = {_mm512_and_si512(v0, nib), _mm512_and_si512(v1, nib),  // rows 0-15, 16-31
                              _mm512_and_si512(_mm512_srli_epi16(v0, 4), nib),       // rows 32-47
                              _mm512_and_si512(_mm512_srli_epi16(v1, 4), nib)};      // rows 48-63
        for (int m = 0; m < MR; ++m) {
          const __m512i xa = _mm512_set1_epi32(a4[((m0 + m) * K + k) / 4]);
          for (int i = 0; i < 4; ++i) acc[m][i] = _mm512_dpbusd_epi32(acc[m][i], c[i], xa);
        }
      }
      for (int m = 0; m < MR; ++m) {
        const __m512 d = _mm512_set1_ps(a.d[((m0 + m) * K + kb) / 32]);
        for (int i = 0; i < 4; ++i)
          tot[m][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][i]), _mm512_mul_ps(s[i], d), tot[m][i]);
      }
    }
    for (int i = 0; i < 4; ++i) {
      const __m512 z = _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(sz + g * n_pad + nb + 16 * i), hi16));
      for (int m = 0; m < MR; ++m) tot[m][i] = _mm512_fmadd_ps(z, _mm512_set1_ps(a.sum[(m0 + m) * G + g]), tot[m][i]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(y + (m0 + m) * n_pad + nb + 16 * i, tot[m][i]);
}

}  // namespace

torch::Tensor int8_mm(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  check_int8(x, q, scale);
  const int64_t N = q.size(0), K = q.size(1), M = x.size(0);
  auto y = torch::empty({M, N}, x.options());
  const int8_t* qp = q.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>());
  if (K % 64 == 0)
    int8_vnni_mm(qp, sp, x.data_ptr<float>(), y.data_ptr<float>(), K, N, M);
  else
    rows_mm(qp, sp, x.data_ptr<float>(), y.data_ptr<float>(), K, N, M);
  return y;
}

torch::Tensor bf16_mm(torch::Tensor x, torch::Tensor w) {
  ARG_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16 && w.is_contiguous(), "w: contiguous [N, K] bf16");
  const int64_t N = w.size(0), K = w.size(1), M = x.size(0);
  check_x(x, K);
  ARG_CHECK(K % 16 == 0, "K must be a multiple of 16");
  auto y = torch::empty({M, N}, x.options());
  rows_mm(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), nullptr, x.data_ptr<float>(),
          y.data_ptr<float>(), K, N, M);
  return y;
}

// x rounded to bf16 (as a bf16 GEMM rounds it), then AMX tile products with fp32 sums; M <= 16,
// K % 32 == 0 (amx_rows_ok)
bool amx_rows_ok() { return amx_permitted(); }

torch::Tensor bf16_amx_mm(torch::Tensor x, torch::Tensor w) {
  ARG_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16 && w.is_contiguous(), "w: contiguous [N, K] bf16");
  const int64_t N = w.size(0), K = w.size(1), M = x.size(0);
  check_x(x, K);
  ARG_CHECK(K % 32 == 0 && M >= 1 && M <= 16, "K must be a multiple of 32 and rows 1..16");
  ARG_CHECK(amx_permitted(), "the OS refused the AMX tile state");
  // [M, K] -> [K / 2][M][2] bf16 (round to nearest even): each k pair of each activation row side by side
  auto xp = torch::empty({K / 2, M, 2}, x.options().dtype(torch::kBFloat16));
  {
    const float* xs = x.data_ptr<float>();
    at::BFloat16* xd = xp.data_ptr<at::BFloat16>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xd[((k >> 1) * M + m) * 2 + (k & 1)] = at::BFloat16(xs[m * K + k]);
  }
  auto y = torch::empty({M, N}, x.options());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const uint16_t* xpp = reinterpret_cast<const uint16_t*>(xp.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  const int64_t blocks = N / 64;
  at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) { amx_blocks(wp, xpp, yp, K, N, M, b0, b1); });
  if (blocks * 64 < N) {
    auto xf = x.to(torch::kBFloat16).to(torch::kFloat).contiguous();  // the same bf16-rounded activations
    for (int64_t n = blocks * 64; n < N; ++n) rows_of<1>(wp, nullptr, xf.data_ptr<float>(), yp, K, N, M, n);
  }
  return y;
}

torch::Tensor int4_mm(torch::Tensor x, torch::Tensor packed, torch::Tensor sz, int64_t group) {
  check_int4(packed, sz, group);
  const int64_t n_pad = packed.size(0), K = packed.size(1) * 2, M = x.size(0);
  check_x(x, K);
  const Int4Activations act = quantize_activations(x.data_ptr<float>(), M, K, group);
  auto y = torch::empty({M, n_pad}, x.options());
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const uint32_t* szp = reinterpret_cast<const uint32_t*>(sz.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n_pad / 64, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* w = wp + b * 64 * (K / 2);
      int64_t m0 = 0;  // 2 rows per pass where there are 2, sharing the unpacking (4 per pass: 0.93x on a Zen 4)
      for (; m0 + 2 <= M; m0 += 2) int4_block<2>(w, szp, act, yp, K, group, n_pad, b * 64, m0);
      if (m0 < M) int4_block<1>(w, szp, act, yp, K, group, n_pad, b * 64, m0);
    }
  });
  return y;
}

// The int4 matrix's blocks b0..b1 (64 rows each) widened to W^T [K, 64 (b1 - b0)] in bf16 or fp32:
// what a prompt's GEMM multiplies (x @ W^T needs no transposed copy). In the packed layout each
// input k holds 64 consecutive rows, so every k becomes one contiguous run of the output row.
torch::Tensor int4_widen_t(torch::Tensor packed, torch::Tensor sz, int64_t group, int64_t b0, int64_t b1,
                           bool bf16) {
  check_int4(packed, sz, group);
  const int64_t n_pad = packed.size(0), K = packed.size(1) * 2;
  ARG_CHECK(0 <= b0 && b0 < b1 && b1 * 64 <= n_pad, "block range out of the matrix");
  const int64_t G = K / group, cols = (b1 - b0) * 64;
  auto out = torch::empty({K, cols}, packed.options().dtype(bf16 ? torch::kBFloat16 : torch::kFloat));
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const uint32_t* szp = reinterpret_cast<const uint32_t*>(sz.data_ptr<at::BFloat16>());
  uint16_t* ob = bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
  float* of = bf16 ? nullptr : out.data_ptr<float>();
  at::parallel_for(b0, b1, 1, [&](int64_t c0, int64_t c1) {
    const __m512i hi16 = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    const __m512 lut = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 eight = _mm512_set1_ps(8.0f);
    for (int64_t b = c0; b < c1; ++b) {
      const uint8_t* w = wp + b * 64 * (K / 2);
      const int64_t col = (b - b0) * 64;
      for (int64_t g = 0; g < G; ++g) {
        __m512 s[4], base[4];
        for (int i = 0; i < 4; ++i) {
          const __m512i d = _mm512_loadu_si512(szp + g * n_pad + b * 64 + 16 * i);
          s[i] = _mm512_castsi512_ps(_mm512_slli_epi32(d, 16));
          base[i] = _mm512_fnmadd_ps(eight, s[i], _mm512_castsi512_ps(_mm512_and_si512(d, hi16)));
        }
        for (int64_t k = g * group; k < (g + 1) * group; ++k) {
          const uint8_t* p = w + k * 32;
          const __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
          const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
          const __m512 v[4] = {_mm512_permutexvar_ps(a, lut), _mm512_permutexvar_ps(c, lut),
                               _mm512_permutexvar_ps(_mm512_srli_epi32(a, 4), lut),
                               _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), lut)};
          for (int i = 0; i < 4; ++i) {
            const __m512 x = _mm512_fmadd_ps(v[i], s[i], base[i]);  // (q - 8) s + z
            if (bf16) {
              simd::store_bf16(ob + k * cols + col + 16 * i, x);
            } else {
              _mm512_storeu_ps(of + k * cols + col + 16 * i, x);
            }
          }
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_decode_layers(m);
  register_decode_rows(m);
  m.def("int4_widen_t", &int4_widen_t, "int4 blocks b0..b1 -> W^T [K, 64 (b1 - b0)] in bf16 (or fp32)",
        py::arg("packed"), py::arg("scale_zero"), py::arg("group"), py::arg("b0"), py::arg("b1"), py::arg("bf16"),
        released_gil());
  m.def("int8_mm", &int8_mm, "x [M, K] fp32 @ (q [N, K] int8 * scale [N] bf16)^T -> [M, N] fp32", released_gil());
  m.def("bf16_amx_mm", &bf16_amx_mm, "x [M <= 16, K] fp32 rounded to bf16 @ w [N, K] bf16 ^T -> [M, N] fp32 "
        "(AMX tiles, fp32 sums)", released_gil());
  m.def("bf16_dot_mm", &bf16_dot_mm, "x [M, K] fp32 rounded to bf16 @ w [N, K] bf16 ^T -> [M, N] fp32 "
        "(AVX512-BF16 vdpbf16ps, fp32 sums; K % 32 == 0); tiled: w stored by bf16_tile",
        py::arg("x"), py::arg("w"), py::arg("tiled") = false, released_gil());
  m.def("bf16_tile", &bf16_tile, "plain [N, K] bf16 -> the same matrix in tiles of 4 rows (bf16_dot_mm's tiled)",
        released_gil());
  m.def("bf16_untile", &bf16_untile, "a tiled matrix (bf16_tile) -> plain [N, K] bf16 (into out when given)",
        py::arg("w"), py::arg("out") = py::none(), released_gil());
  m.def("bf16_attention", &bf16_attention, "softmax(q k^T scale) v of bf16 [N, L, H, d] q/k/v, keys past lengths[n] "
        "left out -> [N, L, H d] bf16 (AVX512-BF16 vdpbf16ps, fp32 softmax and sums)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("lengths"), py::arg("scale"), released_gil());
  m.def("bf16_causal_attention", &bf16_causal_attention, "causal attention of one prompt: bf16 q [T, H, d], k / v "
        "[offset + T, Hkv, d] (H a multiple of Hkv), query t seeing keys 0 .. offset + t -> [T, H d] bf16 "
        "(AVX512-BF16 vdpbf16ps, fp32 softmax and sums)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("offset"), py::arg("scale"), released_gil());
  m.def("bf16_dot_ok", &bf16_dot_ok, "whether this CPU has AVX512-BF16 (bf16_dot_mm)");
  m.def("amx_rows_ok", &amx_rows_ok, "whether this process may use the AMX tiles (asks the OS once)");
  m.def("bf16_mm", &bf16_mm, "x [M, K] fp32 @ w [N, K] bf16 ^T -> [M, N] fp32 (exact products, fp32 sums)",
        released_gil());
  m.def("int4_mm", &int4_mm, "x [M, K] fp32 @ int4pack(packed, scale_zero, group)^T -> [M, n_pad] fp32",
        released_gil());
}
