// bf16 rows on AVX512-BF16 (vdpbf16ps) for the few activation rows of a decode step, on CPUs with
// that unit and no AMX (cpu/plan.py: `bf16_dot`). The activations are rounded to bf16 once (round
// to nearest even, as a bf16 GEMM rounds a prompt's), then each instruction multiplies 32 weights
// of a row by 32 inputs, pairwise into 16 fp32 lanes, summed when the row ends. Per weight that is
// one multiply-add against the FMA kernel's load, widen, shift and multiply-add (quant_gemv.cpp's
// rows_tile), which on a Zen 4 left one row's stream compute-bound well below the memory's rate.
// Several activation rows run in tiles of 4 weight rows x up to 4 activation rows, one row alone
// runs dot_row; both keep one accumulator per (weight row, activation row) over k in order, so a
// row's result does not depend on how many rows share the call. Denormal inputs count as
// zero (the instructions' rule). K % 32 == 0. Compiled for any AVX-512 CPU (the functions that use
// the unit carry their own target); bf16_dot_ok() says whether this CPU has it.
// A matrix may also be stored in tiles of 4 rows (bf16_tile): per tile, per 32 columns, the 4 rows'
// 32 weights side by side ([N/4, K/32, 4, 32]; the last N % 4 rows stay plain after the tiles, where
// a plain matrix keeps them), so a tile is one run of memory read front to back in the order its
// multiply-adds take it. Rows of plain matrices sit K apart, and 4 x 4 tiles over them
// read 4 streams at once: 8 decode rows of the 4.6's matrices streamed 28-33 GB/s that way against
// 32-38 from tiles (Zen 5, 2 threads, cold; its lm_head 15.9 -> 12.2 ms). Same sums bit for bit.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

namespace {

template <int R, int MR>
__attribute__((target("avx512bf16"))) void dot_tile(const uint16_t* w, const uint16_t* xb, float* y, int64_t K,
                                                   int64_t N, int64_t n0, int64_t m0) {
  __m512 acc[R][MR];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(xb + (m0 + m) * K + k);
    for (int r = 0; r < R; ++r) {
      const uint16_t* row = w + (n0 + r) * K + k;
      // the same place in the next tile's rows (R rows on): over its k loop a tile asks for the
      // whole next tile, whatever K is (8 KB ahead fell inside this tile for K > 1,024: 8 rows of
      // the 4.6's out_proj and down_proj streamed at 23-24 GB/s, 27-31 this way); past the last
      // tile it names memory outside w, which a prefetch never faults on
      walk_ahead(row + R * K);
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(row);
      for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xv[m]);
    }
  }
  store_sums<R, MR>(acc, y, N, n0, m0);
}

// One activation row (the usual decode step): weight rows one after another, each read front to
// back, so a thread walks one sequential stream that the hardware prefetcher follows; no software
// prefetch (on the Zen 4 it only slowed this walk: one 233 MB matrix 27.5 GB/s without, 20.5 with).
// One accumulator per row over k in order, as dot_tile keeps per pair: the same sums bit for bit.
__attribute__((target("avx512bf16"))) void dot_row(const uint16_t* w, const uint16_t* xb, float* y, int64_t K,
                                                  int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  const uint16_t* row = w + n * K;
  for (int64_t k = 0; k < K; k += 32)
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(row + k), (__m512bh)_mm512_loadu_si512(xb + k));
  y[n] = _mm512_reduce_add_ps(acc);
}

template <int R>
__attribute__((target("avx512bf16"))) void dot_rows(const uint16_t* w, const uint16_t* xb, float* y, int64_t K,
                                                   int64_t N, int64_t M, int64_t n0) {
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) dot_tile<R, 4>(w, xb, y, K, N, n0, m0);
  switch (M - m0) {
    case 3: dot_tile<R, 3>(w, xb, y, K, N, n0, m0); break;
    case 2: dot_tile<R, 2>(w, xb, y, K, N, n0, m0); break;
    case 1: dot_tile<R, 1>(w, xb, y, K, N, n0, m0); break;
    default: break;
  }
}

// Activation rows m0..m0+MR-1 against tile t (rows 4t..4t+3) of a tiled matrix; prefetches the same
// place in the next tile (4 K weights on), as dot_tile does (past the last tile: never a fault).
template <int MR>
__attribute__((target("avx512bf16"))) void tiled_tile(const uint16_t* w, const uint16_t* xb, float* y, int64_t K,
                                                     int64_t N, int64_t t, int64_t m0) {
  __m512 acc[4][MR];
  for (int r = 0; r < 4; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
  const uint16_t* tile = w + t * 4 * K;
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(xb + (m0 + m) * K + k);
    const uint16_t* block = tile + 4 * k;
    for (int r = 0; r < 4; ++r) {
      walk_ahead(block + r * 32 + 4 * K);
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(block + r * 32);
      for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xv[m]);
    }
  }
  store_sums<4, MR>(acc, y, N, t * 4, m0);
}

