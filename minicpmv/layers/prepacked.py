"""bf16 matrices held in oneDNN's blocked layout, reordered once at load: the vision tower's and
mergers' GEMMs on a CPU plan with bf16 units. torch's F.linear reorders a plain bf16 weight into
that layout inside every call; keeping the reordered copy instead of the plain one (still one
copy) measured 1.1-1.5x faster on the 4.6 vision shapes, the same results bit for bit
(docs/performance.md). Only for matrices that always see many rows: the per-token matrices keep
the plain layout their decode kernels stream."""
from __future__ import annotations

from functools import lru_cache

import torch

from .weight_formats import Bf16Linear, plus_bias


@lru_cache(maxsize=1)
def available() -> bool:
    """Whether this torch has oneDNN's linear with a reordered weight (its CPU builds do) and it
    reorders bf16 matrices on this CPU (oneDNN refuses without AVX-512 BW/VL/DQ or AVX-NE-CONVERT):
    tried once on a small matrix."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        _reorder(torch.zeros(16, 16, dtype=torch.bfloat16))
    except RuntimeError:
        return False
    return True


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16).contiguous(), None)


def _product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), packed, bias, "none", [], "")


class PrepackedBf16Linear(Bf16Linear):
    """A Bf16Linear whose weight lives only in oneDNN's layout (`packed`); same arithmetic as
    Bf16Linear's GEMM path (bf16 operands, fp32 accumulation), for every row count."""

    @classmethod
    def from_bf16(cls, lin: Bf16Linear) -> "PrepackedBf16Linear":
        """Turn `lin` (a CPU Bf16Linear) into this class in place; its plain weight is dropped."""
        packed = _reorder(lin.weight)
        del lin.weight
        lin.__class__ = cls
        lin._set_packed(packed)
        return lin

    def _set_packed(self, packed: torch.Tensor) -> None:
        self.packed = packed
        self.bias_bf16 = None if self.bias is None else self.bias.detach().to(torch.bfloat16)

    @property
    def weight(self) -> torch.Tensor:
        """The plain [out, in] bf16 matrix, rebuilt from the blocked one (for rare readers)."""
        return self.packed.to_dense()

    def bf16_product(self, x: torch.Tensor) -> torch.Tensor:
        return _product(x, self.packed, self.bias_bf16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return plus_bias(_product(x, self.packed, None).to(x.dtype), self.bias)

    # oneDNN's blocked tensors have no storage to copy or pickle: travel as the plain matrix
    def __getstate__(self):
        state = super().__getstate__().copy()
        state["packed"] = self.packed.to_dense()
        state.pop("bias_bf16", None)
        return state

    def __setstate__(self, state):
        dense = state.pop("packed")
        super().__setstate__(state)
        self._set_packed(_reorder(dense))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 in oneDNN's blocked layout"
