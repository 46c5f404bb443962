// Few-row products with int8 / int4 weight-only matrices on AVX2 + FMA: what CPUs without AVX-512
// (most laptops, AMD Zen 1-3) run for decode where torch's `_weight_int8pack_mm` and
// `_weight_int4pack_mm_for_cpu` are compute-bound (cpu/native.py builds it as its own module, with
// the same calls and the same arithmetic as the AVX-512 module's int8_mm / int4_mm / int4_widen_t).
//
// int8: q [N, K] int8 in [-127, 127] row-major, one bf16 scale per row. K % 32 == 0: the activations
//   rounded to int8 per block of 32 inputs (d = max|x| / 127, llama.cpp's Q8_0 rounding) and the
//   block's exact int32 sum sum q a taken with vpmaddubsw on (|a|, q signed by a) (no pair can
//   saturate: 2 * 127 * 127 < 32767) and vpmaddwd; times d in fp32. Other K: fp32 activations,
//   codes converted in registers, fp32 sums.
// int4: layers/weight_formats.py's `int4_pack` layout (per block of 64 rows, K x 32 bytes, byte
//   (k, j): row j in the low nibble, row j + 32 in the high one; torch's AVX-512 packing), scale/offset pairs
//   [K / group, n_pad, 2] bf16, w = (q - 8) s + z. Per block of 32 inputs sum q a runs on
//   vpmaddubsw (codes unsigned, activations int8 as above) in int16 (8 steps of 4 inputs: at most
//   8 * 2 * 15 * 127 = 30480), widened once by vpmaddwd, minus 8 sum a, times d s; per group z sum x.
//   Byte unpacks gather each row's codes of 4 consecutive inputs into one 32-bit lane: the lanes of
//   vector i hold rows {4i..4i+3, 16+4i..16+4i+3} (low nibbles) and those + 32 (high nibbles).
//
// The module also holds the decode helpers and fused decode layers (decode_rows.cpp,
// decode_layers.cpp), written once on simd.h's vectors and built here for AVX2.
#include "decode.h"

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// Software prefetch distances (bytes ahead in a weight stream) of the int8 / int4 walks and tiles, as
// the plan says (walk_ahead, decode.h): one stream per weight row (int8), one per block of 64 rows
// (int4). On a Zen 3 (2 threads, the 4.6's matrices, alternated in one run, twice) into L2 at 2 / 4
// KB ahead read 1.13-1.21x faster than none at one row (int8; int4 1.18-1.24x) and 1.4x at 8 int8
// rows; 1 / 2, 4 / 8 and 8 / 16 KB (the AVX-512 extension's) were no better, into L1 no better than L2.
constexpr int64_t PF_ROWS = 2048, PF_INT4 = 4096;

// Per row of x [M, K] and block of 32 inputs: the codes a, |a|, d, -8 sum a; per group the fp32 sum of x.
struct Activations {
  std::vector<int8_t> q, abs;  // [M, K]
  std::vector<float> d;        // [M, K / 32]
  std::vector<int32_t> off;    // [M, K / 32]
  std::vector<float> sum;      // [M, K / group] (group > 0)
};

