"""SigLIP vision transformer shared by every MiniCPM-V version (SigLIP-400M in 4.0/4.5, SigLIP2
geometry in 4.6): patch embedding, a position table indexed by bucketed fractional
coordinates, pre-LN encoder layers.

Crops of different sizes run as one padded batch [N, Lmax, D] with a key mask, which is the
same computation as the reference's block-diagonal (per-crop) attention, but one SDPA call per
layer instead of a Python loop over crops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cpu.native import FLASH_MIN_KEYS
from ..layers.mlp import gelu_mlp


def bucketed_position_ids(target_sizes: torch.Tensor, side: int) -> torch.Tensor:
    """(h, w) per crop -> flat ids into a side x side table: each fractional coordinate i/h is
    mapped to the bucket of boundaries k/side (right bucketize), raster order, concatenated."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side, device="cpu")
    ids = []
    for h, w in target_sizes.tolist():
        rows = torch.bucketize(torch.arange(h, device="cpu") / h, boundaries, right=True)
        cols = torch.bucketize(torch.arange(w, device="cpu") / w, boundaries, right=True)
        ids.append((rows[:, None] * side + cols).flatten())
    return torch.cat(ids)


def strip_to_patches(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(1, C, P, L*P) packed strip -> (L, C*P*P) rows, one per patch, in strip order."""
    _, C, P, LP = pixel_values.shape
    L = LP // patch_size
    return pixel_values[0].view(C, P, L, patch_size).permute(2, 0, 1, 3).reshape(L, C * P * patch_size)


def pad_crops(x: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Packed tokens [L, D] -> padded [N, Lmax, D] and a key mask [N, 1, 1, Lmax] (None if all equal)."""
    if len(set(lengths)) == 1:
        return x.view(len(lengths), lengths[0], x.shape[-1]), None
    Lmax = max(lengths)
    out = x.new_zeros(len(lengths), Lmax, x.shape[-1])
    mask = torch.zeros(len(lengths), Lmax, dtype=torch.bool, device=x.device)
    for i, part in enumerate(torch.split(x, lengths)):
        out[i, : len(part)] = part
        mask[i, : len(part)] = True
    return out, mask[:, None, None, :]


def unpad_crops(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    if len(set(lengths)) == 1:
        return x.reshape(-1, x.shape[-1])
    return torch.cat([x[i, :n] for i, n in enumerate(lengths)])


class SiglipEmbeddings(nn.Module):
    def __init__(self, hidden: int, patch_size: int, image_size: int, channels: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.side = image_size // patch_size
        self.patch_embedding = nn.Conv2d(channels, hidden, kernel_size=patch_size, stride=patch_size)
        self.position_embedding = nn.Embedding(self.side * self.side, hidden)

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(L, C*P*P) patch rows -> (L, D): the stride-P conv is a linear map per patch."""
        w = self.patch_embedding.weight
        return F.linear(patches.to(w.dtype), w.flatten(1), self.patch_embedding.bias)


class SiglipAttention(nn.Module):
    # under a CPU plan with bf16 vision GEMMs (cpu/apply.py): q/k/v as one matrix, and attention
    # itself in bf16 (fp32 accumulation; ~2.7x the fp32 kernel on 1,024 patches on the AMX Xeon)
    packed_fusions = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}
    sdpa_dtype = None
    flash = None  # the extension (cpu/native.py) where the plan runs bf16 attention on it (`vision_flash`)

    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden // num_heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)
        self.qkv_proj = None

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, L, D] independent sequences; key_mask [N, 1, 1, L] bool (True = real token)."""
        N, L, D = x.shape
        if self.qkv_proj is not None:  # bf16 attention: q/k/v straight out of their bf16 GEMM
            qkv = (self.qkv_proj(x) if self.sdpa_dtype is None else self.qkv_proj.bf16_product(x)).split(D, dim=-1)
        else:
            qkv = [p(x) for p in (self.q_proj, self.k_proj, self.v_proj)]
        lengths = key_lengths(key_mask, N, L) if self.flash is not None and L >= FLASH_MIN_KEYS else None
        if lengths is not None and self.head_dim % 2 == 0 and self.head_dim <= 128:
            q, k, v = (t.reshape(N, L, self.num_heads, self.head_dim).to(torch.bfloat16) for t in qkv)
            return self.out_proj(self.flash.bf16_attention(q, k, v, lengths, self.head_dim ** -0.5)).to(x.dtype)
        q, k, v = (t.reshape(N, L, self.num_heads, self.head_dim).transpose(1, 2).to(self.sdpa_dtype or x.dtype)
                   for t in qkv)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # out_proj takes it as it is
        return self.out_proj(o.transpose(1, 2).reshape(N, L, D)).to(x.dtype)


def key_lengths(key_mask: torch.Tensor | None, N: int, L: int) -> list[int] | None:
    """The real keys of each sequence when key_mask [N, 1, 1, L] marks a prefix of each (as padded
    crops do): [] for no mask, None for a mask of another shape."""
    if key_mask is None:
        return []
    mask = key_mask.reshape(N, L)
    lengths = mask.sum(1)
    if not bool((lengths > 0).all()) or not torch.equal(mask, torch.arange(L, device=mask.device) < lengths[:, None]):
        return None
    return lengths.tolist()


class SiglipMLP(nn.Module):
    native_ops, native = True, None  # cpu/apply.py sets native (cpu/native.py's module)

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)

    def forward(self, x):
        return gelu_mlp(self.fc1, self.fc2, x, approximate="tanh", native=self.native)


class SiglipEncoderLayer(nn.Module):
    def __init__(self, hidden: int, intermediate: int, num_heads: int, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.self_attn = SiglipAttention(hidden, num_heads)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = SiglipMLP(hidden, intermediate)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), key_mask)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, hidden: int, intermediate: int, num_heads: int, num_layers: int, eps: float):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(hidden, intermediate, num_heads, eps) for _ in range(num_layers))
