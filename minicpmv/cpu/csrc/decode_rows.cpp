// The decode helpers on raw rows and the prompt's DeltaNet and activation passes, written once on
// the vector calls of simd.h and built into both CPU modules (cpu/native.py): the AVX-512
// extension and the AVX2 module. Each module's value per lane is the same fma chain; only the
// horizontal sums (RMSNorm's sum of squares) add 16 lanes or 8.
#include "decode.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

void conv_token(const float* window, float* next, const float* x, const float* w, float* y, int64_t C, int64_t K) {
  for (int64_t c = 0; c < C; ++c) {
    const float* win = window + c * (K - 1);
    const float* wc = w + c * K;
    float* nw = next + c * (K - 1);
    float acc = 0.f;
    for (int64_t j = 0; j < K - 1; ++j) acc += win[j] * wc[j];
    const float xv = x[c];
    acc += xv * wc[K - 1];
    y[c] = acc;
    for (int64_t j = 0; j + 1 < K - 1; ++j) nw[j] = win[j + 1];  // ascending: safe in place
    nw[K - 2] = xv;
  }
  int64_t c = 0;
  for (; c + simd::L <= C; c += simd::L) {  // silu
    const simd::vf v = simd::load(y + c);
    simd::store(y + c, simd::times_sigmoid(v, v));
  }
  for (; c < C; ++c) y[c] = y[c] / (1.0f + std::exp(-y[c]));
}

// One token of Gated DeltaNet's short causal conv: per channel c of row b, the window is the
// K-1 cached inputs then x; y = silu(sum_j window_j w[c, j]); the new window drops the oldest.
std::vector<torch::Tensor> conv_step(torch::Tensor window, torch::Tensor x, torch::Tensor w) {
  ARG_CHECK(window.scalar_type() == torch::kFloat && window.is_contiguous() && window.dim() == 3,
            "window: contiguous [B, C, K-1] fp32");
  const int64_t B = window.size(0), C = window.size(1), K = window.size(2) + 1;
  ARG_CHECK(K >= 2, "the conv window must hold at least one past input");
  ARG_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.numel() == B * C, "x: contiguous [B, C] fp32");
  ARG_CHECK(w.scalar_type() == torch::kFloat && w.is_contiguous() && w.numel() == C * K, "w: contiguous [C, K] fp32");
  auto y = torch::empty({B, C}, x.options());
  auto next = torch::empty_like(window);
  const float *cs = window.data_ptr<float>(), *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *np = next.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    conv_token(cs + b * C * (K - 1), np + b * C * (K - 1), xp + b * C, wp, yp + b * C, C, K);
  return {y, next};
}

namespace {

// The factors that l2-normalise a token's q (times scale) and k, eps inside each root: the decode
// step's and the prompt rule's, one computation so that both take the same floats.
std::pair<float, float> qk_factors(const float* q, const float* k, float scale, float eps, int64_t dk) {
  float qq = 0.f, kk = 0.f;
  for (int64_t d = 0; d < dk; ++d) {
    qq += q[d] * q[d];
    kk += k[d] * k[d];
  }
  return {scale / std::sqrt(qq + eps), 1.0f / std::sqrt(kk + eps)};
}

}  // namespace

void delta_head(const float* q, const float* k, const float* v, float g, float beta, float scale, float eps,
                float* S, float* out, int64_t dk, int64_t dv) {
  const auto [rq, rk] = qk_factors(q, k, scale, eps, dk);
  delta_token(q, k, v, g, beta, rq, rk, S, out, dk, dv);
}

