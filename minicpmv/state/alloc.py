"""Integer bookkeeping of the state pool: which KV blocks and which DeltaNet slots are free.
Pure Python (no tensors), so the scheduler and its tests run without a model."""
from __future__ import annotations

import bisect


class BlockAllocator:
    """Reference-counted blocks: a block shared by several sequences (a reused prefix) returns to
    the free list when its last holder lets go."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.refs = [0] * num_blocks
        # blocks [0, high) were handed out at least once; the rest come out in ascending order after
        # every freed block (freed ones go back on top), so high is where unwritten memory begins
        self.high = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"{n} KV blocks asked, {len(self._free)} free")
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self.refs[b] = 1
        if out:
            self.high = max(self.high, max(out) + 1)
        return out

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self.refs[b] > 0, f"block {b} is free"
            self.refs[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] -= 1
            assert self.refs[b] >= 0, f"block {b} released twice"
            if self.refs[b] == 0:
                self._free.append(b)


class SlotAllocator:
    """Running sequences take the lowest free slots, prefix snapshots the highest: the sequences of
    a decode batch then sit in few runs of consecutive slots, whose states are updated in place."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free = list(range(num_slots))  # ascending
        self.used = [False] * num_slots

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, high: bool = False) -> int:
        if not self._free:
            raise MemoryError("no free state slot")
        s = self._free.pop() if high else self._free.pop(0)
        self.used[s] = True
        return s

    def peek(self, high: bool = False) -> int | None:
        """The slot allocate(high) would hand out next, or None when none is free."""
        return None if not self._free else self._free[-1] if high else self._free[0]

    def peek_many(self, n: int, high: bool = False) -> list[int]:
        """The (at most) n slots the next n calls of allocate(high) would hand out, in that order."""
        return self._free[::-1][:n] if high else self._free[:n]

    def release(self, slot: int) -> None:
        assert self.used[slot], f"slot {slot} released twice"
        self.used[slot] = False
        bisect.insort(self._free, slot)
