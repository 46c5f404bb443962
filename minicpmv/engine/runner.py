"""The model runner: turns the scheduler's plan into model calls. Vision units are encoded (or
taken from the encoder cache), prompt chunks are embedded (vision features scattered where their
placeholders fall in the chunk), and a step's prompt chunks and decode tokens run as one call
(`mixed`, one pass over the weights per step) on models that take a MixedBatch; otherwise one call
per chunk and one batched call for all decoding sequences. It returns logits; sampling and
bookkeeping are the engine's."""
from __future__ import annotations

import torch

from ..state import ForwardBatch, MixedBatch, StatePool
from .encoder_cache import EncoderCache
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model, pool: StatePool, encoder_cache: EncoderCache):
        self.model = model
        self.pool = pool
        self.encoder_cache = encoder_cache
        self.device = pool.device

    def encode(self, seq: Sequence, units: int) -> None:
        """Encode the sequence's next `units` vision units; once all are done its features are
        ready for the prompt chunks."""
        if seq.features is None:
            seq.features = {}
        for part in seq.vision_parts[seq.encoded_units:seq.encoded_units + units]:
            seq.features.setdefault(part.token_id, []).append(self.encode_unit(part))
            seq.encoded_units += 1
        if seq.encoded_units == seq.vision_units:
            seq.features = {k: (v[0] if len(v) == 1 else torch.cat(v)) for k, v in seq.features.items()}

    def encode_unit(self, part) -> torch.Tensor:
        cache, key = self.encoder_cache, part.cache_key
        feats = cache.get(key) if (key and cache.max_bytes) else None
        if feats is None:
            feats = self.model.encode_vision(part.pixel_values.to(self.device), part.target_sizes,
                                             part.downsample_mode, **part.extra)
            if key and cache.max_bytes:
                cache.put(key, feats)
        return feats

    def prefill(self, seq: Sequence, n: int, keep: tuple[int, int] | None = None) -> torch.Tensor | None:
        """Feed tokens [num_computed, num_computed + n) of `seq`; logits [V] of the last one when the
        chunk reaches the end of what the sequence has to compute, else None. keep: see ForwardBatch."""
        embeds, batch = self._chunk_part(seq, n, keep)
        hidden = self.model(embeds, batch)
        seq.state.num_computed += n
        if seq.num_pending:
            return None
        return self.model.logits(hidden[0, -1:])[0]

    @property
    def mixes(self) -> bool:
        """Whether the model runs prompt chunks and decode tokens of many sequences in one call."""
        return getattr(self.model, "takes_mixed_batches", False)

    def mixed(self, chunks: list[tuple[Sequence, int, tuple[int, int] | None]], decodes: list[Sequence]
              ) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
        """Prompt chunks (sequence, tokens, keep) and one token for each decoding sequence in one call.
        Returns each chunk's logits as prefill() would, and the decode logits [B, V] (None if none)."""
        parts, embeds, ends, offset = [], [], [], 0
        for seq, n, keep in chunks:
            e, part = self._chunk_part(seq, n, keep)
            embeds.append(e)
            parts.append(part)
            offset += n
            ends.append(offset - 1 if n == seq.num_pending else None)
        if decodes:
            e, part = self._decode_part(decodes)
            embeds.append(e)  # [1, B, D]: one token of each, packed
            parts.append(part)
        hidden = self.model(torch.cat(embeds, dim=1), MixedBatch(parts))[0]  # [N, D]
        for seq, n, _ in chunks:
            seq.state.num_computed += n
        for s in decodes:
            s.state.num_computed += 1
        rows = [i for i in ends if i is not None] + list(range(offset, offset + len(decodes)))
        logits = self.model.logits(hidden[rows]) if rows else None
        at = {row: j for j, row in enumerate(rows)}
        chunk_logits = [None if i is None else logits[at[i]] for i in ends]
        return chunk_logits, (logits[len(rows) - len(decodes):] if decodes else None)

    def _chunk_part(self, seq: Sequence, n: int, keep) -> tuple[torch.Tensor, ForwardBatch]:
        """The next n prompt tokens of seq: embeddings [1, n, D] and their ForwardBatch."""
        start = seq.num_computed
        ids = torch.tensor(seq.token_ids[start:start + n], dtype=torch.long, device=self.device)
        embeds = self.model.embed(ids, self._features(seq, start, n))
        return embeds, ForwardBatch(self.pool, seq.positions(start, start + n).to(self.device), [seq.state.blocks],
                                    [start], [seq.state.slot or 0], keep)

    def _decode_part(self, seqs: list[Sequence]) -> tuple[torch.Tensor, ForwardBatch]:
        """One new token of each sequence: embeddings [1, B, D] and their ForwardBatch ([B, 1] tokens)."""
        ids = torch.tensor([s.last_token for s in seqs], dtype=torch.long, device=self.device)
        positions = torch.cat([s.positions(s.num_computed, s.num_computed + 1) for s in seqs], dim=-2)
        return self.model.embed(ids, {}), ForwardBatch(
            self.pool, positions.to(self.device), [s.state.blocks for s in seqs], [s.num_computed for s in seqs],
            [s.state.slot or 0 for s in seqs])

    def _features(self, seq: Sequence, start: int, n: int) -> dict[int, torch.Tensor]:
        """The rows of each placeholder id's features that fall in prompt positions [start, start+n)."""
        if not seq.features:
            return {}
        prompt = seq.prompt_ids
        out = {}
        for token_id, feats in seq.features.items():
            inside = prompt[start:start + n].count(token_id)
            if inside:
                before = prompt[:start].count(token_id)
                out[token_id] = feats[before:before + inside]
        return out

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One new token for each sequence, in one call -> logits [B, V]."""
        embeds, batch = self._decode_part(seqs)
        hidden = self.model(embeds.transpose(0, 1), batch)  # [B, 1, D]
        for s in seqs:
            s.state.num_computed += 1
        return self.model.logits(hidden[:, -1])