Activations round_activations(const float* x, int64_t M, int64_t K, int64_t group) {
  const int64_t G = group > 0 ? K / group : 0;
  Activations a{std::vector<int8_t>(M * K), std::vector<int8_t>(M * K), std::vector<float>(M * K / 32),
                std::vector<int32_t>(M * K / 32), std::vector<float>(M * G)};
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; k += 32) {
      int8_t* qb = a.q.data() + m * K + k;
      a.d[(m * K + k) / 32] = round_block32(x + m * K + k, qb);
      int32_t sum_a = 0;
      for (int i = 0; i < 32; ++i) {
        sum_a += qb[i];
        a.abs[m * K + k + i] = static_cast<int8_t>(std::abs(qb[i]));
      }
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

inline __m256i load32(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// sum over one block of 32 inputs of w a, in 8 int32 lanes: vpmaddubsw(|a|, w signed by a), vpmaddwd
inline __m256i int8_block(const int8_t* w, const int8_t* a, const int8_t* abs_a) {
  const __m256i aa = load32(a);
  const __m256i p16 = _mm256_maddubs_epi16(load32(abs_a), _mm256_sign_epi8(load32(w), aa));
  return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

// R weight rows (R * MR accumulators) against MR activation rows, K % 32 == 0.
template <int R, int MR>
void int8_tile(const int8_t* q, const uint16_t* scale, const Activations& a, float* y, int64_t K, int64_t N,
               int64_t n0, int64_t m0) {
  __m256 acc[R][MR];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    if ((k & 63) == 0)
      for (int r = 0; r < R; ++r) walk_ahead(q + (n0 + r) * K + k + PF_ROWS);
    for (int m = 0; m < MR; ++m) {
      const int64_t at = (m0 + m) * K + k;
      const __m256 d = _mm256_set1_ps(a.d[at / 32]);
      for (int r = 0; r < R; ++r) {
        const __m256i s = int8_block(q + (n0 + r) * K + k, a.q.data() + at, a.abs.data() + at);
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), d, acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const float s = bf16_to_float(scale[n0 + r]);
    for (int m = 0; m < MR; ++m) y[(m0 + m) * N + n0 + r] = simd::sum(acc[r][m]) * s;
  }
}

template <int R>
void int8_rows(const int8_t* q, const uint16_t* scale, const Activations& a, float* y, int64_t K, int64_t N,
               int64_t M, int64_t n0) {
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) int8_tile<R, 4>(q, scale, a, y, K, N, n0, m0);
  switch (M - m0) {
    case 3: int8_tile<R, 3>(q, scale, a, y, K, N, n0, m0); break;
    case 2: int8_tile<R, 2>(q, scale, a, y, K, N, n0, m0); break;
    case 1: int8_tile<R, 1>(q, scale, a, y, K, N, n0, m0); break;
    default: break;
  }
}

// Up to WALK_ROWS activation rows (a small decode batch): each weight row read front to back, one
// after another (one sequential stream per thread; two interleaved rows ran at 2/3 of this on a Zen
// 3, and 2-4 activation rows on int8_tile's pairs of rows took 1.4-1.7x the time of this walk on a
// 7168x1024 matrix; at 8 rows both took the same); the same sums in the same order as int8_tile's,
// bit for bit (a row's result does not depend on its batch).
constexpr int64_t WALK_ROWS = 4;

template <int MR>
void int8_walk(const int8_t* q, const uint16_t* scale, const Activations& a, float* y, int64_t K, int64_t N,
               int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = q + n * K;
    __m256 acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      if ((k & 63) == 0) walk_ahead(row + k + PF_ROWS);
      for (int m = 0; m < MR; ++m) {
        const int64_t at = m * K + k;
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(int8_block(row + k, a.q.data() + at, a.abs.data() + at)),
                                 _mm256_set1_ps(a.d[at / 32]), acc[m]);
      }
    }
    const float s = bf16_to_float(scale[n]);
    for (int m = 0; m < MR; ++m) y[m * N + n] = simd::sum(acc[m]) * s;
  }
}

// All M <= WALK_ROWS activation rows over weight rows n0..n1
void int8_walk_rows(const int8_t* q, const uint16_t* scale, const Activations& a, float* y, int64_t K, int64_t N,
                    int64_t M, int64_t n0, int64_t n1) {
  switch (M) {
    case 4: int8_walk<4>(q, scale, a, y, K, N, n0, n1); break;
    case 3: int8_walk<3>(q, scale, a, y, K, N, n0, n1); break;
    case 2: int8_walk<2>(q, scale, a, y, K, N, n0, n1); break;
    default: int8_walk<1>(q, scale, a, y, K, N, n0, n1); break;
  }
}

// fp32 activations, codes widened in registers (K % 8 == 0)
void int8_fp32_rows(const int8_t* q, const uint16_t* scale, const float* x, float* y, int64_t K, int64_t N,
                    int64_t M, int64_t n) {
  const float s = bf16_to_float(scale[n]);
  for (int64_t m = 0; m < M; ++m) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
      const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + n * K + k))));
      acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * K + k), acc);
    }
    y[m * N + n] = simd::sum(acc) * s;
  }
}