__attribute__((target("avx512bf16"))) void tiled_rows(const uint16_t* w, const uint16_t* xb, float* y, int64_t K,
                                                     int64_t N, int64_t M, int64_t t) {
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) tiled_tile<4>(w, xb, y, K, N, t, m0);
  switch (M - m0) {
    case 3: tiled_tile<3>(w, xb, y, K, N, t, m0); break;
    case 2: tiled_tile<2>(w, xb, y, K, N, t, m0); break;
    case 1: tiled_tile<1>(w, xb, y, K, N, t, m0); break;
    default: break;
  }
}

// plain [N, K] <-> tiled (above), K % 32 == 0: a copy in the other order, into `out` when given
torch::Tensor retile(const torch::Tensor& w, bool to_tiles, c10::optional<torch::Tensor> into = c10::nullopt) {
  ARG_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16 && w.is_contiguous(), "w: contiguous [N, K] bf16");
  const int64_t N = w.size(0), K = w.size(1);
  ARG_CHECK(K % 32 == 0, "tiles need K % 32 == 0, got ", N, " x ", K);
  ARG_CHECK(!into || (into->sizes() == w.sizes() && into->scalar_type() == torch::kBFloat16 && into->is_contiguous()),
            "out: contiguous bf16 of w's shape");
  auto out = into ? *into : torch::empty_like(w);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  // raw writes only (no tensor op on `out`): a scratch made under inference mode is written outside it too
  const int64_t tail = (N - N % 4) * K;
  std::memcpy(dst + tail, src + tail, (N % 4) * K * sizeof(uint16_t));
  at::parallel_for(0, N / 4, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t k = 0; k < K; k += 32)
        for (int64_t r = 0; r < 4; ++r) {  // 32 weights (one cache line) at a time
          const int64_t plain = (t * 4 + r) * K + k, tiled = t * 4 * K + 4 * k + r * 32;
          _mm512_storeu_si512(dst + (to_tiles ? tiled : plain), _mm512_loadu_si512(src + (to_tiles ? plain : tiled)));
        }
  });
  return out;
}

// x [M, K] fp32 -> bf16 bits, round to nearest even (vcvtneps2bf16); n = M K, a multiple of 32
__attribute__((target("avx512bf16"))) void round_rows(const float* x, uint16_t* xb, int64_t n) {
  for (int64_t i = 0; i < n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xb + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
}

}  // namespace

bool bf16_dot_ok() { return __builtin_cpu_supports("avx512bf16"); }

torch::Tensor bf16_tile(torch::Tensor w) { return retile(w, true); }
torch::Tensor bf16_untile(torch::Tensor w, c10::optional<torch::Tensor> out) { return retile(w, false, out); }

torch::Tensor bf16_dot_mm(torch::Tensor x, torch::Tensor w, bool tiled) {
  ARG_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16 && w.is_contiguous(), "w: contiguous [N, K] bf16");
  const int64_t N = w.size(0), K = w.size(1), M = x.size(0);
  check_x(x, K);
  ARG_CHECK(K % 32 == 0, "K must be a multiple of 32");
  ARG_CHECK(bf16_dot_ok(), "this CPU has no AVX512-BF16");
  auto xb = torch::empty({M, K}, x.options().dtype(torch::kBFloat16));
  uint16_t* xbp = reinterpret_cast<uint16_t*>(xb.data_ptr<at::BFloat16>());
  round_rows(x.data_ptr<float>(), xbp, M * K);
  auto y = torch::empty({M, N}, x.options());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * 4;
      if (tiled && n0 + 4 <= N) {
        tiled_rows(wp, xbp, yp, K, N, M, b);
      } else if (M == 1) {
        for (int64_t n = n0; n < std::min(N, n0 + 4); ++n) dot_row(wp, xbp, yp, K, n);
      } else if (n0 + 4 <= N) {
        dot_rows<4>(wp, xbp, yp, K, N, M, n0);
      } else {
        for (int64_t n = n0; n < N; ++n) dot_rows<1>(wp, xbp, yp, K, N, M, n);
      }
    }
  });
  return y;
}
