"""What every family adapter provides to the chat layer."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..engine.sequence import VisionInputs


@dataclass
class PreparedPrompt:
    """A rendered, tokenized prompt with its vision inputs, ready to become a Sequence."""

    prompt: str  # the chat-template output (before placeholder expansion)
    input_ids: list[int]
    vision: list[VisionInputs] = field(default_factory=list)
    starts_in_reasoning: bool = False  # generation begins inside an open <think> block
    # M-RoPE (4.7): per-token (T, H, W) positions [3, T] and the offset of decode positions
    # (token k after the prompt sits at len(prompt) + k + rope_delta); None: plain 0..T-1
    position_ids: torch.Tensor | None = None
    rope_delta: int = 0
