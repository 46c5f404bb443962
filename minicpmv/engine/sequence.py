"""One request as the engine tracks it: its prompt, its vision inputs, its sampling settings,
its model state and what it has generated so far."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams
from .state import SequenceState

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class VisionInputs:
    """Packed crops for one modality plus the placeholder token they replace."""

    token_id: int
    pixel_values: torch.Tensor
    target_sizes: torch.Tensor
    downsample_mode: str | None = None
    extra: dict = field(default_factory=dict)  # family-specific (e.g. temporal ids for 4.5)
    cache_key: str | None = None  # content digest for the encoder cache; computed on first use if None


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    vision: list[VisionInputs] = field(default_factory=list)
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    state: SequenceState | None = None
    generator: torch.Generator | None = None
    position_ids: torch.Tensor | None = None  # M-RoPE prompt positions [3, T]; None: 0..T-1
    rope_delta: int = 0  # decode positions are num_tokens - 1 + rope_delta

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def seen_ids(self) -> torch.Tensor:
        """The tokens the repetition penalty applies to."""
        ids = self.prompt_ids + self.output_ids if self.params.penalize_prompt else self.output_ids
        return torch.tensor(ids, dtype=torch.long)
