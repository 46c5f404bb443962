"""One request as the engine tracks it: its tokens (prompt, then what it generated), its vision
inputs, its sampling settings, where its state lives, and how far it got. Identity is the
object itself: two requests with equal prompts are still two sequences."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from ..state import SeqState
from .sampling import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class VisionInputs:
    """Packed crops for one modality plus the placeholder token they replace."""

    token_id: int
    pixel_values: torch.Tensor
    target_sizes: torch.Tensor
    downsample_mode: str | None = None
    extra: dict = field(default_factory=dict)  # family-specific (e.g. temporal ids for 4.5)
    cache_key: str | None = None  # content digest for the encoder cache; computed on first use if None


class Sequence:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, vision: list[VisionInputs] | None = None,
                 position_ids: torch.Tensor | None = None, rope_delta: int = 0, reuse_boundary: int | None = None):
        self.seq_id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.vision = list(vision or [])
        self.position_ids = position_ids  # [streams, T] for multi-axis RoPE prompts, else None (0..T-1)
        self.rope_delta = rope_delta  # decode position offset that goes with position_ids
        # a prompt position whose state is kept for later requests (the start of the last turn)
        self.reuse_boundary = reuse_boundary if reuse_boundary and 0 < reuse_boundary < len(prompt_ids) else None
        self.token_ids = list(prompt_ids)  # prompt + generated: what the model has been or will be fed
        self.output_ids: list[int] = []
        self.status = Status.WAITING
        self.finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
        self.error: BaseException | None = None
        self.state = SeqState()
        self.generator = params.make_generator()
        self.features: dict[int, torch.Tensor] | None = None  # vision embeddings while the prompt is computed
        self.vision_parts: list[VisionInputs] = []  # the vision work cut into bounded units (by the engine)
        self.encoded_units = 0  # vision units encoded so far
        self.num_cached = 0  # prompt tokens reused from the prefix cache
        self.isolate = False  # decode alone next time (a batched step that held it failed)

    def __repr__(self) -> str:
        return f"Sequence(id={self.seq_id}, {self.status.value}, {len(self.prompt_ids)}+{len(self.output_ids)} tokens)"

    @property
    def vision_units(self) -> int:
        return len(self.vision_parts)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_computed(self) -> int:
        return self.state.num_computed

    @property
    def num_pending(self) -> int:
        """Tokens to feed before the next sample (1 while decoding; the rest of the prompt before)."""
        return self.num_tokens - self.state.num_computed

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append(self, token: int) -> None:
        self.output_ids.append(token)
        self.token_ids.append(token)

    def seen_ids(self) -> list[int]:
        """The tokens the repetition penalty applies to."""
        return self.token_ids if self.params.penalize_prompt else self.output_ids

    def positions(self, start: int, end: int) -> torch.Tensor:
        """Positions of tokens [start, end): [1, n] or [streams, 1, n] with multi-axis RoPE."""
        if self.position_ids is None:
            return torch.arange(start, end)[None]
        n_prompt = self.position_ids.shape[-1]
        parts = []
        if start < n_prompt:
            parts.append(self.position_ids[:, start:min(end, n_prompt)])
        if end > n_prompt:
            tail = torch.arange(max(start, n_prompt), end) + self.rope_delta
            parts.append(tail.expand(self.position_ids.shape[0], -1))
        return torch.cat(parts, dim=-1)[:, None]
