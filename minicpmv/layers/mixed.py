"""Half-precision weights with float32 compute, for CPUs without fast bf16 arithmetic.

On AVX2-class CPUs a bf16 GEMM runs ~8x slower than fp32, but a bf16 GEMV (one token of
decode) is memory-bound and reads half the bytes of fp32. So matrices are stored in bf16
(half the memory, half the decode traffic) and each product picks its path by row count:
few rows (decode) -> bf16 GEMV on the stored weight; many rows (prefill, vision) -> upcast
the weight to fp32 for this call and run the fp32 GEMM. Activations, norms, biases and
recurrent state stay fp32 throughout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .scratch import scratch

# At and below this many rows the half-precision GEMV/GEMM on the stored weight is faster than
# converting the weight to fp32 first (measured on AVX2: bf16 M=1 ~19 GB/s, M=8 ~3x slower
# than fp32, fp32 upcast of a 3584x1024 weight ~1 ms).
SMALL_M = 4


# Upcast at most this many bytes of weight at a time, into one reused buffer: a big matrix (the
# 248k-row lm_head when several sequences decode together) never gets a full fp32 copy, and no
# call pays page faults for a fresh multi-MB allocation.
UPCAST_CHUNK_BYTES = 32 << 20


class MixedLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype == w.dtype or w.device.type != "cpu":
            return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        rows = x.numel() // x.shape[-1]
        if rows <= SMALL_M:
            y = F.linear(x.to(w.dtype), w).to(x.dtype)
            return y if self.bias is None else y + self.bias
        n_out, n_in = w.shape
        step = max(1, UPCAST_CHUNK_BYTES // (n_in * x.element_size()))
        if step >= n_out:
            return F.linear(x, scratch("upcast", w.numel(), x.dtype).view_as(w).copy_(w), self.bias)
        out = x.new_empty(*x.shape[:-1], n_out)
        for start in range(0, n_out, step):
            part = w[start:start + step]
            bias = None if self.bias is None else self.bias[start:start + step]
            out[..., start:start + len(part)] = F.linear(
                x, scratch("upcast", part.numel(), x.dtype).view_as(part).copy_(part), bias)
        return out


class MixedEmbedding(nn.Embedding):
    compute_dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(self.compute_dtype)


def mixed_precision_plan(model: nn.Module) -> set[str]:
    """Swap every Linear/Embedding for its mixed twin (call on the meta model, before loading)
    and return the names of the matrices to store in half precision."""
    half = set()
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            module.__class__ = MixedLinear
            half.add(f"{name}.weight")
        elif type(module) is nn.Embedding:
            module.__class__ = MixedEmbedding
            half.add(f"{name}.weight")
        else:  # modules holding raw matrices (MoE experts) cast them per use themselves
            half.update(f"{name}.{p}" for p in getattr(module, "matrix_names", ()))
    return half
