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

# At and below this many rows the half-precision GEMV/GEMM on the stored weight is faster than
# converting the weight to fp32 first (measured on AVX2: bf16 M=1 ~19 GB/s, M=8 ~3x slower
# than fp32, fp32 upcast of a 3584x1024 weight ~1 ms).
SMALL_M = 4


class MixedLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype == w.dtype:
            return F.linear(x, w, self.bias)
        rows = x.numel() // x.shape[-1]
        if rows <= SMALL_M:
            y = F.linear(x.to(w.dtype), w).to(x.dtype)
            return y if self.bias is None else y + self.bias
        return F.linear(x, w.to(x.dtype), self.bias)


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
    return half
