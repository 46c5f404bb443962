"""Sparse mixture-of-experts feed-forward (Qwen3.5-MoE): a softmax top-k router, routed SwiGLU
experts held as fused 3-D tensors, and an optional sigmoid-gated shared expert.

Routed compute is grouped by expert: the (token, expert) pairs are sorted by expert, each active
expert gathers its tokens and runs two matmuls over all of them at once, and the weighted
results are added back per token. A batch of decoding sequences is just more tokens here."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mlp import GatedMLP


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [N, E] -> (weights [N, k] in the logits' dtype, expert ids [N, k]): softmax
    in fp32 over all experts, the top k, renormalised to sum 1 (always, as transformers does)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), experts


class GroupedExperts(nn.Module):
    """Routed compute grouped by expert; subclasses hold the matrices and define `expert(e, x)`
    (x [n, D] fp32: the n tokens routed to expert e -> [n, D])."""

    num_experts: int

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, D]; experts, weights [N, k] -> sum_k weights * expert_k(x), [N, D]."""
        k = experts.shape[1]
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)  # pairs grouped by expert, token order inside a group
        tokens = order // k
        pair_weights = weights.reshape(-1)[order]
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # the one host sync
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = tokens[start:start + n]
            out.index_add_(0, rows, self.expert(e, x[rows]) * pair_weights[start:start + n, None])
            start += n
        return out


class Experts(GroupedExperts):
    """E SwiGLU experts: gate_up_proj [E, 2I, D] (rows: gate then up) and down_proj [E, D, I],
    the names and layout of transformers' fused parameters."""

    matrix_names = ("gate_up_proj", "down_proj")  # stored narrow on the CPU mixed path (layers/mixed.py)

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj[e].to(x.dtype)).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e].to(x.dtype))


class SparseMoeBlock(nn.Module):
    def __init__(self, hidden: int, num_experts: int, top_k: int, intermediate: int, shared_intermediate: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)  # the router
        self.experts = Experts(num_experts, hidden, intermediate)
        self.shared_expert = GatedMLP(hidden, shared_intermediate) if shared_intermediate else None
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False) if shared_intermediate else None
        for gate in (self.gate, self.shared_expert_gate):  # routing stays in 16 bits under int8/int4
            if gate is not None:  # (llama.cpp keeps its ffn_gate_inp unquantized too)
                gate.keep_dense = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts = route(self.gate(x), self.top_k)
        out = self.experts(x, experts, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape)
