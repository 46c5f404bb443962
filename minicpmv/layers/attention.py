"""Causal softmax attention over the paged KV pool: one SDPA call per layer per model call,
over every sequence of the batch (keys gathered from their blocks, padding masked)."""
import torch
import torch.nn.functional as F

from ..state.batch import ForwardBatch


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch, layer_idx: int,
                     scale: float) -> torch.Tensor:
    """q [B, H, T, D]; k, v [B, Hkv, T, D] (already rotated). Writes k/v into each sequence's
    blocks for this layer and attends causally over everything cached. Returns [B, H, T, D]."""
    B, Hkv, T, D = k.shape
    keys, values = batch.pool.keys[layer_idx], batch.pool.values[layer_idx]
    rows = batch.write_rows
    keys.index_copy_(0, rows, k.transpose(1, 2).reshape(B * T, Hkv, D).to(keys.dtype))
    values.index_copy_(0, rows, v.transpose(1, 2).reshape(B * T, Hkv, D).to(values.dtype))
    if batch.causal:  # a fresh prompt: its own keys, plain causal attention (no mask tensor at all)
        kk, vv = k, v
    else:
        read = batch.read_rows
        kk, vv = keys[read].permute(0, 2, 1, 3), values[read].permute(0, 2, 1, 3)
    return F.scaled_dot_product_attention(q, kk.to(q.dtype), vv.to(q.dtype), attn_mask=batch.attn_mask,
                                          is_causal=batch.causal, scale=scale, enable_gqa=True)
