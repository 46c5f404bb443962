"""MoE checkpoints store routed experts either fused (`experts.gate_up_proj` [E, 2I, D],
`experts.down_proj` [E, D, I]) or one tensor per expert and projection
(`experts.{e}.gate_proj.weight` [I, D], `.up_proj.weight` [I, D], `.down_proj.weight` [D, I]),
which is what transformers' save_pretrained writes. Both load into the fused parameters: the
per-expert tensors of one layer are held until all have arrived, then stacked."""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class ExpertStacker:
    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.pending: dict[tuple[str, str], dict[tuple[int, str], torch.Tensor]] = {}

    def feed(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Pass fused and non-expert tensors through; emit each layer's fused tensor once its
        last per-expert piece has been read."""
        for key, t in tensors:
            m = PER_EXPERT.match(key)
            if m is None:
                yield key, t
                continue
            prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
            if e >= self.num_experts:
                raise KeyError(f"{key}: expert {e} but the config has {self.num_experts} experts")
            fused = "down_proj" if proj == "down_proj" else "gate_up_proj"
            pieces = self.pending.setdefault((prefix, fused), {})
            pieces[(e, proj)] = t
            projs = ("down_proj",) if fused == "down_proj" else ("gate_proj", "up_proj")
            if len(pieces) == len(projs) * self.num_experts:
                del self.pending[(prefix, fused)]
                yield f"{prefix}.{fused}", torch.stack(
                    [torch.cat([pieces[(i, p)] for p in projs]) for i in range(self.num_experts)])

    def finish(self) -> None:
        if self.pending:
            (prefix, fused), pieces = next(iter(self.pending.items()))
            raise KeyError(f"incomplete per-expert tensors for {prefix}.{fused}: {len(pieces)} pieces of "
                           f"{self.num_experts} experts")
