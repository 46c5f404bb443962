// What the AVX-512 extension (quant_gemv.cpp and the sources including kernels.h) and the AVX2
// module (avx2_gemv.cpp) share, in plain C++ with no vector ISA: bf16 bits to float, the int8
// rounding of a block of 32 activations both modules' int8 / int4 rows use, the x check.
#pragma once
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

// The modules' compute calls let the process's other Python threads run meanwhile (the server's HTTP
// loop, the prepare threads), as torch's own ops do: an engine step then no longer holds the GIL
// through its kernels, and the HTTP thread's per-token work waits for no step to end.
using released_gil = pybind11::call_guard<pybind11::gil_scoped_release>;

// Refuses bad arguments with a RuntimeError naming them, as TORCH_CHECK would, its message put
// together from std::to_string pieces. On one machine (torch 2.11.0+cu130, g++ 13.3, Python 3.12)
// a number in a TORCH_CHECK message (c10::str, an ostringstream) crashed the process, GIL held or
// not, and so did our own ostringstream message; a literal message did not.
inline void append_piece(std::string& out, const char* text) { out += text; }
inline void append_piece(std::string& out, const std::string& text) { out += text; }
template <class T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
void append_piece(std::string& out, T value) {
  out += std::to_string(value);
}
template <class... T>
[[noreturn]] void refuse(const T&... parts) {
  std::string message;
  (append_piece(message, parts), ...);
  throw std::runtime_error(message);
}
#define ARG_CHECK(cond, ...)        \
  do {                              \
    if (!(cond)) refuse(__VA_ARGS__); \
  } while (0)

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// One block of 32 activations as int8 codes: a = round(x / d) clamped to [-127, 127], d = max|x| /
// 127 (llama.cpp's Q8_0 rounding); returns d, NaN for a block holding a non-finite value (its
// outputs go NaN). 127 / max|x| overflows float below ~4e-37: such a block takes its inverse in
// double.
inline float round_block32(const float* x, int8_t* a) {
  float amax = 0.f;
  bool finite = true;
  for (int i = 0; i < 32; ++i) {
    finite &= std::isfinite(x[i]);
    amax = std::max(amax, std::fabs(x[i]));
  }
  const float inv = finite && amax > 0.f ? 127.f / amax : 0.f;
  if (std::isfinite(inv)) {
    for (int i = 0; i < 32; ++i) a[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(x[i] * inv))));
  } else {
    const double dinv = 127.0 / amax;
    for (int i = 0; i < 32; ++i) a[i] = static_cast<int8_t>(std::min(127.0, std::max(-127.0, std::nearbyint(x[i] * dinv))));
  }
  return finite ? amax / 127.f : std::numeric_limits<float>::quiet_NaN();
}

// refuses an x that is not a contiguous 2-D fp32 tensor of K columns
inline void check_x(const torch::Tensor& x, int64_t K) {
  ARG_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(),
            "x must be a contiguous 2-D fp32 tensor");
  ARG_CHECK(x.size(1) == K, "x has ", x.size(1), " columns, the matrix ", K);
}

// refuses an int8 matrix that is not q [N, K] int8 (K % 16 == 0) with one bf16 scale per row, or an
// x that does not fit it
inline void check_int8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale) {
  ARG_CHECK(q.dim() == 2 && q.scalar_type() == torch::kChar && q.is_contiguous(), "q: contiguous [N, K] int8");
  check_x(x, q.size(1));
  ARG_CHECK(q.size(1) % 16 == 0, "K must be a multiple of 16");
  ARG_CHECK(scale.scalar_type() == torch::kBFloat16 && scale.is_contiguous() && scale.numel() == q.size(0),
            "scale: [N] bf16");
}

// refuses an int4 matrix that is not packed [n_pad, K / 2] uint8 (n_pad % 64 == 0) with scale / offset
// pairs [K / group, n_pad, 2] bf16, group a multiple of 32 dividing K
inline void check_int4(const torch::Tensor& packed, const torch::Tensor& sz, int64_t group) {
  ARG_CHECK(packed.dim() == 2 && packed.scalar_type() == torch::kByte && packed.is_contiguous(),
            "packed: contiguous [n_pad, K / 2] uint8");
  const int64_t n_pad = packed.size(0), K = packed.size(1) * 2;
  ARG_CHECK(n_pad % 64 == 0, "rows must be padded to a multiple of 64");
  ARG_CHECK(group > 0 && K % group == 0 && group % 32 == 0, "group must be a multiple of 32 dividing K");
  ARG_CHECK(sz.scalar_type() == torch::kBFloat16 && sz.is_contiguous() && sz.dim() == 3 && sz.size(0) == K / group &&
            sz.size(1) == n_pad && sz.size(2) == 2, "scale_zero: [K / group, n_pad, 2] bf16");
}