void delta_token(const float* q, const float* k, const float* v, float g, float beta, float rq, float rk,
                 float* S, float* out, int64_t dk, int64_t dv) {
  float kv[1024];
  for (int64_t j = 0; j < dv; j += simd::L) simd::store(kv + j, simd::zero());
  for (int64_t d = 0; d < dk; ++d) {  // S^T k, before the decay
    const simd::vf kd = simd::set1(k[d] * rk);
    for (int64_t j = 0; j < dv; j += simd::L)
      simd::store(kv + j, simd::fmadd(kd, simd::load(S + d * dv + j), simd::load(kv + j)));
  }
  const simd::vf dec = simd::set1(std::exp(g)), btv = simd::set1(beta);
  for (int64_t j = 0; j < dv; j += simd::L)  // delta = beta (v - decay S^T k)
    simd::store(kv + j, simd::mul(btv, simd::fnmadd(dec, simd::load(kv + j), simd::load(v + j))));
  for (int64_t j = 0; j < dv; j += simd::L) simd::store(out + j, simd::zero());
  for (int64_t d = 0; d < dk; ++d) {
    const simd::vf kd = simd::set1(k[d] * rk), qd = simd::set1(q[d] * rq);
    float* row = S + d * dv;
    for (int64_t j = 0; j < dv; j += simd::L) {
      const simd::vf s = simd::fmadd(kd, simd::load(kv + j), simd::mul(dec, simd::load(row + j)));
      simd::store(row + j, s);
      simd::store(out + j, simd::fmadd(qd, s, simd::load(out + j)));
    }
  }
}

// One token of the gated delta rule for n sequences, each state [Hv, dk, dv] updated in place:
// y [n, C] holds the conv outputs (q [Hk, dk], k [Hk, dk], v [Hv, dv]); q and k are l2-normalised
// (eps inside the root), q scaled; value head h reads key head h / (Hv / Hk).
//   S <- exp(g) S;  delta = beta (v - S^T k);  S <- S + k delta^T;  o = S^T q
// in two passes over each head's state (read; then update and output).
torch::Tensor delta_step(torch::Tensor y, torch::Tensor g, torch::Tensor beta, torch::Tensor state,
                         int64_t Hk, double scale, double eps) {
  ARG_CHECK(state.scalar_type() == torch::kFloat && state.is_contiguous() && state.dim() == 4,
            "state: contiguous [n, Hv, dk, dv] fp32");
  const int64_t n = state.size(0), Hv = state.size(1), dk = state.size(2), dv = state.size(3);
  ARG_CHECK(Hk > 0 && Hv % Hk == 0, "value heads must be a multiple of key heads");
  ARG_CHECK(dv % 16 == 0 && dv <= 1024, "dv must be a multiple of 16, at most 1024");
  const int64_t C = 2 * Hk * dk + Hv * dv;
  ARG_CHECK(y.scalar_type() == torch::kFloat && y.is_contiguous() && y.numel() == n * C, "y: contiguous [n, C] fp32");
  ARG_CHECK(g.scalar_type() == torch::kFloat && g.is_contiguous() && g.numel() == n * Hv, "g: contiguous [n, Hv] fp32");
  ARG_CHECK(beta.scalar_type() == torch::kFloat && beta.is_contiguous() && beta.numel() == n * Hv,
            "beta: contiguous [n, Hv] fp32");
  auto o = torch::empty({n, Hv, dv}, y.options());
  const float *yp = y.data_ptr<float>(), *gp = g.data_ptr<float>(), *bp = beta.data_ptr<float>();
  float *sp = state.data_ptr<float>(), *op = o.data_ptr<float>();
  const int64_t rep = Hv / Hk;
  const float e = static_cast<float>(eps), sc = static_cast<float>(scale);
  at::parallel_for(0, n * Hv, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hv, h = i % Hv, kh = h / rep;
      delta_head(yp + b * C + kh * dk, yp + b * C + Hk * dk + kh * dk, yp + b * C + 2 * Hk * dk + h * dv, gp[i], bp[i],
                 sc, e, sp + i * dk * dv, op + i * dv, dk, dv);
    }
  });
  return o;
}

