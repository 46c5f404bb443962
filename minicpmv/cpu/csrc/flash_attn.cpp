// Attention in bf16 on AVX512-BF16 (vdpbf16ps), on CPUs with that unit and no AMX: the vision tower's
// (cpu/plan.py: `vision_flash`) and, at the end of this file, a prompt's causal attention in the text
// layers (`prompt_flash`). torch's bf16 SDPA ran a 1,024-patch layer (16 heads of 72) at
// ~127 GFLOP/s on a Zen 4 where vdpbf16ps GEMMs reach ~370: its products there are not on the unit.
//
// Per (sequence, head) the keys are laid out once as the instruction's B operand, one block of 64
// keys after another (Kp[L64 / 64][d/2][64][2]: pairs of head dims), and the values as pairs of keys
// (Vp[L64/2][16 ND][2]). Four queries at a time walk the keys in blocks of 64: scores for 4 x 64 in
// 16 fp32 registers (each instruction: a query's broadcast pair of dims against 16 keys), the
// running max and sum of an online softmax in fp32, the block's probabilities rounded to bf16 once
// (round to nearest even, as a bf16 GEMM rounds its inputs), then out += P V in fp32 registers
// (a broadcast pair of keys against 16 head dims; out waits in L1 between blocks). The output is
// out / sum rounded to bf16, written as [N, L, H d] (what out_proj reads). Keys at or past a
// sequence's length are left out; every query row is computed.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

namespace {

constexpr int64_t KB = 64;  // keys per block

// 2^x for the lanes' x <= 0 (scores less their running max, in log2 units): a degree-4 polynomial on
// the fraction, within ~4e-5 relative, far below the bf16 rounding the probabilities take next
inline __m512 exp2_fraction(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);  // [-1/2, 1/2]
  __m512 p = _mm512_set1_ps(9.6181291e-3f);  // ln2^4 / 24
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// the max of 16 lanes in every lane
inline __m512 all_max(__m512 v) {
  v = _mm512_max_ps(v, _mm512_shuffle_f32x4(v, v, 0x4E));
  v = _mm512_max_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1));
  v = _mm512_max_ps(v, _mm512_permute_ps(v, 0x4E));
  return _mm512_max_ps(v, _mm512_permute_ps(v, 0xB1));
}

struct Heads {  // one (sequence, head)'s operands, packed
  const uint32_t* kp;  // [Lp/64][d/2][64] pairs of head dims
  const uint32_t* vp;  // [Lp/2][DP] pairs of keys
  int64_t len;         // keys taken
};

// Scores of QB query rows against keys 64 b .. 64 b + 63 (s[r][c]: keys 16 c .. 16 c + 15), unscaled
template <int QB>
__attribute__((target("avx512bf16"), always_inline)) inline void block_scores(__m512 (&s)[QB][4],
                                                                             const uint16_t* const* qrow,
                                                                             const uint32_t* kp, int64_t b,
                                                                             int64_t pairs) {
  for (int r = 0; r < QB; ++r)
    for (int c = 0; c < 4; ++c) s[r][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const uint32_t* kv = kp + (b * pairs + p) * KB;
    __m512bh kc[4];
    for (int c = 0; c < 4; ++c) kc[c] = (__m512bh)_mm512_loadu_si512(kv + 16 * c);
    for (int r = 0; r < QB; ++r) {
      uint32_t qp;
      std::memcpy(&qp, qrow[r] + 2 * p, 4);
      const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int>(qp));
      for (int c = 0; c < 4; ++c) s[r][c] = _mm512_dpbf16_ps(s[r][c], qb, kc[c]);
    }
  }
}

// Which of keys j0 .. j0 + 63 a row that sees the first `seen` keys takes, 16 keys a mask
inline void live_keys(int64_t seen, int64_t j0, __mmask16 (&live)[4]) {
  for (int c = 0; c < 4; ++c) {
    const int64_t left = seen - (j0 + 16 * c);
    live[c] = left >= 16 ? 0xFFFF : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
  }
}

