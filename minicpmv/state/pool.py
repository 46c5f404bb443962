"""The tensors of the state pool, allocated once from a memory budget.

Attention layers: keys and values of all blocks, flattened to rows of tokens
[num_blocks * block_size, Hkv, D]; token t of a sequence lives at row
block_table[t // block_size] * block_size + t % block_size.
Linear (gated DeltaNet) layers: conv windows [num_slots, C, K-1] and fp32 recurrent matrices
[num_slots, H, dk, dv]; a sequence owns one slot index, the same in every layer."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cpu import heap
from .spec import AttentionSpec, LinearSpec


@dataclass(frozen=True)
class PoolPlan:
    num_blocks: int
    num_slots: int
    block_size: int
    bytes_per_block: int
    bytes_per_slot: int

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.bytes_per_block + self.num_slots * self.bytes_per_slot

    def describe(self) -> str:
        text = f"{self.nbytes / 2**20:.0f} MiB: {self.num_blocks} blocks x {self.block_size} = {self.tokens} tokens"
        if self.num_slots:
            text += f", {self.num_slots} recurrent-state slots ({self.bytes_per_slot / 2**20:.1f} MiB each)"
        return text


def plan_pool(spec: list, budget_bytes: int, dtype: torch.dtype, block_size: int, want_slots: int) -> PoolPlan:
    """Split a byte budget between DeltaNet slots (up to `want_slots`, at most half the budget) and
    KV blocks (the rest)."""
    per_block = sum(s.bytes_per_token(dtype) for s in spec if isinstance(s, AttentionSpec)) * block_size
    per_slot = sum(s.bytes_per_slot(dtype) for s in spec if isinstance(s, LinearSpec))
    slots = 0
    if per_slot:
        slots = min(want_slots, budget_bytes // 2 // per_slot) if per_block else min(want_slots, budget_bytes // per_slot)
        if slots < 1:
            raise ValueError(f"a state budget of {budget_bytes / 2**20:.0f} MiB cannot hold one sequence's "
                             f"recurrent state ({per_slot / 2**20:.1f} MiB); raise the KV cache memory")
    blocks = (budget_bytes - slots * per_slot) // per_block if per_block else 0
    if per_block and blocks < 2:
        raise ValueError(f"a state budget of {budget_bytes / 2**20:.0f} MiB holds fewer than two KV blocks; "
                         f"raise the KV cache memory")
    return PoolPlan(int(blocks), int(slots), block_size, per_block, per_slot)


class StatePool:
    def __init__(self, spec: list, plan: PoolPlan, dtype: torch.dtype, device):
        self.spec, self.plan, self.dtype, self.device = spec, plan, dtype, device
        self.block_size = plan.block_size
        self.on_cpu = torch.device(device).type == "cpu"  # pages committed on first write
        rows = plan.num_blocks * plan.block_size
        self.keys, self.values, self.conv, self.recurrent = {}, {}, {}, {}
        for i, s in enumerate(spec):
            if isinstance(s, AttentionSpec):
                # empty, not zeros: the pool's pages are committed as blocks are first written. Row 0
                # is zeroed because padded reads point there (masked, but a NaN would still leak)
                self.keys[i] = torch.empty(rows, s.num_kv_heads, s.head_dim, dtype=dtype, device=device)
                self.values[i] = torch.empty(rows, s.num_kv_heads, s.head_dim, dtype=dtype, device=device)
                for t in (self.keys[i], self.values[i]):
                    heap.advise_huge(t)  # a block's first write faults 2 MB at a time, not 4 KB
                if rows:
                    self.keys[i][0].zero_()
                    self.values[i][0].zero_()
            elif isinstance(s, LinearSpec):
                # zeroed when a sequence takes the slot
                self.conv[i] = torch.empty(plan.num_slots, s.conv_dim, s.conv_kernel - 1, dtype=dtype, device=device)
                self.recurrent[i] = torch.empty(plan.num_slots, s.num_heads, s.key_dim, s.value_dim,
                                                dtype=torch.float32, device=device)
                for t in (self.conv[i], self.recurrent[i]):
                    heap.advise_huge(t)
            elif s is not None:  # None: a layer left out on purpose (one layer run alone)
                raise TypeError(f"unknown state spec {s!r}")
        # slots written at least once: their pages are committed (an empty pool's are not, and the
        # first write to one pays a page fault per 4 KB; StateManager.warm_snapshot_slots)
        self.touched = [False] * plan.num_slots
        self.written_blocks = 0  # blocks [0, written_blocks) were written once by write_blocks

    def write_blocks(self, start: int, end: int) -> None:
        """Write blocks [start, end) once (zeros) so that their pages are committed: only for blocks
        no sequence holds (StateManager.warm_blocks)."""
        bs = self.block_size
        for i in self.keys:
            self.keys[i][start * bs:end * bs].zero_()
            self.values[i][start * bs:end * bs].zero_()
        self.written_blocks = max(self.written_blocks, end)

    # copies the state manager asks for (prefix snapshots, copy-on-write of a shared last block)
    def copy_slot(self, src: int, dst: int) -> None:
        for i in self.conv:
            self.conv[i][dst].copy_(self.conv[i][src])
            self.recurrent[i][dst].copy_(self.recurrent[i][src])
        self.touched[dst] = True

    def zero_slot(self, slot: int) -> None:
        for i in self.conv:
            self.conv[i][slot].zero_()
            self.recurrent[i][slot].zero_()
        self.touched[slot] = True

    def copy_block(self, src: int, dst: int) -> None:
        bs = self.block_size
        for i in self.keys:
            self.keys[i][dst * bs:(dst + 1) * bs].copy_(self.keys[i][src * bs:(src + 1) * bs])
            self.values[i][dst * bs:(dst + 1) * bs].copy_(self.values[i][src * bs:(src + 1) * bs])