// q and k of one token of a key head as the decode step uses them (delta_head, delta_token)
void normalized_qk(const float* q, const float* k, float scale, float eps, float* qn, float* kn, int64_t dk) {
  const auto [rq, rk] = qk_factors(q, k, scale, eps, dk);
  for (int64_t d = 0; d < dk; ++d) {
    qn[d] = q[d] * rq;
    kn[d] = k[d] * rk;
  }
}

// One value head's block of NZ x L value columns over the T tokens of a prompt: S [dk, dv-strided
// rows] advanced in place, o rows `os` floats apart. The token's q and k come normalised
// (qn, kn [T, dk]); each value is the fma chain of delta_token, bit for bit. The columns of a head
// are independent, so the block (dk x 4 L floats: 32 KB with AVX-512, 16 with AVX2) stays in L1
// across the tokens, where delta_token walks the whole 64 KB head from L2 twice per token; and the update pass of token t
// also sums S^T k of token t + 1 on the values just written (the next token's first pass).
template <int NZ>
void delta_block(const float* qn, const float* kn, const float* v, int64_t vs, const float* g, const float* beta,
                 int64_t gs, float* S, float* o, int64_t os, int64_t T, int64_t dk, int64_t dv) {
  simd::vf kv[NZ], nx[NZ], acc[NZ];
  for (int z = 0; z < NZ; ++z) kv[z] = simd::zero();
  for (int64_t d = 0; d < dk; ++d) {  // S^T k of the first token
    const simd::vf kd = simd::set1(kn[d]);
    for (int z = 0; z < NZ; ++z) kv[z] = simd::fmadd(kd, simd::load(S + d * dv + simd::L * z), kv[z]);
  }
  for (int64_t t = 0; t < T; ++t) {
    const float* qt = qn + t * dk;
    const float* kt = kn + t * dk;
    // the next token's key; the last token sums against its own, a result nobody reads
    const float* kx = t + 1 < T ? kt + dk : kt;
    const simd::vf dec = simd::set1(std::exp(g[t * gs])), btv = simd::set1(beta[t * gs]);
    for (int z = 0; z < NZ; ++z) {
      kv[z] = simd::mul(btv, simd::fnmadd(dec, kv[z], simd::load(v + t * vs + simd::L * z)));  // delta
      acc[z] = simd::zero();
      nx[z] = simd::zero();
    }
    for (int64_t d = 0; d < dk; ++d) {
      const simd::vf kd = simd::set1(kt[d]), qd = simd::set1(qt[d]), nd = simd::set1(kx[d]);
      float* row = S + d * dv;
      for (int z = 0; z < NZ; ++z) {
        const simd::vf s = simd::fmadd(kd, kv[z], simd::mul(dec, simd::load(row + simd::L * z)));
        simd::store(row + simd::L * z, s);
        acc[z] = simd::fmadd(qd, s, acc[z]);
        nx[z] = simd::fmadd(nd, s, nx[z]);
      }
    }
    for (int z = 0; z < NZ; ++z) {
      simd::store(o + t * os + simd::L * z, acc[z]);
      kv[z] = nx[z];
    }
  }
}

