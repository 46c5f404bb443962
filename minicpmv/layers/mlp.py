"""The SwiGLU feed-forward block shared by the Llama, Qwen3 and Qwen3.5 text towers."""
import torch.nn.functional as F
from torch import nn


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
