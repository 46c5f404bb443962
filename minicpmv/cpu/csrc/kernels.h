// What the extension's two sources share (cpu/native.py builds quant_gemv.cpp and
// decode_layers.cpp into one module): the few-row products, the decode helpers on raw rows, and
// the vector exp they use.
#pragma once
#include <torch/extension.h>
#include <immintrin.h>

#include "rows_common.h"

#include <cstdint>

// ---- few-row products: x [M, K] fp32 contiguous -> [M, N] fp32 (int4: [M, n_pad]) ----
torch::Tensor int8_mm(torch::Tensor x, torch::Tensor q, torch::Tensor scale);
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
torch::Tensor int4_mm(torch::Tensor x, torch::Tensor packed, torch::Tensor sz, int64_t group);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps, c10::optional<torch::Tensor> gate);

// Software prefetch ahead of a decode product's weight streams, as the CPU plan says (set_prefetch):
// into L1 (the AMX Xeon's choice), into L2 only (a Zen 4's: into L1 slowed its streams), or none.
enum Prefetch : int64_t { PF_OFF = 0, PF_L1 = 1, PF_L2 = 2 };
extern int64_t walk_prefetch;
inline void walk_ahead(const void* p) {
  if (walk_prefetch == PF_L1) _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
  else if (walk_prefetch == PF_L2) _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1);
}

// ---- one decode token on raw rows ----
// y[c] = silu(sum_j window[c, j] w[c, j] + x[c] w[c, K-1]) for C channels; the window [C, K-1] moves
// on by x into `next` (which may be `window` itself).
void conv_token(const float* window, float* next, const float* x, const float* w, float* y, int64_t C, int64_t K);
// One value head of the gated delta rule: q, k [dk] (l2-normalised here, eps inside the root, q
// times scale), v [dv]; the state S [dk, dv] decays by exp(g), takes beta (v - S^T k) along k;
// out [dv] = S^T q.
void delta_head(const float* q, const float* k, const float* v, float g, float beta, float scale, float eps,
                float* S, float* out, int64_t dk, int64_t dv);
// The same token on q times rq and k times rk as given (no norms).
void delta_token(const float* q, const float* k, const float* v, float g, float beta, float rq, float rk,
                 float* S, float* out, int64_t dk, int64_t dv);
// y = x / sqrt(mean(x^2) + eps) * w over D values, times silu(gate) when gate is not null (y may be x).
void rms_row(const float* x, const float* w, const float* gate, float eps, float* y, int64_t D);

// The fused decode layers (decode_layers.cpp) add themselves to the module.
void register_decode_layers(pybind11::module& m);

// exp on 16 floats (Cephes' single-precision polynomial, ~1 ulp over the clamped range).
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// x / (1 + e^-z) for 16 lanes (exp16 above): silu (z = x) and the tanh GELU (x sigmoid(2u), u its
// tanh argument)
inline __m512 times_sigmoid(__m512 x, __m512 z) {
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), z))));
}