// The rule over the T tokens of a prompt with the decode step's arithmetic (delta_step's, token
// after token, bit for bit): y [B, T, C] the conv outputs (q [Hk, dk], k [Hk, dk], v [Hv, dv] per
// token), g, beta [B, T, Hv]; state [B, Hv, dk, dv] advanced in place -> o [B, T, Hv, dv]. q and k
// are normalised once per key head and token, then each task runs one value head's block of columns.
torch::Tensor delta_rule_prompt(torch::Tensor y, torch::Tensor g, torch::Tensor beta, torch::Tensor state,
                                int64_t Hk, double scale, double eps) {
  for (const auto* t : {&y, &g, &beta, &state})
    ARG_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous(), "delta_rule_prompt: contiguous fp32 tensors");
  ARG_CHECK(state.dim() == 4 && y.dim() == 3, "y [B, T, C], state [B, Hv, dk, dv]");
  const int64_t B = y.size(0), T = y.size(1), Hv = state.size(1), dk = state.size(2), dv = state.size(3);
  ARG_CHECK(Hk > 0 && Hv % Hk == 0, "value heads must be a multiple of key heads");
  const int64_t C = 2 * Hk * dk + Hv * dv;
  ARG_CHECK(state.size(0) == B && y.size(2) == C, "y's rows must hold q, k and v of the state's heads");
  ARG_CHECK(g.numel() == B * T * Hv && beta.numel() == B * T * Hv, "g, beta: [B, T, Hv]");
  ARG_CHECK(dv % 16 == 0, "dv must be a multiple of 16");
  auto o = torch::empty({B, T, Hv, dv}, y.options());
  auto qkn = torch::empty({B, Hk, 2, T, dk}, y.options());  // normalised q, then k, per key head
  const float *yp = y.data_ptr<float>(), *gp = g.data_ptr<float>(), *bp = beta.data_ptr<float>();
  float *sp = state.data_ptr<float>(), *op = o.data_ptr<float>(), *np = qkn.data_ptr<float>();
  const float sc = static_cast<float>(scale), e = static_cast<float>(eps);
  at::parallel_for(0, B * Hk, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hk, kh = i % Hk;
      float* qn = np + i * 2 * T * dk;
      for (int64_t t = 0; t < T; ++t) {
        const float* row = yp + (b * T + t) * C;
        normalized_qk(row + kh * dk, row + Hk * dk + kh * dk, sc, e, qn + t * dk, qn + (T + t) * dk, dk);
      }
    }
  });
  const int nz = dv % (4 * simd::L) == 0 ? 4 : dv % (2 * simd::L) == 0 ? 2 : 1;
  const int64_t blocks = dv / (simd::L * nz), rep = Hv / Hk;
  auto run = nz == 4 ? delta_block<4> : nz == 2 ? delta_block<2> : delta_block<1>;
  if (T > 0)
    at::parallel_for(0, B * Hv * blocks, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t head = i / blocks, c = (i % blocks) * simd::L * nz, b = head / Hv, h = head % Hv;
        const float* qn = np + (b * Hk + h / rep) * 2 * T * dk;
        run(qn, qn + T * dk, yp + b * T * C + 2 * Hk * dk + h * dv + c, C, gp + b * T * Hv + h, bp + b * T * Hv + h, Hv,
            sp + head * dk * dv + c, op + (b * T * Hv + h) * dv + c, Hv * dv, T, dk, dv);
      }
    });
  return o;
}

void rms_row(const float* xr, const float* wp, const float* g, float e, float* yr, int64_t D) {
  simd::vf acc = simd::zero();
  int64_t d = 0;
  for (; d + simd::L <= D; d += simd::L) {
    const simd::vf v = simd::load(xr + d);
    acc = simd::fmadd(v, v, acc);
  }
  float ss = simd::sum(acc);
  for (; d < D; ++d) ss += xr[d] * xr[d];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + e);
  for (d = 0; d < D; ++d) {
    float v = xr[d] * inv * wp[d];
    if (g) v *= g[d] / (1.0f + std::exp(-g[d]));
    yr[d] = v;
  }
}

// y = x / sqrt(mean(x^2) + eps) * w over the last dimension (fp32), times silu(gate) when given: the
// norms of a decode step are ~100 calls on one row each, where torch's composite F.rms_norm costs
// ~50-60 us of dispatch per call on the AMX Xeon and this loop a few.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps, c10::optional<torch::Tensor> gate) {
  ARG_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous(), "x must be contiguous fp32");
  ARG_CHECK(w.scalar_type() == torch::kFloat && w.is_contiguous() && w.dim() == 1, "w must be [D] fp32");
  const int64_t D = w.numel();
  ARG_CHECK(x.dim() >= 1 && x.size(-1) == D, "x's last dimension is ", x.size(-1), ", the weight's ", D);
  const float* g = nullptr;
  if (gate.has_value()) {
    ARG_CHECK(gate->scalar_type() == torch::kFloat && gate->is_contiguous() && gate->sizes() == x.sizes(),
              "gate must be contiguous fp32 shaped like x");
    g = gate->data_ptr<float>();
  }
  auto y = torch::empty_like(x);
  const int64_t rows = D ? x.numel() / D : 0;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  auto body = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rms_row(xp + r * D, wp, g ? g + r * D : nullptr, e, yp + r * D, D);
  };
  if (rows * D < (1 << 16)) {
    body(0, rows);  // one decode row: threads cost more than they save
  } else {
    at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(D, 1)), body);
  }
  return y;
}

