"""RMSNorm variants used by the text towers. Math is done in float32 and cast back, as the
reference does, so bf16 runs round at the same places.

`fused` (per instance, False unless the CPU kernel plan sets it: cpu/plan.py) computes the fp32
path with torch's one-call F.rms_norm instead of five tensor ops: a decode step runs ~100 norms
on one row each, where dispatch, not arithmetic, is the cost. Same fp32 math, another summation
order (differences of a few ulp). On the AVX2 box of docs/performance.md F.rms_norm measured
slower than the five ops, so the plan turns it on only from AVX-512 up. `native` (set by the plan
where cpu/native.py's extension is built) takes precedence on fp32 inputs: one call, no dispatch of
the composite's five ops (F.rms_norm measured ~50-60 us per decode row on the AMX Xeon)."""
import torch
import torch.nn.functional as F
from torch import nn

from .derived import Derived


class RMSNorm(nn.Module):
    """Classic RMSNorm: y = w * x / rms(x) (Llama, Qwen3)."""

    fused = False
    native_ops, native = True, None  # cpu/apply.py sets native (cpu/native.py's module)

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None and x.dtype == self.weight.dtype == torch.float32:
            return self.native.rms_norm(x.contiguous(), self.weight, self.eps)
        if self.fused and x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class ZeroCenteredRMSNorm(nn.Module):
    """Qwen3.5's RMSNorm: the stored weight is an offset from 1, y = x / rms(x) * (1 + w)."""

    fused = False
    native_ops, native = True, None  # cpu/apply.py sets native (cpu/native.py's module)

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.scale = Derived(lambda w: 1.0 + w.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fp32 = x.dtype == torch.float32  # the CPU path: skip the no-op casts (each is a dispatched op)
        if fp32 and self.native is not None:
            return self.native.rms_norm(x.contiguous(), self.scale(self.weight), self.eps)
        if fp32 and self.fused:
            return F.rms_norm(x, x.shape[-1:], self.scale(self.weight), self.eps)
        y = x if fp32 else x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale(self.weight)
        return y if fp32 else y.type_as(x)


class GatedRMSNorm(nn.Module):
    """Per-head norm of the gated DeltaNet output, gated by silu(z). Plain weight (init 1)."""

    fused = False
    native_ops, native = True, None  # cpu/apply.py sets native (cpu/native.py's module)

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if x.dtype == gate.dtype == self.weight.dtype == torch.float32:  # the CPU path: no casts
            if self.native is not None:
                return self.native.rms_norm(x.contiguous(), self.weight, self.eps, gate.contiguous())
            if self.fused:
                return F.rms_norm(x, x.shape[-1:], self.weight, self.eps).mul_(F.silu(gate))
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)) * F.silu(gate)
        dtype = x.dtype
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * y.to(dtype)
        return (y * F.silu(gate.float())).to(dtype)
