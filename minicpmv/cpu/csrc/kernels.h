// What the AVX-512 extension's sources share beyond decode.h (cpu/native.py builds quant_gemv.cpp,
// bf16_dot.cpp, flash_attn.cpp and the shared decode sources into one module): the bf16 products
// and the sums of the 4 x 4 tiles (the software prefetch of the decode walks is decode.h's).
#pragma once
#include "decode.h"

#include <immintrin.h>

#include <cstdint>

torch::Tensor bf16_mm(torch::Tensor x, torch::Tensor w);
torch::Tensor bf16_amx_mm(torch::Tensor x, torch::Tensor w);
// x rounded to bf16, vdpbf16ps rows (bf16_dot.cpp) of a plain or a tiled w (bf16_tile);
// bf16_dot_ok(): whether this CPU has AVX512-BF16
torch::Tensor bf16_dot_mm(torch::Tensor x, torch::Tensor w, bool tiled);
torch::Tensor bf16_tile(torch::Tensor w);
torch::Tensor bf16_untile(torch::Tensor w, c10::optional<torch::Tensor> out);
bool bf16_dot_ok();
// q, k, v [N, L, H, d] bf16 (head dims contiguous), keys past lengths[n] left out -> [N, L, H d] bf16
// (flash_attn.cpp: vdpbf16ps, fp32 softmax and sums)
torch::Tensor bf16_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, std::vector<int64_t> lengths,
                             double scale);
torch::Tensor bf16_causal_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t offset,
                                    double scale);

// ---- the sums of a tile's accumulators (bf16_dot.cpp's and quant_gemv.cpp's 4 x 4 tiles) ----
// The 16 sums of acc[r][m] (4 weight rows x 4 activation rows) in one vector, 128 bits per
// activation row m: [sum acc[0][m], sum acc[1][m], sum acc[2][m], sum acc[3][m]]. Each lane is
// summed as _mm512_reduce_add_ps sums one vector (lane i + lane i+8, then + i+4, + i+2, + i+1; a
// float sum does not depend on its operands' order), so the bits are those of 16 such calls, for
// 45 instructions instead of 16 whole reductions.
inline __m512 sum_4x4(const __m512 (&acc)[4][4]) {
  __m512 w[4];
  for (int r = 0; r < 4; ++r) {
    // [m0 lanes 0-7 | m1 lanes 0-7] + [m0 lanes 8-15 | m1 lanes 8-15], then the same for m2, m3
    const __m512 v0 = _mm512_add_ps(_mm512_shuffle_f32x4(acc[r][0], acc[r][1], _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_f32x4(acc[r][0], acc[r][1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 v1 = _mm512_add_ps(_mm512_shuffle_f32x4(acc[r][2], acc[r][3], _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_f32x4(acc[r][2], acc[r][3], _MM_SHUFFLE(3, 2, 3, 2)));
    // 128 bits per m: its lanes 0-3 + its lanes 4-7
    w[r] = _mm512_add_ps(_mm512_shuffle_f32x4(v0, v1, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(v0, v1, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  // per m: [lane 0 + 2, lane 1 + 3] of rows r and r + 1, then lane 0 + lane 1 for rows 0..3
  const __m512 z01 = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 z23 = _mm512_add_ps(_mm512_shuffle_ps(w[2], w[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_ps(w[2], w[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_ps(z01, z23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(z01, z23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// acc[r][m]'s sums into y[(m0 + m) N + n0 + r] (a row-major [M, N] output), times scale[r] when
// given (one float per weight row: the same product per lane as per scalar sum)
template <int R, int MR>
inline void store_sums(const __m512 (&acc)[R][MR], float* y, int64_t N, int64_t n0, int64_t m0,
                       const float* scale = nullptr) {
  if constexpr (R == 4 && MR == 4) {
    __m512 s = sum_4x4(acc);
    if (scale) s = _mm512_mul_ps(s, _mm512_broadcast_f32x4(_mm_loadu_ps(scale)));
    _mm_storeu_ps(y + (m0 + 0) * N + n0, _mm512_extractf32x4_ps(s, 0));
    _mm_storeu_ps(y + (m0 + 1) * N + n0, _mm512_extractf32x4_ps(s, 1));
    _mm_storeu_ps(y + (m0 + 2) * N + n0, _mm512_extractf32x4_ps(s, 2));
    _mm_storeu_ps(y + (m0 + 3) * N + n0, _mm512_extractf32x4_ps(s, 3));
  } else {
    for (int r = 0; r < R; ++r) {
      const float s = scale ? scale[r] : 1.0f;  // x 1 changes no bits
      for (int m = 0; m < MR; ++m) y[(m0 + m) * N + n0 + r] = _mm512_reduce_add_ps(acc[r][m]) * s;
    }
  }
}
