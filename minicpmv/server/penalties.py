"""OpenAI's presence and frequency penalties as an engine logits processor: before each sampling
step, every token already generated in this choice loses `presence` once plus `frequency` per time
it occurred (logits -= presence * [count > 0] + frequency * count). The prompt does not count."""
from __future__ import annotations

import torch


class OccurrencePenalty:
    def __init__(self, presence: float, frequency: float):
        self.presence, self.frequency = presence, frequency
        self.counts: torch.Tensor | None = None
        self.consumed = 0

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if self.counts is None or self.counts.shape[-1] != logits.shape[-1]:
            self.counts, self.consumed = torch.zeros(logits.shape[-1], dtype=torch.float32), 0
        new = [t for t in output_ids[self.consumed:] if 0 <= t < logits.shape[-1]]
        if new:
            self.counts.index_add_(0, torch.tensor(new), torch.ones(len(new)))
        self.consumed = len(output_ids)
        penalty = self.frequency * self.counts + self.presence * (self.counts > 0).float()
        return logits - penalty.to(device=logits.device, dtype=logits.dtype)
