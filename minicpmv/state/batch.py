"""What one text-model call works on, as the layers see it: B sequences with T new tokens each
(one prompt chunk, or one decode token per sequence), their positions, and where their state
lives in the pool. Layers reach their state only through this object."""
from __future__ import annotations

from functools import cached_property

import torch

from .pool import StatePool


class ForwardBatch:
    def __init__(self, pool: StatePool, positions: torch.Tensor, block_tables: list[list[int]],
                 context_lens: list[int], slots: list[int], keep: tuple[int, int] | None = None):
        """positions [B, T] (or [streams, B, T] for multi-axis RoPE); context_lens: tokens of each
        sequence already in the pool before this call; slots: each sequence's DeltaNet slot;
        keep: (offset, slot) for a one-sequence prompt chunk that passes a reuse boundary: the
        DeltaNet layers also leave their state after the chunk's first `offset` tokens in `slot`
        (a prefix snapshot taken inside the chunk, so the boundary costs no second pass)."""
        self.pool = pool
        self.positions = positions
        self.block_tables = block_tables
        self.context_lens = context_lens
        self.slots = slots
        if keep is not None and (len(context_lens) != 1 or not 0 < keep[0] < positions.shape[-1]):
            raise ValueError(f"keep {keep} needs one sequence and an offset inside its {positions.shape[-1]} tokens")
        self.keep = keep
        self.batch_size = len(context_lens)
        self.num_new = positions.shape[-1]

    # -- attention: rows of the flattened KV pool ---------------------------------------------
    def _rows(self, b: int, start: int, end: int) -> torch.Tensor:
        bs = self.pool.block_size
        t = torch.arange(start, end)
        table = torch.tensor(self.block_tables[b], dtype=torch.long)
        return table[t // bs] * bs + t % bs

    @cached_property
    def write_rows(self) -> torch.Tensor:
        """[B * T] pool rows the new tokens' keys/values go to."""
        T = self.num_new
        return torch.cat([self._rows(b, c, c + T) for b, c in enumerate(self.context_lens)]).to(self.pool.device)

    @cached_property
    def read_rows(self) -> torch.Tensor:
        """[B, L] pool rows of every cached token (padded with row 0 up to the longest)."""
        T, L = self.num_new, max(self.context_lens) + self.num_new
        rows = torch.zeros(self.batch_size, L, dtype=torch.long)
        for b, c in enumerate(self.context_lens):
            rows[b, :c + T] = self._rows(b, 0, c + T)
        return rows.to(self.pool.device)

    @cached_property
    def attn_mask(self) -> torch.Tensor | None:
        """None when plain causal attention (is_causal) or no mask at all is exact; else a bool
        mask [B, 1, T, L]: query i of sequence b sees keys 0 .. context_b + i."""
        T = self.num_new
        if self.batch_size == 1 and self.context_lens[0] == 0:
            return None
        if T == 1 and len(set(self.context_lens)) == 1:
            return None
        L = max(self.context_lens) + T
        ctx = torch.tensor(self.context_lens)[:, None, None]
        last_visible = ctx + torch.arange(T)[None, :, None]  # [B, T, 1]
        return (torch.arange(L)[None, None, :] <= last_visible).unsqueeze(1).to(self.pool.device)

    @property
    def causal(self) -> bool:
        return self.batch_size == 1 and self.context_lens[0] == 0 and self.num_new > 1

    # -- linear (DeltaNet) state: one slot per sequence ---------------------------------------
    @cached_property
    def _slot_index(self):
        s = self.slots
        if s == list(range(s[0], s[0] + len(s))):
            return slice(s[0], s[0] + len(s))  # contiguous: a view
        return torch.tensor(s, dtype=torch.long, device=self.pool.device)

    @cached_property
    def _slot_runs(self) -> list[tuple[slice, slice]]:
        """The batch as runs of consecutive slots: (rows of the batch, slots of the pool)."""
        runs, start = [], 0
        for i in range(1, len(self.slots) + 1):
            if i == len(self.slots) or self.slots[i] != self.slots[i - 1] + 1:
                runs.append((slice(start, i), slice(self.slots[start], self.slots[i - 1] + 1)))
                start = i
        return runs

    def conv_state(self, layer: int) -> torch.Tensor:
        """Conv windows [B, C, K-1] (a view when the slots are contiguous, else a small copy)."""
        return self.pool.conv[layer][self._slot_index]

    def store_conv(self, layer: int, conv: torch.Tensor) -> None:
        idx = self._slot_index
        if isinstance(idx, slice):
            self.pool.conv[layer][idx].copy_(conv)
        else:
            self.pool.conv[layer].index_copy_(0, idx, conv.to(self.pool.conv[layer].dtype))

    def recurrent_views(self, layer: int) -> list[tuple[slice, torch.Tensor]]:
        """(rows of the batch, their recurrent states [n, H, dk, dv] fp32) per run of consecutive
        slots: views into the pool, so a layer updates each state where it lives (the states are
        the largest thing a decode step touches besides the weights; copying them would double
        that traffic). The scheduler orders a decode batch by slot, so there are few runs."""
        return [(rows, self.pool.recurrent[layer][slots]) for rows, slots in self._slot_runs]

    def keep_linear(self, layer: int, conv: torch.Tensor, recurrent: torch.Tensor) -> None:
        """Write one layer's DeltaNet state at the keep offset (conv window [C, K-1], recurrent
        [H, dk, dv]) into the keep slot."""
        slot = self.keep[1]
        self.pool.conv[layer][slot].copy_(conv)
        self.pool.recurrent[layer][slot].copy_(recurrent)

    def per_part(self, fn, *tensors):
        """fn(part, *tensors) for each part of the call; one part here (see MixedBatch)."""
        return fn(self, *tensors)


class MixedBatch:
    """Several ForwardBatches (prompt chunks of different sequences, a batch of decode tokens) run as
    one model call: their tokens packed along one axis, inputs [1, N, D] with N the sum of every
    part's B x T, so each token-wise op (projections, norms, MLP, head) makes one pass over the
    weights for the whole step. Only the sequence-wise cores (attention over the pool, the DeltaNet
    recurrence) run per part, on [B, T, ...] views of their rows (per_part)."""

    def __init__(self, parts: list[ForwardBatch]):
        self.parts = parts
        self.sizes = [(p.batch_size, p.num_new) for p in parts]
        self.pool = parts[0].pool
        # [1, N] (or [streams, 1, N]): each part's [B, T] positions flattened in token order
        self.positions = torch.cat([p.positions.reshape(*p.positions.shape[:-2], 1, -1) for p in parts], dim=-1)
        self.batch_size = 1
        self.num_new = self.positions.shape[-1]

    def per_part(self, fn, *tensors):
        """tensors [1, N, ...] -> fn(part, *[its rows as [B, T, ...]]) per part, the results [B, T, ...]
        packed back to [1, N, ...]."""
        outs, start = [], 0
        for part, (B, T) in zip(self.parts, self.sizes):
            pieces = [t[:, start:start + B * T].reshape(B, T, *t.shape[2:]) for t in tensors]
            out = fn(part, *pieces)
            outs.append(out.reshape(1, B * T, *out.shape[2:]))
            start += B * T
        return torch.cat(outs, dim=1)
