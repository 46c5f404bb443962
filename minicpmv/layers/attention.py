"""Causal softmax attention over per-sequence KV caches (CPU-friendly: SDPA per sequence)."""
import torch
import torch.nn.functional as F

from ..engine.state import ForwardBatch, KVCache


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch, layer_idx: int,
                     scale: float) -> torch.Tensor:
    """q [B, H, T, D]; k, v [B, Hkv, T, D] (already rotated). Appends k/v to each sequence's
    cache for this layer and attends causally over everything cached. Returns [B, H, T, D]."""
    outs = []
    T = q.shape[2]
    for b, state in enumerate(batch.states):
        cache: KVCache = state.layers[layer_idx]
        past = cache.length
        keys, values = cache.append(k[b], v[b])
        mask = None
        if T > 1:
            # query i sits at absolute step past+i and may see keys 0..past+i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)
        outs.append(F.scaled_dot_product_attention(q[b:b + 1], keys[None], values[None], attn_mask=mask, scale=scale,
                                                   enable_gqa=True))
    return torch.cat(outs, 0) if len(outs) > 1 else outs[0]