// ---- activations of a prompt's bf16 hidden tensors (fp32 math, one rounding to bf16) ----

// One pass over a [rows, width] bf16 tensor, L lanes at a time (width % 16 == 0).
template <typename F>
static void rowwise_bf16(int64_t rows, int64_t width, F f) {
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(width, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < width; c += simd::L) f(r, c);
  });
}

// gate_up [.., 2I] bf16 (gate then up) -> silu(gate) * up [.., I] bf16, rounded once
torch::Tensor silu_mul_bf16(torch::Tensor gate_up) {
  ARG_CHECK(gate_up.scalar_type() == torch::kBFloat16 && gate_up.is_contiguous(), "gate_up must be contiguous bf16");
  const int64_t I = gate_up.size(-1) / 2;
  ARG_CHECK(gate_up.size(-1) == 2 * I && I % 16 == 0, "gate_up's last dimension must be 2 x a multiple of 16");
  auto sizes = gate_up.sizes().vec();
  sizes.back() = I;
  auto out = torch::empty(sizes, gate_up.options());
  const uint16_t* in = reinterpret_cast<const uint16_t*>(gate_up.data_ptr<at::BFloat16>());
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  rowwise_bf16(gate_up.numel() / (2 * I), I, [&](int64_t r, int64_t c) {
    const simd::vf g = simd::load_bf16(in + r * 2 * I + c), u = simd::load_bf16(in + r * 2 * I + I + c);
    simd::store_bf16(o + r * I + c, simd::mul(simd::times_sigmoid(g, g), u));
  });
  return out;
}

// tanh-approximated GELU of a bf16 tensor (last dimension % 16 == 0), in place
torch::Tensor gelu_tanh_bf16_(torch::Tensor x) {
  ARG_CHECK(x.scalar_type() == torch::kBFloat16 && x.is_contiguous(), "x must be contiguous bf16");
  const int64_t W = x.size(-1);
  ARG_CHECK(W % 16 == 0, "x's last dimension must be a multiple of 16");
  uint16_t* p = reinterpret_cast<uint16_t*>(x.data_ptr<at::BFloat16>());
  const simd::vf k2 = simd::set1(2.0f * 0.7978845608028654f), c = simd::set1(0.044715f);
  rowwise_bf16(W ? x.numel() / W : 0, W, [&](int64_t r, int64_t col) {
    const simd::vf v = simd::load_bf16(p + r * W + col);
    const simd::vf z = simd::mul(k2, simd::fmadd(simd::mul(c, v), simd::mul(v, v), v));
    simd::store_bf16(p + r * W + col, simd::times_sigmoid(v, z));
  });
  return x;
}

