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
    position_ids: object = None  # [streams, T] positions for multi-axis RoPE families, else None
    rope_delta: int = 0  # decode positions are token index + rope_delta (with position_ids)
    # where the last turn starts: everything before it is rendered the same way in the next turn's
    # prompt (the history), so the engine keeps the state at this point for reuse
    reuse_boundary: int | None = None


def last_turn_start(marker_id: int | None, input_ids: list[int]) -> int | None:
    """Index of the last turn-start token (ChatML's <|im_start|> in every MiniCPM-V template), or None."""
    if marker_id is None:
        return None
    for i in range(len(input_ids) - 1, 0, -1):
        if input_ids[i] == marker_id:
            return i
    return None
