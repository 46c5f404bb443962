"""Per-sequence model state, declared by the model and allocated by the engine.

A text model lists, per layer, what it must remember between steps (`state_spec()`):
  * AttentionSpec: a KV cache (full softmax attention layers),
  * LinearSpec: a short-conv window plus a recurrent matrix (gated DeltaNet layers).
`SequenceState.allocate` turns that list into tensors owned by one sequence. Layers read and
write the state they are handed; they never allocate on their own, and the scheduler only
moves sequences around, so batching many sequences needs no change in the layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionSpec:
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class LinearSpec:
    conv_dim: int
    conv_kernel: int
    num_heads: int
    key_dim: int
    value_dim: int


class KVCache:
    """Keys/values of one attention layer for one sequence, preallocated to `capacity` tokens
    (the prompt plus the most it may generate) and grown by doubling if a caller goes past."""

    def __init__(self, spec: AttentionSpec, capacity: int, dtype, device):
        shape = (spec.num_kv_heads, max(capacity, 1), spec.head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [Hkv, T, D] -> views of every cached key/value including these."""
        end = self.length + k.shape[1]
        if end > self.keys.shape[1]:
            self._grow(end)
        self.keys[:, self.length:end] = k
        self.values[:, self.length:end] = v
        self.length = end
        return self.keys[:, :end], self.values[:, :end]

    def _grow(self, needed: int) -> None:
        cap = max(needed, 2 * self.keys.shape[1])
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_empty((old.shape[0], cap, old.shape[2]))
            new[:, : self.length] = old[:, : self.length]
            setattr(self, name, new)

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def fork(self) -> "KVCache":
        """An independent copy with the same capacity (a beam branching off this one)."""
        new = object.__new__(KVCache)
        new.keys, new.values = self.keys.clone(), self.values.clone()
        new.length = self.length
        return new


class LinearState:
    """Gated DeltaNet state of one layer for one sequence: the last (kernel-1) pre-conv inputs
    and the fp32 recurrent matrix per value head."""

    def __init__(self, spec: LinearSpec, dtype, device):
        self.conv = torch.zeros(spec.conv_dim, spec.conv_kernel - 1, dtype=dtype, device=device)
        self.recurrent = torch.zeros(spec.num_heads, spec.key_dim, spec.value_dim, dtype=torch.float32, device=device)

    def nbytes(self) -> int:
        return self.conv.nbytes + self.recurrent.nbytes

    def fork(self) -> "LinearState":
        new = object.__new__(LinearState)
        new.conv, new.recurrent = self.conv.clone(), self.recurrent.clone()
        return new


class SequenceState:
    """Everything one sequence's text model remembers: one entry per layer."""

    def __init__(self, layers: list):
        self.layers = layers

    @classmethod
    def allocate(cls, spec: list, capacity: int, dtype, device) -> "SequenceState":
        layers = []
        for s in spec:
            if isinstance(s, AttentionSpec):
                layers.append(KVCache(s, capacity, dtype, device))
            elif isinstance(s, LinearSpec):
                layers.append(LinearState(s, dtype, device))
            else:
                raise TypeError(f"unknown state spec {s!r}")
        return cls(layers)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def fork(self) -> "SequenceState":
        """A deep copy: the two states then advance independently."""
        return SequenceState([layer.fork() for layer in self.layers])


@dataclass
class ForwardBatch:
    """What one text-model call works on: either one sequence's prompt chunk (prefill) or one
    new token for each of several sequences (decode). positions: [B, T] absolute positions."""

    states: list[SequenceState]
    positions: torch.Tensor

    @property
    def is_decode(self) -> bool:
        return self.positions.shape[1] == 1 and len(self.states) >= 1
