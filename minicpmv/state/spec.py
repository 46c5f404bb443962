"""What a text model declares it must remember between steps, per layer (`state_spec()`):
  * AttentionSpec: keys/values of every past token (full softmax attention layers), kept in
    fixed-size blocks of a shared pool;
  * LinearSpec: a constant-size state (gated DeltaNet: a short-conv window plus a recurrent
    matrix), kept in one slot of a shared pool per sequence.
Models import these and nothing else from the state manager's internals."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionSpec:
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_kv_heads * self.head_dim * _itemsize(dtype)


@dataclass(frozen=True)
class LinearSpec:
    conv_dim: int
    conv_kernel: int
    num_heads: int
    key_dim: int
    value_dim: int

    def bytes_per_slot(self, dtype: torch.dtype) -> int:
        # the conv window is stored in the activation dtype, the recurrent matrix always in fp32
        return self.conv_dim * (self.conv_kernel - 1) * _itemsize(dtype) + self.num_heads * self.key_dim * self.value_dim * 4


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def has_linear(spec: list) -> bool:
    return any(isinstance(s, LinearSpec) for s in spec)