// One row's online softmax step over its block of 64 scores, keys outside `live` left out: the
// running max m (log2 units) and sum l updated, the probabilities rounded to bf16 into pb (each
// 32-bit word a pair of neighbouring keys). Returns the rescale of what the row summed before. A row
// that sees none of these keys: top = -inf, so m stays, the rescale is 1 and every probability 0.
__attribute__((target("avx512bf16"), always_inline)) inline __m512 softmax_row(__m512 (&s)[4],
                                                                              const __mmask16 (&live)[4],
                                                                              __m512 sc, __m512& m, __m512& l,
                                                                              uint32_t* pb) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 top = ninf;
  for (int c = 0; c < 4; ++c) {
    s[c] = _mm512_mask_mul_ps(ninf, live[c], s[c], sc);
    top = _mm512_max_ps(top, s[c]);
  }
  const __m512 mn = _mm512_max_ps(m, all_max(top));
  const __m512 alpha = exp2_fraction(_mm512_sub_ps(m, mn));
  m = mn;
  __m512 sum = _mm512_setzero_ps();
  for (int c = 0; c < 4; ++c) {
    s[c] = _mm512_maskz_mov_ps(live[c], exp2_fraction(_mm512_sub_ps(s[c], mn)));
    sum = _mm512_add_ps(sum, s[c]);
  }
  l = _mm512_fmadd_ps(l, alpha, sum);
  _mm512_store_si512(pb, (__m512i)_mm512_cvtne2ps_pbh(s[1], s[0]));
  _mm512_store_si512(pb + 16, (__m512i)_mm512_cvtne2ps_pbh(s[3], s[2]));
  return alpha;
}

// QB query rows (rows clamped to the sequence; results of the copies are not stored)
template <int QB, int ND>
__attribute__((target("avx512bf16"))) void query_block(const uint16_t* const* qrow, uint16_t* const* orow,
                                                      const Heads& hd, int64_t d, float scale) {
  constexpr int DP = ND * 16;
  const int64_t pairs = d / 2;
  // per query, in every lane: the running max (log2 units; a finite floor so that the first
  // block's rescale is 2^-huge = 0), the running sum per lane, the block's rescale
  __m512 m[QB], l[QB], alpha[QB];
  alignas(64) float acc[QB][DP];  // out, between blocks (registers hold it during P V only)
  for (int r = 0; r < QB; ++r) {
    m[r] = _mm512_set1_ps(-1e30f);
    l[r] = _mm512_setzero_ps();
    for (int c = 0; c < ND; ++c) _mm512_store_ps(acc[r] + 16 * c, _mm512_setzero_ps());
  }
  alignas(64) uint32_t pb[QB][KB / 2];
  const int64_t blocks = (hd.len + KB - 1) / KB;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t j0 = b * KB;
    __m512 s[QB][4];
    block_scores<QB>(s, qrow, hd.kp, b, pairs);
    __mmask16 live[4];
    live_keys(hd.len, j0, live);
    const __m512 sc = _mm512_set1_ps(scale * 1.44269504088896341f);  // log2 units
    for (int r = 0; r < QB; ++r) alpha[r] = softmax_row(s[r], live, sc, m[r], l[r], pb[r]);
    __m512 o[QB][ND];
    for (int r = 0; r < QB; ++r) {
      for (int c = 0; c < ND; ++c) o[r][c] = _mm512_mul_ps(_mm512_load_ps(acc[r] + 16 * c), alpha[r]);
    }
    const int64_t jp_end = std::min<int64_t>(KB, hd.len - j0 + 1) / 2;  // pairs holding a live key
    for (int64_t jp = 0; jp < jp_end; ++jp) {
      const uint32_t* vv = hd.vp + (j0 / 2 + jp) * DP;
      __m512bh vc[ND];
      for (int c = 0; c < ND; ++c) vc[c] = (__m512bh)_mm512_loadu_si512(vv + 16 * c);
      for (int r = 0; r < QB; ++r) {
        const __m512bh pp = (__m512bh)_mm512_set1_epi32(static_cast<int>(pb[r][jp]));
        for (int c = 0; c < ND; ++c) o[r][c] = _mm512_dpbf16_ps(o[r][c], pp, vc[c]);
      }
    }
    for (int r = 0; r < QB; ++r)
      for (int c = 0; c < ND; ++c) _mm512_store_ps(acc[r] + 16 * c, o[r][c]);
  }
  for (int r = 0; r < QB; ++r) {
    if (orow[r] == nullptr) continue;
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(l[r]));
    alignas(64) uint16_t out[DP];
    for (int c = 0; c < ND; ++c)
      _mm256_store_si256(reinterpret_cast<__m256i*>(out + 16 * c),
                         (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(acc[r] + 16 * c), inv)));
    std::memcpy(orow[r], out, d * 2);
  }
}

