// A decode step's layers of the Qwen3.5 text tower (MiniCPM-V 4.6/4.7) in one call each, for
// the few rows of a decode batch: the same kernels the layer's modules call one by one from
// Python (the module's few-row products, fbgemm's fp16-packed GEMV, the norm, conv and delta-rule
// helpers of decode_rows.cpp), without the ~60 dispatched tensor ops and Python calls around them
// per layer (layers/fused_decode.py says when a layer qualifies). Built into both CPU modules
// (cpu/native.py): the bf16 matrix kinds exist in the AVX-512 extension only.
#include "decode.h"

#include <ATen/Parallel.h>
#include <ATen/native/quantized/PackedParams.h>
#include <torch/csrc/jit/python/pybind_utils.h>

#ifdef __AVX512F__
#include "kernels.h"
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// One per-token matrix as its module stores it (layers/weight_formats.py), multiplied the way
// that module multiplies a few fp32 rows.
struct Lin {
  // BF16_DOT: bf16_dot_mm's rows; BF16_TILES: the same on a matrix stored in tiles (bf16_tile);
  // FP16: fbgemm's fp16-packed matrix (layers/fp16_packed.py), fp32 math
  enum Kind : int64_t { BF16 = 0, INT8 = 1, INT4 = 2, CAT = 3, BF16_DOT = 4, BF16_TILES = 5, FP16 = 6 };
  int64_t kind, group, out, amx_rows;
  torch::Tensor a, b;                  // bf16: weight; int8: codes, scales; int4: packed, scale_zero
  c10::optional<torch::Tensor> perm;  // a GPTQ act-order checkpoint's input permutation
  std::vector<Lin> parts;              // CAT: matrices on the same input, outputs side by side
  c10::intrusive_ptr<LinearPackedParamsBase> fp16;  // FP16: the packed matrix

  // One block of fbgemm's fp16-packed rows (a torch.ScriptObject from linear_prepack_fp16), `out` rows
  Lin(pybind11::object packed, int64_t out) : kind(FP16), group(0), out(out), amx_rows(0) {
    const auto type = c10::getCustomClassType<c10::intrusive_ptr<LinearPackedParamsBase>>();
    fp16 = torch::jit::toIValue(packed, type).toCustomClass<LinearPackedParamsBase>();
  }

  // Projections a checkpoint keeps apart (a GPTQ checkpoint's q/k/v, gate/up, DeltaNet's four
  // input projections) as the one matrix the layer reads
  explicit Lin(std::vector<Lin> parts) : kind(CAT), group(0), out(0), amx_rows(0), parts(std::move(parts)) {
    ARG_CHECK(!this->parts.empty(), "no matrices to put side by side");
    for (const Lin& p : this->parts) out += p.out;
  }

  Lin(int64_t kind, torch::Tensor a, c10::optional<torch::Tensor> b, int64_t group, int64_t out, int64_t amx_rows,
      c10::optional<torch::Tensor> perm)
      : kind(kind), group(group), out(out), amx_rows(amx_rows), a(std::move(a)), b(b ? *b : torch::Tensor()),
        perm(std::move(perm)) {
    ARG_CHECK(kind == BF16_DOT || kind == BF16_TILES || (kind >= BF16 && kind <= INT4), "unknown matrix kind ", kind);
#ifndef __AVX512F__
    ARG_CHECK(kind == INT8 || kind == INT4, "bf16 matrices run on the AVX-512 extension only");
#endif
    ARG_CHECK(kind == BF16 || kind >= BF16_DOT || this->b.defined(), "int8 / int4 matrices need their scales");
  }

  // x [M, K] fp32 contiguous -> [M, >= out] fp32 (int4: its padded width; read with the stride)
  torch::Tensor operator()(const torch::Tensor& x) const {
    if (kind == CAT) {
      auto y = torch::empty({x.size(0), out}, x.options());
      int64_t at = 0;
      for (const Lin& p : parts) {
        y.narrow(1, at, p.out).copy_(p(x).narrow(1, 0, p.out));
        at += p.out;
      }
      return y;
    }
    if (kind == FP16) return fp16->apply_dynamic(x);
    const torch::Tensor in = perm ? x.index_select(1, *perm) : x;
    if (kind == INT8) return int8_mm(in, a, b);
    if (kind == INT4) return int4_mm(in, a, b, group);
#ifdef __AVX512F__
    if (kind == BF16_TILES) return bf16_dot_mm(in, a, true);
    const int64_t M = in.size(0);
    const bool amx = amx_rows > 0 && M >= amx_rows && M <= 16;
    return amx ? bf16_amx_mm(in, a) : kind == BF16_DOT ? bf16_dot_mm(in, a, false) : bf16_mm(in, a);
#else
    ARG_CHECK(false, "unreachable: bf16 kinds are refused at construction");
#endif
  }
};

