"""A GPTQ int4 layer moved into the CPU plan's own int4 format (layers/weight_formats.py's
`Int4Linear`), so a GPTQ checkpoint decodes on the extension's int4 kernel and its prompts on
widened bf16 GEMMs, as a load-time int4 model does.

GPTQ stores w = s (q - z) per group (fp16 s, integer z); the int4 format stores w = (q - 8) s' + z'
with bf16 s', z'. The same codes q are kept, s' = bf16(s), z' = bf16((8 - z) s): each weight moves
by at most 8 |s - s'| + |z' - (8 - z) s| <= s / 16 (bf16 keeps 8 significant bits; a symmetric
checkpoint's z = 8 makes z' exactly 0, halving that). Act-order checkpoints keep their input permutation: the codes are stored
in grouped order and each forward gathers x's columns once. This is a fast path with its own
tolerance (tests/test_gptq_int4.py); dtype="float32" keeps GPTQLinear's exact oracle arithmetic."""
from __future__ import annotations

import torch
from torch import nn

from ..layers.weight_formats import Int4Linear, int4_store
from .gptq_linear import GPTQLinear


class GPTQInt4Linear(Int4Linear):
    """Int4Linear holding a GPTQ layer's codes (and its act-order permutation, if any: then the
    stored rows, `dequantize` and `codes` are in the grouped input order the forward multiplies)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        return super().forward(x)

    def extra_repr(self):
        return super().extra_repr() + (", from GPTQ" if self.perm is None else ", from GPTQ, act-order")


def int4_form(layer: GPTQLinear) -> GPTQInt4Linear | None:
    """The layer in the int4 format, or None where that format cannot hold it (not 4 bits, groups
    that are not equal contiguous runs of a multiple of 32 inputs)."""
    layer.finish_loading()
    plan = layer._int4_plan("cpu")
    if plan is None:
        return None
    perm, _, kg = plan
    N, K = layer.out_features, layer.in_features
    codes, zeros = layer.codes_and_zeros()  # [K, N], [G, N]
    g = layer.g_idx.long()
    if perm is not None:
        codes, g = codes[perm], g[perm]
    rows = g[::kg]  # the GPTQ group of each kernel group
    s = layer.scales[rows].float()  # [K / kg, N]
    z = (8 - zeros[rows]).float() * s
    bias = None if layer.bias is None else layer.bias.float()
    new = GPTQInt4Linear(None, bias, kg, shape=(N, K))
    new.register_buffer("perm", perm)
    codes_nk = codes.t()

    def grid(i, n):
        real = max(0, min(n, N - i))
        q = torch.zeros(n, K, dtype=torch.int32)
        sc, off = torch.zeros(n, K // kg), torch.zeros(n, K // kg)
        q[:real], sc[:real], off[:real] = codes_nk[i:i + real], s[:, i:i + real].t(), z[:, i:i + real].t()
        return q, sc.bfloat16(), off.bfloat16()
    int4_store(grid, new.qweight, new.scale_zero)
    return new


def move_to_int4(model: nn.Module, tune) -> int:
    """Replace every GPTQLinear the int4 format can hold by its `int4_form`, `tune(new)` setting
    its kernels; returns how many were replaced (the rest keep GPTQLinear's own kernels)."""
    done = 0
    for name, m in list(model.named_modules()):
        if type(m) is GPTQLinear and m.qweight.device.type == "cpu":
            new = int4_form(m)
            if new is None:
                continue
            tune(new)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
            done += 1
    return done
