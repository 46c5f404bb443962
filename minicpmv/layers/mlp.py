"""The feed-forward blocks: SwiGLU (Llama, Qwen3 and Qwen3.5 text towers) and the GELU MLPs
of the vision towers and mergers."""
import torch
import torch.nn.functional as F
from torch import nn

from .weight_formats import GEMV_ROWS, Bf16Linear


def gelu_mlp(fc1: nn.Module, fc2: nn.Module, x: torch.Tensor, approximate: str = "none", native=None) -> torch.Tensor:
    """fc2(gelu(fc1(x))). When both are bf16 GEMMs (a CPU plan's vision), the hidden activations
    stay bf16: fc1's bias is added inside its GEMM and gelu reads and writes bf16 (computing in
    fp32), which is what fc2 rounds its input to anyway; on the widest tensor of the layer that
    saves two casts and a bias pass. `native` (cpu/native.py's module, where the plan built it)
    runs the tanh GELU in place, ~2x torch's (which computes it ~5x slower than the erf GELU)."""
    if isinstance(fc1, Bf16Linear) and isinstance(fc2, Bf16Linear):
        h = fc1.bf16_product(x)
        if native is not None and approximate == "tanh" and h.shape[-1] % 16 == 0:
            h = native.gelu_tanh_bf16_(h)
        else:
            h = F.gelu(h, approximate=approximate)
        return fc2(h).to(x.dtype)
    return fc2(F.gelu(fc1(x), approximate=approximate))


class GatedMLP(nn.Module):
    packed_fusions = {"gate_up_proj": ("gate_proj", "up_proj")}  # see layers/fp16_packed.py
    native_ops, native = True, None  # cpu/apply.py sets native (cpu/native.py's module)

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.gate_up_proj = None

    def forward(self, x):
        if (self.native is not None and type(self.gate_up_proj) is Bf16Linear and type(self.down_proj) is Bf16Linear
                and x.numel() > GEMV_ROWS * x.shape[-1] and self.down_proj.in_features % 16 == 0):
            # a prompt on a CPU plan's bf16 GEMMs: the hidden activations stay bf16, silu(gate) * up
            # in one pass of the extension (fp32 math, rounded once: bit for bit what down_proj got
            # before): ~9 -> 0.6 ms a layer for 512 tokens of the real-size 4.6 on the AMX Xeon
            return self.down_proj(self.native.silu_mul_bf16(self.gate_up_proj.bf16_product(x))).to(x.dtype)
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate).mul_(up))  # in place: one [.., I] buffer fewer