void check_f32(const torch::Tensor& t, const char* what) {
  ARG_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous(), what, " must be contiguous fp32");
}

// x += y[:, :D] (y's rows may be padded)
void add_rows(torch::Tensor& x, const torch::Tensor& y) {
  const int64_t B = x.size(0), D = x.size(1), ys = y.stride(0);
  float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < B; ++r)
    for (int64_t d = 0; d < D; ++d) xp[r * D + d] += yp[r * ys + d];
}

// x + down(silu(gate) * up) with gate | up = gate_up(rms_norm(x)): the MLP half of a layer
torch::Tensor mlp_block(torch::Tensor x, torch::Tensor norm_w, double eps, const Lin& gate_up, const Lin& down) {
  check_f32(x, "x");
  ARG_CHECK(gate_up.out % 2 == 0 && down.out == x.size(1), "gate_up must be [2I, D] and down [D, I]");
  const int64_t B = x.size(0), I = gate_up.out / 2;
  const torch::Tensor gu = gate_up(rms_norm(x, norm_w, eps, c10::nullopt));
  auto act = torch::empty({B, I}, x.options());
  const float* g = gu.data_ptr<float>();
  float* ap = act.data_ptr<float>();
  for (int64_t r = 0; r < B; ++r) {
    const float* gr = g + r * gu.stride(0);
    float* o = ap + r * I;
    int64_t i = 0;
    for (; i + simd::L <= I; i += simd::L) {
      const simd::vf v = simd::load(gr + i);
      simd::store(o + i, simd::mul(simd::times_sigmoid(v, v), simd::load(gr + I + i)));
    }
    for (; i < I; ++i) o[i] = gr[i] / (1.0f + std::exp(-gr[i])) * gr[I + i];
  }
  auto y = x.clone();
  add_rows(y, down(act));
  return y;
}

// A gated DeltaNet layer for one decode token of each of B sequences (x [B, D], the residual
// stream), their conv windows and recurrent states advanced in place in the pool at `slots`, then
// the layer's MLP. in_proj's rows are qkv [C] | z [Hv dv] | b [Hv] | a [Hv]; beta = sigmoid(b),
// g = -exp(A_log) softplus(a + dt_bias); the output is norm(o) silu(z) through out_proj.
torch::Tensor delta_layer(torch::Tensor x, torch::Tensor in_norm_w, torch::Tensor post_norm_w, double eps,
                          const Lin& in_proj, const Lin& out_proj, const Lin& gate_up, const Lin& down,
                          torch::Tensor conv_pool, torch::Tensor conv_w, torch::Tensor rec_pool,
                          std::vector<int64_t> slots, torch::Tensor neg_a, torch::Tensor dt_bias,
                          torch::Tensor o_norm_w, double o_eps, int64_t Hk, double q_scale, double l2_eps) {
  for (auto* t : {&x, &in_norm_w, &post_norm_w, &conv_pool, &conv_w, &rec_pool, &neg_a, &dt_bias, &o_norm_w})
    check_f32(*t, "every tensor of the layer");
  const int64_t B = x.size(0), D = x.size(1);
  ARG_CHECK(static_cast<int64_t>(slots.size()) == B, "one slot per row");
  const int64_t S = rec_pool.size(0), Hv = rec_pool.size(1), dk = rec_pool.size(2), dv = rec_pool.size(3);
  const int64_t C = conv_pool.size(1), K = conv_pool.size(2) + 1, V = Hv * dv;
  ARG_CHECK(Hk > 0 && Hv % Hk == 0 && C == 2 * Hk * dk + V && dv % 16 == 0 && dv <= 1024,
            "the state pool does not fit the layer");
  ARG_CHECK(conv_w.numel() == C * K && conv_pool.size(0) == S, "conv weight [C, K] and windows [S, C, K-1]");
  ARG_CHECK(in_proj.out == C + V + 2 * Hv && out_proj.out == D, "in_proj / out_proj widths");
  ARG_CHECK(neg_a.numel() == Hv && dt_bias.numel() == Hv && o_norm_w.numel() == dv,
            "decay rates and dt_bias per value head, the output norm over one head");
  for (int64_t s : slots) ARG_CHECK(s >= 0 && s < S, "slot ", s, " outside the pool's ", S);

  const torch::Tensor proj = in_proj(rms_norm(x, in_norm_w, eps, c10::nullopt));
  const float* pp = proj.data_ptr<float>();
  const int64_t ps = proj.stride(0);
  auto y = torch::empty({B, C}, x.options());
  auto gb = torch::empty({B, 2, Hv}, x.options());  // g, beta
  float *yp = y.data_ptr<float>(), *gbp = gb.data_ptr<float>();
  const float *na = neg_a.data_ptr<float>(), *dt = dt_bias.data_ptr<float>();
  float* cp = conv_pool.data_ptr<float>();
  const float* cw = conv_w.data_ptr<float>();
  // rows and spans of their channels in parallel: each reads its cold conv window from the pool (8
  // rows of the real-size 4.6, 18 layers: 2.6 ms a step on one thread; one row: ~50 us a layer on
  // one thread of a Zen 3). Spans are whole vectors, so every channel takes the same path as in one
  // pass over the row.
  const int64_t spans = std::max<int64_t>(1, std::min<int64_t>(C / 1024, 8)), span = (C / spans + 15) / 16 * 16;
  at::parallel_for(0, B * spans, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / spans, c0 = std::min(C, i % spans * span);
      const int64_t c1 = i % spans == spans - 1 ? C : std::min(C, c0 + span);
      float* win = cp + slots[r] * C * (K - 1) + c0 * (K - 1);
      conv_token(win, win, pp + r * ps + c0, cw + c0 * K, yp + r * C + c0, c1 - c0, K);
      if (i % spans != 0) continue;
      const float* bv = pp + r * ps + C + V;
      for (int64_t h = 0; h < Hv; ++h) {
        const float u = bv[Hv + h] + dt[h];
        gbp[(r * 2) * Hv + h] = na[h] * (u > 20.f ? u : std::log1p(std::exp(u)));  // torch's softplus threshold
        gbp[(r * 2 + 1) * Hv + h] = 1.0f / (1.0f + std::exp(-bv[h]));
      }
    }
  });
  auto o = torch::empty({B, V}, x.options());
  float *op = o.data_ptr<float>(), *sp = rec_pool.data_ptr<float>();
  const int64_t rep = Hv / Hk;
  const float sc = static_cast<float>(q_scale), e2 = static_cast<float>(l2_eps), oe = static_cast<float>(o_eps);
  const float* onw = o_norm_w.data_ptr<float>();
  at::parallel_for(0, B * Hv, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / Hv, h = i % Hv, kh = h / rep;
      const float* yr = yp + r * C;
      float* out = op + r * V + h * dv;
      delta_head(yr + kh * dk, yr + Hk * dk + kh * dk, yr + 2 * Hk * dk + h * dv, gbp[r * 2 * Hv + h],
                 gbp[(r * 2 + 1) * Hv + h], sc, e2, sp + (slots[r] * Hv + h) * dk * dv, out, dk, dv);
      rms_row(out, onw, pp + r * ps + C + h * dv, oe, out, dv);  // norm(o) silu(z), in place
    }
  });
  auto h1 = x.clone();
  add_rows(h1, out_proj(o));
  return mlp_block(h1, post_norm_w, eps, gate_up, down);
}