// The 8 vectors of codes (low / high nibbles of 4 unpacked byte vectors) of inputs k..k+3 of a 64-row
// block, as unsigned bytes: vector i < 4 rows {4i..4i+3, 16+4i..}, i >= 4 the same rows + 32.
inline void int4_codes(const uint8_t* p, __m256i c[8]) {
  const __m256i nib = _mm256_set1_epi8(0x0f);
  const __m256i P0 = load32(p), P1 = load32(p + 32), P2 = load32(p + 64), P3 = load32(p + 96);
  const __m256i l01 = _mm256_unpacklo_epi8(P0, P1), h01 = _mm256_unpackhi_epi8(P0, P1);
  const __m256i l23 = _mm256_unpacklo_epi8(P2, P3), h23 = _mm256_unpackhi_epi8(P2, P3);
  const __m256i v[4] = {_mm256_unpacklo_epi16(l01, l23), _mm256_unpackhi_epi16(l01, l23),
                        _mm256_unpacklo_epi16(h01, h23), _mm256_unpackhi_epi16(h01, h23)};
  for (int i = 0; i < 4; ++i) {
    c[i] = _mm256_and_si256(v[i], nib);
    c[4 + i] = _mm256_and_si256(_mm256_srli_epi16(v[i], 4), nib);
  }
}

// 8 uint32 (scale, offset) pairs of the rows vector i holds: {base + 4i..+3, base + 16 + 4i..+3}, +32 for i >= 4
inline __m256i int4_pairs(const uint32_t* sz_rows, int i) {
  const uint32_t* p = sz_rows + (i >= 4 ? 32 : 0) + 4 * (i & 3);
  return _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(p + 16), reinterpret_cast<const __m128i*>(p));
}

// One block of 64 rows against the activation rows m0..m0+MR (MR codes unpacked once per 4 inputs).
template <int MR>
void int4_block(const uint8_t* w, const uint32_t* sz, const Activations& a, float* y, int64_t K, int64_t group,
                int64_t n_pad, int64_t nb, int64_t m0) {
  const int64_t G = K / group;
  const __m256i hi16 = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 tot[MR][8];
  for (int m = 0; m < MR; ++m)
    for (int i = 0; i < 8; ++i) tot[m][i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint32_t* szg = sz + g * n_pad + nb;
    for (int64_t kb = g * group; kb < (g + 1) * group; kb += 32) {
      __m256i acc[MR][8];
      for (int m = 0; m < MR; ++m)
        for (int i = 0; i < 8; ++i) acc[m][i] = _mm256_setzero_si256();
      for (int64_t k = kb; k < kb + 32; k += 4) {
        walk_ahead(w + k * 32 + PF_INT4);
        walk_ahead(w + k * 32 + PF_INT4 + 64);
        __m256i c[8];
        int4_codes(w + k * 32, c);
        for (int m = 0; m < MR; ++m) {
          int32_t four;
          std::memcpy(&four, a.q.data() + (m0 + m) * K + k, 4);
          const __m256i xa = _mm256_set1_epi32(four);
          for (int i = 0; i < 8; ++i) acc[m][i] = _mm256_add_epi16(acc[m][i], _mm256_maddubs_epi16(c[i], xa));
        }
      }
      for (int m = 0; m < MR; ++m) {
        const int64_t at = ((m0 + m) * K + kb) / 32;
        const __m256i off = _mm256_set1_epi32(a.off[at]);
        const __m256 d = _mm256_set1_ps(a.d[at]);
        for (int i = 0; i < 8; ++i) {
          const __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(int4_pairs(szg, i), 16));
          const __m256i sum = _mm256_add_epi32(_mm256_madd_epi16(acc[m][i], ones), off);
          tot[m][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(s, d), tot[m][i]);
        }
      }
    }
    for (int i = 0; i < 8; ++i) {
      const __m256 z = _mm256_castsi256_ps(_mm256_and_si256(int4_pairs(szg, i), hi16));
      for (int m = 0; m < MR; ++m) tot[m][i] = _mm256_fmadd_ps(z, _mm256_set1_ps(a.sum[(m0 + m) * G + g]), tot[m][i]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int i = 0; i < 8; ++i) {
      float* out = y + (m0 + m) * n_pad + nb + (i >= 4 ? 32 : 0) + 4 * (i & 3);
      _mm256_storeu2_m128(out + 16, out, tot[m][i]);
    }
}

}  // namespace