template <int QB, int ND>
void attend(const uint16_t* q, const int64_t* qs, const std::vector<Heads>& heads, uint16_t* out, int64_t N,
            int64_t L, int64_t H, int64_t d, float scale) {
  const int64_t per_head = (L + QB - 1) / QB;
  at::parallel_for(0, N * H * per_head, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t nh = t / per_head, i0 = (t % per_head) * QB, n = nh / H, h = nh % H;
      const uint16_t* qrow[QB];
      uint16_t* orow[QB];
      for (int r = 0; r < QB; ++r) {
        const int64_t i = std::min(i0 + r, L - 1);
        qrow[r] = q + n * qs[0] + i * qs[1] + h * qs[2];
        orow[r] = i0 + r < L ? out + ((n * L + i) * H + h) * d : nullptr;
      }
      query_block<QB, ND>(qrow, orow, heads[nh], d, scale);
    }
  });
}

// One (sequence, head)'s keys (rows `row` bf16 apart) as Kp[Lp / 64][d / 2][64]: 16 keys' pair p
// of head dims a gather; zero past L.
void pack_keys(const uint16_t* k, int64_t row, int64_t L, int64_t pairs, int64_t Lp, uint32_t* kd) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(static_cast<int>(row / 2)));
  for (int64_t j0 = 0; j0 < Lp; j0 += 16) {
    const int64_t left = L - j0;
    uint32_t* o = kd + (j0 / KB) * pairs * KB + j0 % KB;
    if (left <= 0) {
      for (int64_t p = 0; p < pairs; ++p) _mm512_storeu_si512(o + p * KB, _mm512_setzero_si512());
      continue;
    }
    const __mmask16 live = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    const int* base = reinterpret_cast<const int*>(k + j0 * row);
    for (int64_t p = 0; p < pairs; ++p)
      _mm512_storeu_si512(o + p * KB, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, idx, base + p, 4));
  }
}

// Its values as Vp[Lp / 2][DP][2]: keys j and j + 1 interleaved per head dim; zero past the keys
// taken (len: a probability of 0 times what a left-out key holds could be NaN) and past d.
void pack_values(const uint16_t* v, int64_t row, int64_t len, int64_t d, int64_t Lp, int64_t DP, uint16_t* vd) {
  alignas(64) int16_t order[32];
  for (int i = 0; i < 16; ++i) order[2 * i] = static_cast<int16_t>(i), order[2 * i + 1] = static_cast<int16_t>(32 + i);
  const __m512i idx = _mm512_load_si512(order);
  for (int64_t j = 0; j < Lp; j += 2) {
    for (int64_t c = 0; 16 * c < DP; ++c) {
      const int64_t left = d - 16 * c;
      const __mmask16 live = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
      const __m512i a = j < len ? _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(live, v + j * row + 16 * c))
                              : _mm512_setzero_si512();
      const __m512i b = j + 1 < len ? _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(live, v + (j + 1) * row + 16 * c))
                                  : _mm512_setzero_si512();
      _mm512_storeu_si512(vd + (j / 2) * DP * 2 + 32 * c, _mm512_permutex2var_epi16(a, idx, b));
    }
  }
}

void check_qkv(const torch::Tensor& t, const char* name) {
  ARG_CHECK(t.dim() == 4 && t.scalar_type() == torch::kBFloat16 && t.stride(3) == 1, name,
            ": [N, L, H, d] bf16 with contiguous head dims");
  ARG_CHECK(t.stride(0) % 2 == 0 && t.stride(1) % 2 == 0 && t.stride(2) % 2 == 0, name,
            ": strides must be even (the kernel reads head dims in pairs)");
}

}  // namespace

