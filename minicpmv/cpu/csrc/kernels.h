// What the AVX-512 extension's sources share beyond decode.h (cpu/native.py builds quant_gemv.cpp,
// bf16_dot.cpp, flash_attn.cpp and the shared decode sources into one module): the bf16 products
// (the software prefetch of the decode walks is decode.h's).
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