torch::Tensor int8_mm(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  check_int8(x, q, scale);
  const int64_t N = q.size(0), K = q.size(1), M = x.size(0);
  auto y = torch::empty({M, N}, x.options());
  const int8_t* qp = q.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (K % 32 != 0) {
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) int8_fp32_rows(qp, sp, xp, yp, K, N, M, n);
    });
    return y;
  }
  const Activations a = round_activations(xp, M, K, 0);
  if (M <= WALK_ROWS) {
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { int8_walk_rows(qp, sp, a, yp, K, N, M, n0, n1); });
    return y;
  }
  at::parallel_for(0, (N + 1) / 2, 32, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * 2;
      if (n0 + 2 <= N) int8_rows<2>(qp, sp, a, yp, K, N, M, n0);
      else int8_rows<1>(qp, sp, a, yp, K, N, M, n0);
    }
  });
  return y;
}

torch::Tensor int4_mm(torch::Tensor x, torch::Tensor packed, torch::Tensor sz, int64_t group) {
  check_int4(packed, sz, group);
  const int64_t n_pad = packed.size(0), K = packed.size(1) * 2, M = x.size(0);
  check_x(x, K);
  const Activations act = round_activations(x.data_ptr<float>(), M, K, group);
  auto y = torch::empty({M, n_pad}, x.options());
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const uint32_t* szp = reinterpret_cast<const uint32_t*>(sz.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n_pad / 64, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* w = wp + b * 64 * (K / 2);
      int64_t m0 = 0;
      for (; m0 + 2 <= M; m0 += 2) int4_block<2>(w, szp, act, yp, K, group, n_pad, b * 64, m0);
      if (m0 < M) int4_block<1>(w, szp, act, yp, K, group, n_pad, b * 64, m0);
    }
  });
  return y;
}

// The int4 matrix's blocks b0..b1 (64 rows each) widened to W^T [K, 64 (b1 - b0)] in bf16 or fp32 (what a
// prompt's GEMM multiplies): each input k holds 64 consecutive rows, one contiguous run of the output row.
torch::Tensor int4_widen_t(torch::Tensor packed, torch::Tensor sz, int64_t group, int64_t b0, int64_t b1, bool bf16) {
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
    const __m256i hi16 = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
    const __m256i nib = _mm256_set1_epi32(0x0f);
    const __m256 eight = _mm256_set1_ps(8.0f);
    for (int64_t b = c0; b < c1; ++b) {
      const uint8_t* w = wp + b * 64 * (K / 2);
      const int64_t col = (b - b0) * 64;
      for (int64_t g = 0; g < G; ++g) {
        __m256 s[8], base[8];  // rows 8i..8i+7
        for (int i = 0; i < 8; ++i) {
          const __m256i d = load32(szp + g * n_pad + b * 64 + 8 * i);
          s[i] = _mm256_castsi256_ps(_mm256_slli_epi32(d, 16));
          base[i] = _mm256_fnmadd_ps(eight, s[i], _mm256_castsi256_ps(_mm256_and_si256(d, hi16)));
        }
        for (int64_t k = g * group; k < (g + 1) * group; ++k) {
          const uint8_t* p = w + k * 32;
          for (int i = 0; i < 8; ++i) {  // rows 8i..8i+7: bytes 8(i&3).., low nibbles for i < 4
            const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * (i & 3))));
            const __m256i code = _mm256_and_si256(i < 4 ? bytes : _mm256_srli_epi32(bytes, 4), nib);
            const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(code), s[i], base[i]);  // (q - 8) s + z
            if (bf16) {
              simd::store_bf16(ob + k * cols + col + 8 * i, v);
            } else {
              _mm256_storeu_ps(of + k * cols + col + 8 * i, v);
            }
          }
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "minicpmv's AVX2 + FMA few-row int8 / int4 products, decode helpers and fused decode layers (cpu/native.py)";
  register_decode_layers(m);
  register_decode_rows(m);
  m.def("int8_mm", &int8_mm, "x [M, K] fp32 @ (q [N, K] int8 * scale [N] bf16)^T -> [M, N] fp32", released_gil());
  m.def("int4_mm", &int4_mm, "x [M, K] fp32 @ int4pack(packed, scale_zero, group)^T -> [M, n_pad] fp32",
        released_gil());
  m.def("int4_widen_t", &int4_widen_t, "int4 blocks b0..b1 -> W^T [K, 64 (b1 - b0)] in bf16 (or fp32)",
        py::arg("packed"), py::arg("sz"), py::arg("group"), py::arg("b0"), py::arg("b1"), py::arg("bf16"),
        released_gil());
}
