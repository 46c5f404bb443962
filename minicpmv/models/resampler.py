"""Perceiver resampler of MiniCPM-V 4.0/4.5: 64 learned queries cross-attend (one multi-head
attention) over the ViT tokens of a unit and become 64 text-width embeddings.

A "unit" is what one set of 64 tokens stands for:
  * 4.0, and 4.5 images: one crop (overview or slice);
  * 4.5 video ("3D" packing): the same crop position of n consecutive frames, whose keys are
    concatenated frame after frame and carry a temporal sine embedding of their timestamp.
Keys get a 2D sine table of the patch (row, col); values get no position. Crops arrive packed
([sum of h*w, D_vit], raster order per crop), so a unit is a contiguous span of that packing and
all units run as one padded SDPA batch.

The sine tables are computed in numpy float32 exactly like the reference, so the values match it to
the bit (torch's float32 sin differs from numpy's in the last ulp).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .siglip import pad_crops


def sincos_np(positions: np.ndarray, dim: int) -> np.ndarray:
    """[M] float32 positions -> [M, dim] float32: sin(p*w_i) then cos(p*w_i), w_i = 10000^(-i/(dim/2))."""
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", positions.astype(np.float32).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@lru_cache(maxsize=8)
def _axis_table(n: int, embed_dim: int) -> torch.Tensor:
    """Half-width sine table of the grid indices 0..n-1: [n, embed_dim/2]."""
    return torch.from_numpy(sincos_np(np.arange(n, dtype=np.float32), embed_dim // 2))


def pos_embed_2d(h: int, w: int, embed_dim: int) -> torch.Tensor:
    """[h*w, D] raster-order table: the first half encodes the column, the second the row (the
    reference's meshgrid puts width first)."""
    table = _axis_table(max(h, w, 70), embed_dim)
    cols = table[:w][None, :, :].expand(h, w, -1)
    rows = table[:h][:, None, :].expand(h, w, -1)
    return torch.cat([cols, rows], dim=-1).reshape(h * w, embed_dim)


def temporal_embed(ids: list[int], embed_dim: int) -> torch.Tensor:
    """[len(ids), D]: sine embedding of timestamp ids (0.1 s units); id -1 (an image) gets zeros."""
    ids_np = np.asarray(ids, dtype=np.int64)
    out = np.zeros((len(ids), embed_dim), dtype=np.float32)
    valid = ids_np >= 0
    if valid.any():
        out[valid] = sincos_np(ids_np[valid].astype(np.float32), embed_dim)
    return torch.from_numpy(out)


class CrossAttention(nn.Module):
    """nn.MultiheadAttention's parameters (packed in_proj, out_proj) with an SDPA forward."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None):
        """q [Q, D] shared by every unit; k, v [U, L, D]; key_mask [U, 1, 1, L] bool -> [U, Q, D]."""
        U, L, D = k.shape
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        H, hd = self.num_heads, self.head_dim
        q = F.linear(q, wq, bq).view(1, -1, H, hd).transpose(1, 2).expand(U, -1, -1, -1)
        k = F.linear(k, wk, bk).view(U, L, H, hd).transpose(1, 2)
        v = F.linear(v, wv, bv).view(U, L, H, hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.out_proj(o.transpose(1, 2).reshape(U, -1, D))


class Resampler(nn.Module):
    def __init__(self, num_queries: int, embed_dim: int, kv_dim: int, temporal: bool, eps: float = 1e-6):
        super().__init__()
        self.embed_dim = embed_dim
        self.temporal = temporal
        self.query = nn.Parameter(torch.empty(num_queries, embed_dim))
        # the reference skips the projection when the widths agree (then the checkpoint has no kv_proj)
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = CrossAttention(embed_dim, embed_dim // 128)  # head count is hard-wired to D/128 upstream
        self.ln_q = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_post = nn.LayerNorm(embed_dim, eps=eps)
        self.proj = nn.Parameter(torch.empty(embed_dim, embed_dim))  # used as x @ proj (not a Linear)

    def forward(self, feats: torch.Tensor, sizes: list[tuple[int, int]],
                temporal_ids: list[list[int]] | None = None) -> torch.Tensor:
        """feats: packed ViT output [sum h*w, D_vit] of crops with patch grids `sizes`.
        temporal_ids (4.5): one list per output unit, [-1] for an image crop or the timestamps of the
        n consecutive crops packed together. Returns [num_units, num_queries, D]."""
        lengths = [h * w for h, w in sizes]
        x = self.ln_kv(self.kv_proj(feats))
        pos = torch.cat([pos_embed_2d(h, w, self.embed_dim) for h, w in sizes]).to(x.device, x.dtype)
        keys = x + pos
        if temporal_ids is None:
            unit_lengths = lengths
        else:
            flat = [t for unit in temporal_ids for t in unit]
            if len(flat) != len(sizes):
                raise ValueError(f"temporal ids cover {len(flat)} crops but {len(sizes)} crops were encoded")
            if not self.temporal and any(t != -1 for t in flat):
                raise ValueError("this model has no temporal resampler: temporal ids must all be -1")
            if any(t != -1 for t in flat):
                per_row = temporal_embed(flat, self.embed_dim).to(x.device, x.dtype)
                keys = keys + torch.repeat_interleave(per_row, torch.tensor(lengths, device=x.device), dim=0)
            unit_lengths, row = [], 0
            for unit in temporal_ids:
                unit_lengths.append(sum(lengths[row:row + len(unit)]))
                row += len(unit)
        k, mask = pad_crops(keys, unit_lengths)
        v, _ = pad_crops(x, unit_lengths)
        out = self.attn(self.ln_q(self.query), k, v, mask)
        return self.ln_post(out) @ self.proj
