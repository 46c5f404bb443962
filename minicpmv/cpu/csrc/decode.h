// What the fused decode layers (decode_layers.cpp) and the decode helpers (decode_rows.cpp) need
// from the module they are built into (cpu/native.py builds them into the AVX-512 extension and
// into the AVX2 module, each with its own few-row int8 / int4 products), written on simd.h's
// vector calls.
#pragma once
#include <torch/extension.h>

#include "rows_common.h"
#include "simd.h"

#include <cstdint>

// ---- few-row products each module defines: x [M, K] fp32 contiguous -> [M, N] fp32 (int4: [M, n_pad]) ----
torch::Tensor int8_mm(torch::Tensor x, torch::Tensor q, torch::Tensor scale);
torch::Tensor int4_mm(torch::Tensor x, torch::Tensor packed, torch::Tensor sz, int64_t group);

// ---- software prefetch ahead of a decode product's weight streams, as the CPU plan says ----
// (set_prefetch, decode_rows.cpp): into L1 (the AMX Xeon's choice), into L2 only (a Zen 4's: into L1
// slowed its streams), or none. Each module's own decode walks call walk_ahead.
enum Prefetch : int64_t { PF_OFF = 0, PF_L1 = 1, PF_L2 = 2 };
extern int64_t walk_prefetch;
inline void walk_ahead(const void* p) {
  if (walk_prefetch == PF_L1) _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
  else if (walk_prefetch == PF_L2) _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1);
}

// ---- decode_rows.cpp: one decode token on raw rows ----
// y = x / sqrt(mean(x^2) + eps) * w over the last dimension (fp32), times silu(gate) when given
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps, c10::optional<torch::Tensor> gate);
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

// Each source adds its functions to the module (the module's own file calls both).
void register_decode_layers(pybind11::module& m);
void register_decode_rows(pybind11::module& m);