// Rotate-half RoPE on the first R values of a head (cos, sin [R]); the rest pass.
void rope_row(float* x, const float* cos, const float* sin, int64_t R) {
  const int64_t half = R / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

float dot(const float* a, const float* b, int64_t n) {
  simd::vf acc = simd::zero();
  int64_t i = 0;
  for (; i + simd::L <= n; i += simd::L) acc = simd::fmadd(simd::load(a + i), simd::load(b + i), acc);
  float s = simd::sum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// A gated softmax-attention layer for one decode token of each of B sequences (x [B, D]), then its
// MLP. qkv's rows per token: H query heads of 2 hd (query, then gate), Hkv key heads, Hkv value heads
// of hd; q and k go through their zero-centred norms (scales given) and RoPE on the first R values
// (cos, sin [B, R]); k and v are written to the pool at write_rows [B], then each query head attends
// over its sequence's lengths[b] cached rows read_rows[b, :lengths[b]] (key head h / (H / Hkv)),
// times sigmoid(gate), through o_proj.
torch::Tensor attn_layer(torch::Tensor x, torch::Tensor in_norm_w, torch::Tensor post_norm_w, double eps,
                         const Lin& qkv, const Lin& o_proj, const Lin& gate_up, const Lin& down,
                         torch::Tensor q_norm_w, torch::Tensor k_norm_w, double qk_eps, torch::Tensor cos,
                         torch::Tensor sin, torch::Tensor keys, torch::Tensor values, torch::Tensor write_rows,
                         torch::Tensor read_rows, std::vector<int64_t> lengths, int64_t H, double scale) {
  for (auto* t : {&x, &in_norm_w, &post_norm_w, &q_norm_w, &k_norm_w, &cos, &sin, &keys, &values})
    check_f32(*t, "every tensor of the layer");
  const int64_t B = x.size(0), D = x.size(1), Hkv = keys.size(1), hd = keys.size(2), R = cos.size(1);
  const int64_t P = keys.size(0), L = read_rows.size(1);
  ARG_CHECK(H > 0 && Hkv > 0 && H % Hkv == 0 && values.sizes() == keys.sizes(), "heads and the KV pool do not fit");
  ARG_CHECK(qkv.out == 2 * H * hd + 2 * Hkv * hd && o_proj.out == D, "qkv / o_proj widths");
  ARG_CHECK(R % 2 == 0 && R <= hd && cos.size(0) == B && sin.sizes() == cos.sizes(), "cos, sin: [B, R <= hd]");
  ARG_CHECK(q_norm_w.numel() == hd && k_norm_w.numel() == hd, "q / k norms over one head");
  ARG_CHECK(write_rows.scalar_type() == torch::kLong && write_rows.is_contiguous() && write_rows.numel() == B &&
            read_rows.scalar_type() == torch::kLong && read_rows.is_contiguous() && read_rows.size(0) == B &&
            static_cast<int64_t>(lengths.size()) == B, "one written row and one row list per sequence");
  const int64_t *wr = write_rows.data_ptr<int64_t>(), *rr = read_rows.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    ARG_CHECK(lengths[b] >= 1 && lengths[b] <= L && wr[b] >= 0 && wr[b] < P, "rows outside the KV pool");
    for (int64_t j = 0; j < lengths[b]; ++j) ARG_CHECK(rr[b * L + j] >= 0 && rr[b * L + j] < P, "rows outside the KV pool");
  }
  const torch::Tensor p = qkv(rms_norm(x, in_norm_w, eps, c10::nullopt));
  const float* pp = p.data_ptr<float>();
  const int64_t ps = p.stride(0);
  float *kp = keys.data_ptr<float>(), *vp = values.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  const float qe = static_cast<float>(qk_eps), sc = static_cast<float>(scale);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h) {
      const float* src = pp + b * ps + 2 * H * hd;
      float* k = kp + (wr[b] * Hkv + h) * hd;
      rms_row(src + h * hd, k_norm_w.data_ptr<float>(), nullptr, qe, k, hd);
      rope_row(k, cp + b * R, sp + b * R, R);
      std::memcpy(vp + (wr[b] * Hkv + h) * hd, src + Hkv * hd + h * hd, hd * sizeof(float));
    }
  auto o = torch::empty({B, H * hd}, x.options());
  float* op = o.data_ptr<float>();
  const int64_t rep = H / Hkv;
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> q(hd), w(L);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, kh = h / rep, n = lengths[b];
      const float* head = pp + b * ps + h * 2 * hd;  // query, then gate
      rms_row(head, q_norm_w.data_ptr<float>(), nullptr, qe, q.data(), hd);
      rope_row(q.data(), cp + b * R, sp + b * R, R);
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        w[j] = dot(q.data(), kp + (rr[b * L + j] * Hkv + kh) * hd, hd) * sc;
        top = std::max(top, w[j]);
      }
      float total = 0.f;
      for (int64_t j = 0; j < n; ++j) total += (w[j] = std::exp(w[j] - top));
      float* out = op + b * H * hd + h * hd;
      std::fill(out, out + hd, 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const float* v = vp + (rr[b * L + j] * Hkv + kh) * hd;
        const float wj = w[j] / total;
        for (int64_t d = 0; d < hd; ++d) out[d] += wj * v[d];
      }
      for (int64_t d = 0; d < hd; ++d) out[d] *= 1.0f / (1.0f + std::exp(-head[hd + d]));  // sigmoid(gate)
    }
  });
  auto h1 = x.clone();
  add_rows(h1, o_proj(o));
  return mlp_block(h1, post_norm_w, eps, gate_up, down);
}

}  // namespace

void register_decode_layers(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<Lin>(m, "Lin", "a per-token matrix as the fused decode layers multiply it")
      .def(py::init<int64_t, torch::Tensor, c10::optional<torch::Tensor>, int64_t, int64_t, int64_t,
                    c10::optional<torch::Tensor>>(),
           py::arg("kind"), py::arg("a"), py::arg("b"), py::arg("group"), py::arg("out"), py::arg("amx_rows"),
           py::arg("perm"))
      .def(py::init<std::vector<Lin>>(), py::arg("parts"))
      .def(py::init<py::object, int64_t>(), py::arg("fp16_packed"), py::arg("out"))
      .def("__call__", &Lin::operator(), "x [M, K] fp32 -> [M, >= out] fp32", released_gil());
  m.def("mlp_block", &mlp_block, "x + down(silu(gate) * up) of rms_norm(x), few rows", released_gil());
  m.def("attn_layer", &attn_layer, "a gated attention layer + MLP for one decode token per row, KV written in the pool",
        released_gil());
  m.def("delta_layer", &delta_layer, "a gated DeltaNet layer + MLP for one decode token per row, states in place",
        released_gil());
}
