"""Sampling parameters and the sampler (greedy, temperature, top-k, top-p, repetition penalty),
with the same order of operations as transformers' generate: penalty, temperature, top-k, top-p."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed accepts


@dataclass
class SamplingParams:
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    # transformers penalises every token in input_ids; 4.0/4.5's remote code generates from
    # embeddings, so only generated tokens count there
    penalize_prompt: bool = True
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    # callables (output_ids, logits [V]) -> logits, run before sampling (e.g. a JSON grammar mask)
    logits_processors: list = field(default_factory=list)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):  # NaN fails every comparison
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {self.seed}")
        if self.temperature == 0:  # as in vLLM / the OpenAI API: temperature 0 means greedy
            self.do_sample = False

    def make_generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator().manual_seed(self.seed)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [V]; seen: token ids of the prompt and output so far. Positive scores are divided,
    negative ones multiplied, as in transformers."""
    scores = logits.gather(0, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(0, seen, scores)


def sample_next(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
                generator: torch.Generator | None) -> int:
    """logits [V] float32 -> next token id."""
    if params.repetition_penalty != 1.0 and seen is not None and len(seen):
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if not params.do_sample:
        return int(logits.argmax())
    logits = logits / max(params.temperature, 1e-5)
    candidates = None  # token ids of `logits` when narrowed to the top k
    if 0 < params.top_k < logits.shape[-1]:
        # top-p and the draw then run over k values instead of the whole 150k-250k vocabulary
        logits, candidates = torch.topk(logits, params.top_k)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= (1 - params.top_p)
        drop[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    choice = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
    return choice if candidates is None else int(candidates[choice])