torch::Tensor bf16_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, std::vector<int64_t> lengths,
                             double scale) {
  check_qkv(q, "q");
  check_qkv(k, "k");
  check_qkv(v, "v");
  ARG_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "q, k and v must have one shape");
  ARG_CHECK(bf16_dot_ok(), "this CPU has no AVX512-BF16");
  const int64_t N = q.size(0), L = q.size(1), H = q.size(2), d = q.size(3);
  ARG_CHECK(L >= 1 && d % 2 == 0 && d <= 128, "head dims must be even and at most 128");
  ARG_CHECK(lengths.empty() || static_cast<int64_t>(lengths.size()) == N, "one key length per sequence");
  for (int64_t n : lengths) ARG_CHECK(n >= 1 && n <= L, "key lengths must be in 1..L");
  const int64_t ND = (d + 15) / 16, DP = ND * 16, Lp = (L + KB - 1) / KB * KB, pairs = d / 2;
  // the packed operands, zero past L and past d
  std::unique_ptr<uint32_t[]> kp(new uint32_t[N * H * pairs * Lp]), vp(new uint32_t[N * H * (Lp / 2) * DP]);
  const uint16_t* kptr = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const uint16_t* vptr = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  std::vector<Heads> heads(N * H);
  for (int64_t nh = 0; nh < N * H; ++nh)
    heads[nh] = {kp.get() + nh * pairs * Lp, vp.get() + nh * (Lp / 2) * DP, lengths.empty() ? L : lengths[nh / H]};
  at::parallel_for(0, N * H, 1, [&](int64_t a, int64_t b) {
    for (int64_t nh = a; nh < b; ++nh) {
      const int64_t n = nh / H, h = nh % H;
      pack_keys(kptr + n * k.stride(0) + h * k.stride(2), k.stride(1), L, pairs, Lp, kp.get() + nh * pairs * Lp);
      pack_values(vptr + n * v.stride(0) + h * v.stride(2), v.stride(1), heads[nh].len, d, Lp, DP,
                  reinterpret_cast<uint16_t*>(vp.get() + nh * (Lp / 2) * DP));
    }
  });
  auto out = torch::empty({N, L, H * d}, q.options().memory_format(at::MemoryFormat::Contiguous));
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const int64_t qs[3] = {q.stride(0), q.stride(1), q.stride(2)};
  const float sc = static_cast<float>(scale);
  switch (ND) {  // 4 queries a block up to 80 head dims (20 output registers), 2 beyond
    case 1: attend<4, 1>(qp, qs, heads, op, N, L, H, d, sc); break;
    case 2: attend<4, 2>(qp, qs, heads, op, N, L, H, d, sc); break;
    case 3: attend<4, 3>(qp, qs, heads, op, N, L, H, d, sc); break;
    case 4: attend<4, 4>(qp, qs, heads, op, N, L, H, d, sc); break;
    case 5: attend<4, 5>(qp, qs, heads, op, N, L, H, d, sc); break;
    case 6: attend<2, 6>(qp, qs, heads, op, N, L, H, d, sc); break;
    case 7: attend<2, 7>(qp, qs, heads, op, N, L, H, d, sc); break;
    default: attend<2, 8>(qp, qs, heads, op, N, L, H, d, sc); break;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Causal attention of one sequence's prompt in the text layers (grouped key / value heads, head dims
// up to 256): query t sees keys 0 .. offset + t (the cached context, then the prompt so far). The
// query heads sharing a key head are taken as rows of one block (4 rows: the 4 heads of a position
// when 4 share a key head), so each key / value vector loaded feeds 4 products. Keys and values are
// packed per key head as for the vision kernel; scores of 4 rows x 64 keys in 16 registers, an online
// softmax per row with its own last key, then out += P V a group of 64 head dims at a time (16
// accumulators; out waits in L1 between blocks), the probabilities rounded to bf16 once.
namespace {

template <int W>
__attribute__((target("avx512bf16"))) inline void pv_group(float (*acc)[256], const __m512* alpha, int c0,
                                                          const uint32_t (*pb)[KB / 2], const uint32_t* vp,
                                                          int64_t DP, int64_t jp_end) {
  __m512 o[4][W];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < W; ++c) o[r][c] = _mm512_mul_ps(_mm512_load_ps(acc[r] + 16 * (c0 + c)), alpha[r]);
  for (int64_t jp = 0; jp < jp_end; ++jp) {
    const uint32_t* vv = vp + jp * DP + 16 * c0;
    __m512bh vc[W];
    for (int c = 0; c < W; ++c) vc[c] = (__m512bh)_mm512_loadu_si512(vv + 16 * c);
    for (int r = 0; r < 4; ++r) {
      const __m512bh pp = (__m512bh)_mm512_set1_epi32(static_cast<int>(pb[r][jp]));
      for (int c = 0; c < W; ++c) o[r][c] = _mm512_dpbf16_ps(o[r][c], pp, vc[c]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < W; ++c) _mm512_store_ps(acc[r] + 16 * (c0 + c), o[r][c]);
}

// One block of 4 query rows (copies of a real row where the block runs past the end; their results
// are not stored), row r seeing keys 0 .. last[r]: its online softmax's state between key blocks.
struct RowBlock {
  const uint16_t* qrow[4];
  uint16_t* orow[4];
  int64_t last[4];
  int64_t top_key;  // the last key any of its rows sees
  alignas(64) float m[4][16], l[4][16];  // running max (log2 units) and sum per row, as vectors
  alignas(64) float acc[4][256];         // out per row, unnormalised
};

void start_block(RowBlock& rb, int64_t nd) {
  rb.top_key = 0;
  for (int r = 0; r < 4; ++r) {
    _mm512_store_ps(rb.m[r], _mm512_set1_ps(-1e30f));  // a finite floor: the first rescale is 2^-huge = 0
    _mm512_store_ps(rb.l[r], _mm512_setzero_ps());
    for (int64_t c = 0; c < nd; ++c) _mm512_store_ps(rb.acc[r] + 16 * c, _mm512_setzero_ps());
    rb.top_key = std::max(rb.top_key, rb.last[r]);
  }
}

// key block b (keys 64 b .. 64 b + 63) into a block's state
__attribute__((target("avx512bf16"))) void causal_step(RowBlock& rb, int64_t b, const Heads& hd, int64_t d,
                                                      float scale) {
  const int64_t pairs = d / 2, ND = (d + 15) / 16, DP = ND * 16, j0 = b * KB;
  const __m512 sc = _mm512_set1_ps(scale * 1.44269504088896341f);  // log2 units
  __m512 s[4][4];
  block_scores<4>(s, rb.qrow, hd.kp, b, pairs);
  __m512 alpha[4];
  alignas(64) uint32_t pb[4][KB / 2];
  for (int r = 0; r < 4; ++r) {
    __mmask16 live[4];
    live_keys(rb.last[r] + 1, j0, live);
    __m512 m = _mm512_load_ps(rb.m[r]), l = _mm512_load_ps(rb.l[r]);
    alpha[r] = softmax_row(s[r], live, sc, m, l, pb[r]);
    _mm512_store_ps(rb.m[r], m);
    _mm512_store_ps(rb.l[r], l);
  }
  const int64_t jp_end = std::min<int64_t>(KB, rb.top_key - j0 + 2) / 2;  // pairs holding a key any row sees
  const uint32_t* vp = hd.vp + (j0 / 2) * DP;
  int c0 = 0;
  for (; c0 + 4 <= ND; c0 += 4) pv_group<4>(rb.acc, alpha, c0, pb, vp, DP, jp_end);
  switch (ND - c0) {
    case 3: pv_group<3>(rb.acc, alpha, c0, pb, vp, DP, jp_end); break;
    case 2: pv_group<2>(rb.acc, alpha, c0, pb, vp, DP, jp_end); break;
    case 1: pv_group<1>(rb.acc, alpha, c0, pb, vp, DP, jp_end); break;
    default: break;
  }
}

__attribute__((target("avx512bf16"))) void finish_block(const RowBlock& rb, int64_t d) {
  const int64_t ND = (d + 15) / 16;
  for (int r = 0; r < 4; ++r) {
    if (rb.orow[r] == nullptr) continue;
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(_mm512_load_ps(rb.l[r])));
    alignas(64) uint16_t out[256];
    for (int64_t c = 0; c < ND; ++c)
      _mm256_store_si256(reinterpret_cast<__m256i*>(out + 16 * c),
                         (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(rb.acc[r] + 16 * c), inv)));
    std::memcpy(rb.orow[r], out, d * 2);
  }
}

// Query blocks taken together: each key block is read from memory once for all of them (then from
// the caches), not once per block of 4 rows; 8 blocks' states are ~37 KB
constexpr int64_t GROUP = 8;

}  // namespace

