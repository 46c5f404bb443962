"""The one prompt forward outside the scheduler (beam search, quantization calibration, oracle
tests, benchmarks of a bare model): vision units -> features per placeholder id -> embeddings
-> one text-model call over a private single-sequence state (or a given ForwardBatch)."""
from __future__ import annotations

import torch

from ..state import ForwardBatch, SingleSequence


def vision_features(parts, encode) -> dict[int, torch.Tensor]:
    """Encode vision units in order; features concatenated per placeholder token id."""
    features: dict[int, torch.Tensor] = {}
    for part in parts:
        feats = encode(part)
        features[part.token_id] = torch.cat([features[part.token_id], feats]) if part.token_id in features else feats
    return features


def encode_with(model):
    """An `encode` for vision_features that calls the model directly (no encoder cache)."""
    device = next(model.parameters()).device
    return lambda v: model.encode_vision(v.pixel_values.to(device), v.target_sizes, v.downsample_mode, **v.extra)


def prompt_forward(model, ids, features: dict | None = None, batch: ForwardBatch | None = None,
                   capacity: int | None = None, positions: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, SingleSequence | None]:
    """ids [T] (list or tensor) -> (final hidden states [1, T, D], the private state, or None when a
    batch was given). `capacity` leaves room for tokens fed later through state.batch(...);
    `positions` ([3, T] M-RoPE positions) replace 0..T-1."""
    device = next(model.parameters()).device
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    state = None
    if batch is None:
        state = SingleSequence.for_model(model, capacity or len(ids))
        batch = state.batch(len(ids), None if positions is None else positions.to(device)[:, None])
    return model(model.embed(ids, features or {}), batch), state
