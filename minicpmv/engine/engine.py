"""The single engine loop under the Python API, the CLI and the server.

Each `step()` either prefills one waiting sequence (vision encode, scatter, prompt forward,
first token) or decodes one token for every running sequence in one batched forward. New
sequences can join between any two steps: that is continuous batching.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from ..errors import PromptTooLongError
from .encoder_cache import EncoderCache, content_key
from .sampling import sample_next
from .sequence import Sequence, Status
from .state import ForwardBatch, SequenceState

# KV slots reserved past the prompt at prefill; caches grow by doubling beyond it, so a large
# max_tokens does not pin memory for tokens that may never be generated.
KV_RESERVE = 256


@dataclass
class StepOutput:
    seq: Sequence
    token_id: int
    finished: bool


class Engine:
    def __init__(self, model, max_context: int, max_batch_size: int = 32, encoder_cache_bytes: int = 256 << 20):
        self.model = model
        self.max_context = max_context
        self.max_batch_size = max_batch_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.device = next(model.parameters()).device
        self.spec = model.state_spec()
        self.encoder_cache = EncoderCache(encoder_cache_bytes)

    # -- requests -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> Sequence:
        n = len(seq.prompt_ids)
        if n >= self.max_context:
            raise PromptTooLongError(
                f"the prompt is {n} tokens (text and vision placeholders) but the model's context is "
                f"{self.max_context} tokens; shorten the text, send fewer/smaller images or frames, "
                f"or lower max_slice_nums")
        seq.params.max_new_tokens = min(seq.params.max_new_tokens, self.max_context - n)
        seq.generator = seq.params.make_generator()
        self.waiting.append(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        if seq.status is Status.FINISHED:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self._finish(seq, "abort")

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the loop -------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        if self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting.popleft()
            try:
                return [self._prefill(seq)]
            except Exception:
                self._finish(seq, "error")  # the caller can tell which request failed
                raise
        if self.running:
            return self._decode(list(self.running))
        return []

    def _prefill(self, seq: Sequence) -> StepOutput:
        model = self.model
        ids = torch.tensor(seq.prompt_ids, dtype=torch.long, device=self.device)
        features = {}
        for v in seq.vision:
            feats = self._encode(v)
            features[v.token_id] = torch.cat([features[v.token_id], feats]) if v.token_id in features else feats
        seq.vision = []  # the pixels are not needed again; free them while the sequence decodes
        embeds = model.embed(ids, features)
        capacity = len(seq.prompt_ids) + min(seq.params.max_new_tokens, KV_RESERVE)
        seq.state = SequenceState.allocate(self.spec, capacity, model.dtype, self.device)
        positions = (torch.arange(len(ids), device=self.device)[None] if seq.position_ids is None
                     else seq.position_ids.to(self.device)[:, None])  # [1, T] or [3, 1, T]
        hidden = model(embeds, ForwardBatch([seq.state], positions))
        seq.status = Status.RUNNING
        self.running.append(seq)
        return self._accept(seq, model.logits(hidden[0, -1:])[0])

    def _encode(self, v) -> torch.Tensor:
        cache = self.encoder_cache
        key = (v.cache_key or content_key(v)) if cache.max_bytes else None
        feats = cache.get(key) if key else None
        if feats is None:
            feats = self.model.encode_vision(v.pixel_values.to(self.device), v.target_sizes, v.downsample_mode,
                                             **v.extra)
            if key:
                cache.put(key, feats)
        return feats

    def _decode(self, seqs: list[Sequence]) -> list[StepOutput]:
        model = self.model
        ids = torch.tensor([s.last_token for s in seqs], dtype=torch.long, device=self.device)
        embeds = model.embed(ids, {}).transpose(0, 1)  # [B, 1, D]
        positions = torch.tensor([[s.num_tokens - 1 + s.rope_delta] for s in seqs], device=self.device)
        hidden = model(embeds, ForwardBatch([s.state for s in seqs], positions))
        logits = model.logits(hidden[:, -1])
        return [self._accept(s, logits[i]) for i, s in enumerate(seqs)]

    def _accept(self, seq: Sequence, logits: torch.Tensor) -> StepOutput:
        p = seq.params
        for process in p.logits_processors:
            logits = process(seq.output_ids, logits)
        seen = seq.seen_ids() if p.repetition_penalty != 1.0 else None
        token = sample_next(logits, p, seen, seq.generator)
        seq.output_ids.append(token)
        if token in p.stop_token_ids:
            self._finish(seq, "stop")
        elif len(seq.output_ids) >= p.max_new_tokens:
            self._finish(seq, "length")
        return StepOutput(seq, token, seq.status is Status.FINISHED)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.state = None  # free the caches at once
        if seq in self.running:
            self.running.remove(seq)
