"""The GPTQ checkpoint format: how integer codes, zero points, scales and group ids are laid out
in `qweight` / `qzeros` / `scales` / `g_idx` (spec v40_v45 §9.3-9.5, v46 §6).

For a linear layer with K inputs, N outputs, `bits` b (2, 4 or 8) and pack factor f = 32 / b:

* qweight  int32 [K/f, N]   input row k = f*r + j sits in word r at bits [b*j, b*j + b)
* qzeros   int32 [G, N/f]   zero points packed the same way, but along the output axis
* scales   fp16  [G, N]
* g_idx    int32 [K]        group of each input row (k // group_size unless act-order)

Weights dequantize as W^T[k, n] = scales[g, n] * (q[k, n] - z[g, n]) with g = g_idx[k].
Format "gptq_v2" stores z itself; legacy "gptq" (v1) stores z - 1, computed word-wise: the
whole packed word minus 0x11111111 (4-bit), so a zero of 0 borrows from its neighbour. That is
what GPTQModel writes and reads; doing the inverse word-wise makes our round trip exact too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 4, 8)
FORMATS = ("gptq", "gptq_v2")
_MASK32 = (1 << 32) - 1


@dataclass(frozen=True)
class GPTQSpec:
    """How one linear layer is quantized. group_size -1 means one group over all inputs."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    format: str = "gptq"

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"GPTQ bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.format not in FORMATS:
            raise ValueError(f"GPTQ checkpoint format must be one of {FORMATS}, got {self.format!r}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1, got {self.group_size}")

    @property
    def pack_factor(self) -> int:
        return 32 // self.bits

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def group_len(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def num_groups(self, in_features: int) -> int:
        g = self.group_len(in_features)
        return (in_features + g - 1) // g

    def shapes(self, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
        """Checkpoint tensor shapes of one quantized linear."""
        f, G = self.pack_factor, self.num_groups(in_features)
        if in_features % f or out_features % f:
            raise ValueError(f"{self.bits}-bit GPTQ packing needs in ({in_features}) and out ({out_features}) "
                             f"features divisible by {f}")
        return {"qweight": (in_features // f, out_features), "qzeros": (G, out_features // f),
                "scales": (G, out_features), "g_idx": (in_features,)}


def _v1_offset(bits: int) -> int:
    """0x11111111 for 4-bit: a 1 in every packed field."""
    word = 0
    for j in range(32 // bits):
        word |= 1 << (bits * j)
    return word


def _to_int32(words64: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> the int32 with the same bits."""
    w = words64 & _MASK32
    return torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32)


def _to_uint(words32: torch.Tensor) -> torch.Tensor:
    """int32 words -> int64 in [0, 2^32), same bits."""
    return words32.to(torch.int64) & _MASK32


def pack_along(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Integer codes in [0, 2^bits) -> int32 words holding 32/bits of them each, consecutive
    entries along `dim` in consecutive fields, lowest bits first. (Computed in int32: the
    fields are disjoint, so their wrapping sum is their bitwise OR, sign bit included.)"""
    f = 32 // bits
    v = values.to(torch.int32).movedim(dim, 0)
    if v.shape[0] % f:
        raise ValueError(f"cannot pack {v.shape[0]} values into words of {f}")
    if v.numel() and (v.min() < 0 or v.max() >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    v = v.reshape(v.shape[0] // f, f, *v.shape[1:])
    words = v[:, 0].clone()
    for j in range(1, f):
        words |= v[:, j] << (bits * j)
    return words.movedim(0, dim).contiguous()


def unpack_along(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of `pack_along`: int32 words -> int32 codes, 32/bits times longer along `dim`."""
    f = 32 // bits
    w = words.to(torch.int32).movedim(dim, 0)
    mask = (1 << bits) - 1
    codes = torch.stack([(w >> (bits * j)) & mask for j in range(f)], dim=1)  # arithmetic shift, then mask
    return codes.reshape(w.shape[0] * f, *w.shape[1:]).movedim(0, dim).contiguous()


def pack_qweight(codes_kn: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [K, N] -> qweight [K/f, N]."""
    return pack_along(codes_kn, bits, 0)


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_along(qweight, bits, 0)


def pack_qzeros(zeros_gn: torch.Tensor, bits: int, fmt: str) -> torch.Tensor:
    """True zero points [G, N] -> qzeros [G, N/f] in checkpoint format `fmt`."""
    packed = pack_along(zeros_gn, bits, 1)
    if fmt == "gptq":
        packed = _to_int32(_to_uint(packed) - _v1_offset(bits))
    return packed


def unpack_qzeros(qzeros: torch.Tensor, bits: int, fmt: str) -> torch.Tensor:
    """qzeros [G, N/f] in format `fmt` -> true zero points [G, N] (int32)."""
    if fmt == "gptq":
        qzeros = _to_int32(_to_uint(qzeros) + _v1_offset(bits))
    return unpack_along(qzeros, bits, 1)


def convert_qzeros(qzeros: torch.Tensor, bits: int, src: str, dst: str) -> torch.Tensor:
    """Re-encode packed zeros between "gptq" (v1) and "gptq_v2"."""
    if src == dst:
        return qzeros
    delta = _v1_offset(bits) if src == "gptq" else -_v1_offset(bits)
    return _to_int32(_to_uint(qzeros) + delta)


def default_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    g = in_features if group_size == -1 else group_size
    return (torch.arange(in_features, dtype=torch.int32) // g)


def codes_from_weight(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                      bits: int) -> torch.Tensor:
    """Integer codes [K, N] of a weight [N, K] already on (or near) the quantization grid:
    clamp(round((W + s*z) / s), 0, maxq), group of input k = g_idx[k]. (Written as GPTQModel
    rounds it, so packing off-grid weights gives the same codes bit for bit.)"""
    g = g_idx.long()
    s = scales.float()[g]  # [K, N]
    z = zeros.float()[g]
    q = torch.round((weight.float().t() + z * s) / s)
    return q.clamp_(0, (1 << bits) - 1).to(torch.int32)


def pack_gptq(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor | None,
              spec: GPTQSpec, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A (quantized) float weight [N, K] with its per-group scales [G, N] and integer zero points
    [G, N] -> the checkpoint tensors of one GPTQ linear."""
    N, K = weight.shape
    spec.shapes(K, N)  # validates divisibility
    if g_idx is None:
        g_idx = default_g_idx(K, spec.group_size)
    zeros = zeros.round().to(torch.int64)
    codes = codes_from_weight(weight, scales, zeros, g_idx, spec.bits)
    out = {"qweight": pack_qweight(codes, spec.bits),
           "qzeros": pack_qzeros(zeros, spec.bits, spec.format),
           "scales": scales.to(torch.float16).contiguous(),
           "g_idx": g_idx.to(torch.int32).contiguous()}
    if bias is not None:
        out["bias"] = bias.to(torch.float16).contiguous()
    return out


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (codes [K, N], true zero points [G, N]), both int32."""
    return unpack_qweight(qweight, bits), unpack_qzeros(qzeros, bits, fmt)


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    bits: int, fmt: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Checkpoint tensors -> the dense weight [N, K] (nn.Linear layout), computed in fp32."""
    codes, zeros = unpack_gptq(qweight, qzeros, bits, fmt)
    g = g_idx.long()
    wt = scales.float()[g] * (codes.float() - zeros.float()[g])  # [K, N]
    return wt.t().contiguous().to(dtype)
