"""RMSNorm variants used by the text towers. Math is done in float32 and cast back, as the
reference does, so bf16 runs round at the same places."""
import torch
import torch.nn.functional as F
from torch import nn

from .derived import Derived


class RMSNorm(nn.Module):
    """Classic RMSNorm: y = w * x / rms(x) (Llama, Qwen3)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class ZeroCenteredRMSNorm(nn.Module):
    """Qwen3.5's RMSNorm: the stored weight is an offset from 1, y = x / rms(x) * (1 + w)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.scale = Derived(lambda w: 1.0 + w.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fp32 = x.dtype == torch.float32  # the CPU path: skip the no-op casts (each is a dispatched op)
        y = x if fp32 else x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale(self.weight)
        return y if fp32 else y.type_as(x)


class GatedRMSNorm(nn.Module):
    """Per-head norm of the gated DeltaNet output, gated by silu(z). Plain weight (init 1)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if x.dtype == gate.dtype == self.weight.dtype == torch.float32:  # the CPU path: no casts
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)) * F.silu(gate)
        dtype = x.dtype
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * y.to(dtype)
        return (y * F.silu(gate.float())).to(dtype)