// A prompt's depthwise causal conv + silu in one pass: x [B, T, C] (fp32 or bf16 rows, any row
// stride, unit channel stride), past [B, K-1, C] fp32 (the cached inputs, oldest first), w [C, K]
// fp32 -> y [B, T, C] fp32 = silu(sum_j in[t + j] w[:, j]), in = past then x.
template <typename In>
static void conv_prompt_rows(const In* x, int64_t sb, int64_t sr, const float* past, const float* wt, float* y,
                             int64_t B, int64_t T, int64_t C, int64_t K) {
  at::parallel_for(0, B * T, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(C * K, 1)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / T, t = i % T;
      float* out = y + i * C;
      for (int64_t c = 0; c < C; c += simd::L) {
        simd::vf acc = simd::zero();
        for (int64_t j = 0; j < K; ++j) {
          const int64_t src = t + j - (K - 1);  // < 0: a cached input
          simd::vf v;
          if (src < 0) {
            v = simd::load(past + (b * (K - 1) + (K - 1 + src)) * C + c);
          } else if constexpr (std::is_same_v<In, float>) {
            v = simd::load(x + b * sb + src * sr + c);
          } else {
            v = simd::load_bf16(reinterpret_cast<const uint16_t*>(x + b * sb + src * sr + c));
          }
          acc = simd::fmadd(v, simd::load(wt + j * C + c), acc);
        }
        simd::store(out + c, simd::times_sigmoid(acc, acc));
      }
    }
  });
}

torch::Tensor conv_prompt(torch::Tensor x, torch::Tensor past, torch::Tensor w_t) {
  ARG_CHECK(x.dim() == 3 && x.stride(2) == 1, "x: [B, T, C] with unit channel stride");
  ARG_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16, "x must be fp32 or bf16");
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), K = w_t.size(0);
  ARG_CHECK(C % 16 == 0, "the channels must be a multiple of 16");
  ARG_CHECK(w_t.scalar_type() == torch::kFloat && w_t.is_contiguous() && w_t.dim() == 2 && w_t.size(1) == C,
            "w_t: contiguous [K, C] fp32");
  ARG_CHECK(past.scalar_type() == torch::kFloat && past.is_contiguous() && past.dim() == 3 && past.size(0) == B &&
            past.size(1) == K - 1 && past.size(2) == C, "past: contiguous [B, K-1, C] fp32");
  auto y = torch::empty({B, T, C}, x.options().dtype(torch::kFloat));
  if (x.scalar_type() == torch::kFloat) {
    conv_prompt_rows(x.data_ptr<float>(), x.stride(0), x.stride(1), past.data_ptr<float>(), w_t.data_ptr<float>(),
                     y.data_ptr<float>(), B, T, C, K);
  } else {
    conv_prompt_rows(x.data_ptr<at::BFloat16>(), x.stride(0), x.stride(1), past.data_ptr<float>(),
                     w_t.data_ptr<float>(), y.data_ptr<float>(), B, T, C, K);
  }
  return y;
}


int64_t walk_prefetch = PF_L1;

void set_prefetch(int64_t mode) {
  ARG_CHECK(mode >= PF_OFF && mode <= PF_L2, "prefetch mode: 0 off, 1 into L1, 2 into L2");
  walk_prefetch = mode;
}

void register_decode_rows(pybind11::module& m) {
  namespace py = pybind11;
  m.def("set_prefetch", &set_prefetch,
        "software prefetch in the module's decode weight walks: 0 off, 1 into L1, 2 into L2");
  m.def("conv_step", &conv_step, "one token of the depthwise causal conv + silu -> (y, next window)", released_gil());
  m.def("delta_rule_prompt", &delta_rule_prompt,
        "the gated delta rule over a prompt's conv outputs, the decode step's arithmetic, states in place -> o",
        released_gil());
  m.def("delta_step", &delta_step, "one token of the gated delta rule, states updated in place -> o [n, Hv, dv]",
        released_gil());
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim in fp32, optionally times silu(gate)",
        py::arg("x"), py::arg("w"), py::arg("eps"), py::arg("gate") = py::none(), released_gil());
  m.def("silu_mul_bf16", &silu_mul_bf16, "gate_up [.., 2I] bf16 -> silu(gate) * up [.., I] bf16 (fp32 math)",
        released_gil());
  m.def("gelu_tanh_bf16_", &gelu_tanh_bf16_, "tanh GELU of a bf16 tensor in place (fp32 math)", released_gil());
  m.def("conv_prompt", &conv_prompt, "a prompt's causal conv + silu: x [B, T, C], past [B, K-1, C], w_t [K, C] -> fp32",
        released_gil());
}