torch::Tensor bf16_causal_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t offset,
                                    double scale) {
  ARG_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q [T, H, d], k and v [offset + T, Hkv, d]");
  for (const auto* t : {&q, &k, &v}) {
    ARG_CHECK(t->scalar_type() == torch::kBFloat16 && t->stride(2) == 1, "q, k, v: bf16 with contiguous head dims");
    ARG_CHECK(t->stride(0) % 2 == 0 && t->stride(1) % 2 == 0, "strides must be even (the kernel reads head dims in pairs)");
  }
  ARG_CHECK(bf16_dot_ok(), "this CPU has no AVX512-BF16");
  const int64_t T = q.size(0), H = q.size(1), d = q.size(2), S = k.size(0), Hkv = k.size(1);
  ARG_CHECK(T >= 1 && offset >= 0 && S == offset + T, "k and v hold offset + T keys (the context, then the prompt)");
  ARG_CHECK(v.sizes() == k.sizes() && k.size(2) == d, "k and v must have one shape, with q's head dims");
  ARG_CHECK(Hkv >= 1 && H % Hkv == 0, "the query heads must be a multiple of the key heads");
  ARG_CHECK(d % 2 == 0 && d <= 256, "head dims must be even and at most 256");
  const int64_t g = H / Hkv, ND = (d + 15) / 16, DP = ND * 16, Sp = (S + KB - 1) / KB * KB, pairs = d / 2;
  std::unique_ptr<uint32_t[]> kp(new uint32_t[Hkv * pairs * Sp]), vp(new uint32_t[Hkv * (Sp / 2) * DP]);
  const uint16_t* kptr = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const uint16_t* vptr = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  std::vector<Heads> heads(Hkv);
  for (int64_t h = 0; h < Hkv; ++h) heads[h] = {kp.get() + h * pairs * Sp, vp.get() + h * (Sp / 2) * DP, S};
  at::parallel_for(0, Hkv, 1, [&](int64_t a, int64_t b) {
    for (int64_t h = a; h < b; ++h) {
      pack_keys(kptr + h * k.stride(1), k.stride(0), S, pairs, Sp, kp.get() + h * pairs * Sp);
      pack_values(vptr + h * v.stride(1), v.stride(0), S, d, Sp, DP,
                  reinterpret_cast<uint16_t*>(vp.get() + h * (Sp / 2) * DP));
    }
  });
  auto out = torch::empty({T, H * d}, q.options().memory_format(at::MemoryFormat::Contiguous));
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  // rows of key head h: (t, head h g + i) in order of t, 4 to a block, GROUP blocks to a task; a
  // task's cost grows with its t, so tasks are dealt cheap, dear, cheap, dear... and each thread's
  // contiguous share costs about the same
  const int64_t rows = T * g, per_head = (rows + 3) / 4, groups = (per_head + GROUP - 1) / GROUP, n = Hkv * groups;
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, n, 1, [&](int64_t t0, int64_t t1) {
    std::unique_ptr<RowBlock[]> blocks(new RowBlock[GROUP]);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t f = t % 2 == 0 ? t / 2 : n - 1 - t / 2;  // in order of cost: group, then key head
      const int64_t grp = f / Hkv, h = f % Hkv, first = grp * GROUP, count = std::min(GROUP, per_head - first);
      int64_t top = 0;
      for (int64_t i = 0; i < count; ++i) {
        RowBlock& rb = blocks[i];
        for (int r = 0; r < 4; ++r) {
          const int64_t row = std::min((first + i) * 4 + r, rows - 1), pos = row / g, head = h * g + row % g;
          rb.qrow[r] = qp + pos * qs0 + head * qs1;
          rb.orow[r] = (first + i) * 4 + r < rows ? op + (pos * H + head) * d : nullptr;
          rb.last[r] = offset + pos;
        }
        start_block(rb, ND);
        top = std::max(top, rb.top_key);
      }
      for (int64_t b = 0; b <= top / KB; ++b)
        for (int64_t i = 0; i < count; ++i)
          if (blocks[i].top_key >= b * KB) causal_step(blocks[i], b, heads[h], d, sc);
      for (int64_t i = 0; i < count; ++i) finish_block(blocks[i], d);
    }
  });
  return out;
}
