"""What every family adapter provides to the chat layer."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..engine.sequence import VisionInputs


@dataclass
class PreparedPrompt:
    """A rendered, tokenized prompt with its vision inputs, ready to become a Sequence."""

    prompt: str  # the chat-template output (before placeholder expansion)
    input_ids: list[int]
    vision: list[VisionInputs] = field(default_factory=list)
    starts_in_reasoning: bool = False  # generation begins inside an open <think> block
    position_ids: object = None  # [streams, T] positions for multi-axis RoPE families, else None
    rope_delta: int = 0  # decode positions are token index + rope_delta (with position_ids)
