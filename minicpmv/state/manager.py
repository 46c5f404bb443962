"""The state manager: hands out KV blocks and recurrent-state slots to sequences, grows them as
they advance, frees them, and keeps prefix snapshots for reuse. Integers only; tensor copies go
to the pool when there is one (scheduler tests run without)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .alloc import BlockAllocator, SlotAllocator
from .pool import PoolPlan, StatePool
from .prefix import PrefixCache, PrefixEntry, prefix_keys, vision_starts


@dataclass(eq=False)
class SeqState:
    """Where one sequence's state lives: its block table and slot, and how many of its tokens
    the pool holds."""
    blocks: list[int] = field(default_factory=list)
    slot: int | None = None
    num_computed: int = 0


class StateManager:
    def __init__(self, plan: PoolPlan, pool: StatePool | None = None, prefix_caching: bool = True):
        self.plan = plan
        self.block_size = plan.block_size
        self.blocks = BlockAllocator(plan.num_blocks)
        self.slots = SlotAllocator(plan.num_slots)
        self.uses_blocks = plan.bytes_per_block > 0
        self.uses_slots = plan.bytes_per_slot > 0
        self.pool = pool
        self.prefix = PrefixCache() if prefix_caching else None

    # -- capacity ------------------------------------------------------------------------------
    @property
    def max_tokens(self) -> int:
        """The longest sequence the pool can ever hold (prompt and reply)."""
        return self.plan.tokens if self.uses_blocks else 1 << 62

    def blocks_for(self, st: SeqState, upto: int) -> int:
        if not self.uses_blocks:
            return 0
        return max(0, -(-upto // self.block_size) - len(st.blocks))

    def _reclaimable(self) -> tuple[int, int]:
        """Blocks and slots that dropping every prefix entry would free."""
        if self.prefix is None:
            return 0, 0
        blocks = {b for e in self.prefix.entries.values() for b in e.blocks if self.blocks.refs[b] == 1}
        slots = sum(1 for e in self.prefix.entries.values() if e.slot is not None)
        return len(blocks), slots

    def can_allocate(self, blocks: int, slots: int = 0) -> bool:
        if blocks <= self.blocks.num_free and slots <= self.slots.num_free:
            return True
        rb, rs = self._reclaimable()
        return blocks <= self.blocks.num_free + rb and slots <= self.slots.num_free + rs

    def _make_room(self, blocks: int, slots: int) -> None:
        while (blocks > self.blocks.num_free or slots > self.slots.num_free) and self.prefix and len(self.prefix):
            self._drop(self.prefix.pop_oldest())
        if blocks > self.blocks.num_free or slots > self.slots.num_free:
            raise MemoryError("state pool exhausted")

    # -- per sequence --------------------------------------------------------------------------
    def grow(self, st: SeqState, upto: int) -> None:
        """Make room for tokens [0, upto) of the sequence (raises MemoryError when impossible)."""
        need = self.blocks_for(st, upto)
        if need:
            self._make_room(need, 0)
            st.blocks += self.blocks.allocate(need)

    def take_slot(self, st: SeqState) -> None:
        if self.uses_slots and st.slot is None:
            self._make_room(0, 1)
            st.slot = self.slots.allocate()
            if self.pool is not None:
                self.pool.zero_slot(st.slot)

    def warm_snapshot_slots(self, n: int = 2) -> list[int]:
        """Write once, while the engine idles, the n slots the next prefix snapshots will take (the
        highest free) that were never written: a snapshot then copies into committed pages instead of
        faulting them in on the way to a token (a 19 MB slot of the real-size 4.6: 100-150 ms on first
        write in the Firecracker VM of 2026-12-03, 1-2 ms after). Two by default: one request can
        take two, one at its reuse boundary (filled mid-chunk) and one when it ends. Returns the slots
        written."""
        if self.prefix is None or self.pool is None or not self.uses_slots:
            return []
        cold = [s for s in self.slots.peek_many(n, high=True) if not self.pool.touched[s]]
        for slot in cold:
            self.pool.zero_slot(slot)
        return cold

    def warm_blocks(self, tokens: int = 2048, max_bytes: int = 64 << 20) -> int:
        """Write once, while the engine idles, the KV blocks the next prompts will take when they
        have never been written (ids from the allocator's high mark on: the prefix cache keeps a
        finished request's blocks, so every new prompt takes fresh ones), up to `tokens` ahead and
        `max_bytes`: their pages are then committed before a prompt writes them (a 512-token prompt
        of the real-size 4.6 faulted ~3,000 pages of 4 KB in its KV blocks, 30-60 us each in the VM of
        2026-12-03). Returns how many blocks it wrote."""
        if self.pool is None or not self.uses_blocks or not self.pool.on_cpu:
            return 0
        ahead = min(-(-tokens // self.block_size), max_bytes // self.plan.bytes_per_block)
        start = max(self.blocks.high, self.pool.written_blocks)
        end = min(self.plan.num_blocks, self.blocks.high + ahead)
        if end <= start:
            return 0
        self.pool.write_blocks(start, end)
        return end - start

    def free(self, st: SeqState) -> None:
        self.blocks.release(st.blocks)
        st.blocks = []
        if st.slot is not None:
            self.slots.release(st.slot)
            st.slot = None
        st.num_computed = 0

    def fork(self, src: SeqState) -> SeqState:
        """An independent copy (a beam branching off): full blocks shared, the last partial block
        and the slot copied."""
        dst = SeqState(num_computed=src.num_computed)
        full = src.num_computed // self.block_size if self.uses_blocks else 0
        self.blocks.share(src.blocks[:full])
        dst.blocks = src.blocks[:full]
        rest = len(src.blocks) - full
        if rest:
            self._make_room(rest, 0)
            fresh = self.blocks.allocate(rest)
            if self.pool is not None:
                for a, b in zip(src.blocks[full:], fresh):
                    self.pool.copy_block(a, b)
            dst.blocks += fresh
        if src.slot is not None:
            self.take_slot(dst)
            if self.pool is not None:
                self.pool.copy_slot(src.slot, dst.slot)
        return dst

    # -- prefix reuse --------------------------------------------------------------------------
    def match(self, st: SeqState, tokens: list[int], vision: list) -> int:
        """Adopt the longest cached prefix of `tokens` (at least one token is left to compute).
        Returns the number of tokens reused (0 on a miss)."""
        if self.prefix is None or st.num_computed:
            return 0
        entry = self.prefix.lookup(tokens, vision_starts(tokens, vision), len(tokens) - 1)
        if entry is None:
            return 0
        full = entry.length // self.block_size if self.uses_blocks else 0
        partial = len(entry.blocks) - full
        del self.prefix.entries[entry.key]  # not evictable while it is being copied from
        try:
            if not self.can_allocate(partial, 1 if entry.slot is not None else 0):
                return 0
            self._adopt(st, entry, full, partial)
        finally:
            self.prefix.add(entry)
        return entry.length

    def _adopt(self, st: SeqState, entry: PrefixEntry, full: int, partial: int) -> None:
        self.blocks.share(entry.blocks[:full])
        st.blocks = entry.blocks[:full]
        if partial:  # the sequence will write past the boundary inside this block: copy it
            self._make_room(1, 0)
            [b] = self.blocks.allocate(1)
            if self.pool is not None:
                self.pool.copy_block(entry.blocks[full], b)
            st.blocks.append(b)
        if entry.slot is not None:
            self.take_slot(st)
            if self.pool is not None:
                self.pool.copy_slot(entry.slot, st.slot)
        st.num_computed = entry.length

    def snapshot(self, st: SeqState, tokens: list[int], vision: list) -> None:
        """Keep the sequence's state at its current boundary (tokens[:num_computed]) for reuse."""
        pending = self.reserve_snapshot(st, tokens, vision, st.num_computed)
        if pending is not None:
            if pending.slot is not None and self.pool is not None:
                self.pool.copy_slot(st.slot, pending.slot)
            self.commit_snapshot(st, pending)

    def reserve_snapshot(self, st: SeqState, tokens: list[int], vision: list, length: int) -> PrefixEntry | None:
        """Start a snapshot of tokens[:length]: a free slot for its recurrent state when the model has
        one (filled by the caller: a copy, or the layers writing it mid-chunk). None when there is
        nothing to do (no prefix cache, already kept, no free slot: a snapshot never evicts, it is an
        optimisation, not a need)."""
        if self.prefix is None or length == 0:
            return None
        key = prefix_keys(tokens, vision_starts(tokens, vision), [length])[length]
        if key in self.prefix:
            return None
        slot = None
        if st.slot is not None:
            if not self.slots.num_free:
                return None
            slot = self.slots.allocate(high=True)
        return PrefixEntry(key, length, [], slot)

    def commit_snapshot(self, st: SeqState, pending: PrefixEntry) -> None:
        """File a reserved snapshot once the sequence's blocks hold its tokens (and its slot, if any,
        is filled)."""
        nblocks = -(-pending.length // self.block_size) if self.uses_blocks else 0
        pending.blocks = st.blocks[:nblocks]
        self.blocks.share(pending.blocks)
        self.prefix.add(pending)

    def cancel_snapshot(self, pending: PrefixEntry) -> None:
        if pending.slot is not None:
            self.slots.release(pending.slot)

    def _drop(self, entry: PrefixEntry) -> None:
        self.blocks.release(entry.blocks)
        if entry.slot is not None:
            self.slots.release(entry.slot)

    def clear_prefix_cache(self) -> None:
        while self.prefix and len(self.prefix):
            self._drop(self.prefix.pop_oldest())
