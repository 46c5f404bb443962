"""The feed-forward blocks: SwiGLU (Llama, Qwen3 and Qwen3.5 text towers) and the GELU MLPs
of the vision towers and mergers."""
import torch
import torch.nn.functional as F
from torch import nn

from .weight_formats import Bf16Linear


def gelu_mlp(fc1: nn.Module, fc2: nn.Module, x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """fc2(gelu(fc1(x))). When both are bf16 GEMMs (a CPU plan's vision), the hidden activations
    stay bf16: fc1's bias is added inside its GEMM and gelu reads and writes bf16 (computing in
    fp32), which is what fc2 rounds its input to anyway. On the widest tensor of the layer that
    saves two casts and a bias pass (~25 ms of a 448x448 image's ~1.1 s vision on the AMX Xeon)."""
    if type(fc1) is Bf16Linear and type(fc2) is Bf16Linear:
        return fc2(F.gelu(fc1.bf16_product(x), approximate=approximate)).to(x.dtype)
    return fc2(F.gelu(fc1(x), approximate=approximate))


class GatedMLP(nn.Module):
    packed_fusions = {"gate_up_proj": ("gate_proj", "up_proj")}  # see layers/fp16_packed.py

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.gate_up_proj = None

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate).mul_(up))  # in place: one [.., I] buffer fewer
