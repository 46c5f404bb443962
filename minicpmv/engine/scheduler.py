"""The scheduler: which sequences do what in the next step. Pure bookkeeping over integers (no
tensors), so it is tested with a fake model.

Each step packs, under a token budget:
  1. one decode token for every running sequence whose prompt is done (preempting the newest
     running sequences when the pool has no block for them: their state is freed and recomputed
     later from their tokens, so their output does not change);
  2. the next vision units, then the next prompt chunk, of sequences being prefilled;
  3. newly admitted sequences, first come first served, while there are free blocks and slots
     (a prefix-cache hit is adopted at admission, so only the rest of the prompt is computed).
A long prompt or video is therefore spread over many steps and never stalls the decoding streams
for more than one chunk; past `long_context_tokens` of context its chunks shrink in proportion, as
their attention grows with the context; when no sequence is decoding, nothing waits on the chunk, so it may be
`idle_budget_factor` times larger (fewer passes over the weights for one user's prompt)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..state import StateManager
from .config import EngineConfig
from .sequence import Sequence, Status


@dataclass
class StepPlan:
    decode: list[Sequence] = field(default_factory=list)  # one token each, in one batched call
    isolated: list[Sequence] = field(default_factory=list)  # one token each, alone (after a failed batch)
    encode: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, vision units to encode)
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens to feed)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.decode or self.isolated or self.encode or self.prefill)


class Scheduler:
    def __init__(self, manager: StateManager, config: EngineConfig):
        self.manager = manager
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and free its state (finish, abort or failure)."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self.manager.free(seq.state)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step -----------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.config.max_num_batched_tokens
        units = self.config.max_encoder_units_per_step
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or not self._decoding(seq):
                continue
            if not self._reserve(seq, seq.num_computed + 1, plan):
                continue  # it was preempted itself
            (plan.isolated if seq.isolate else plan.decode).append(seq)
            budget -= 1
        if not (plan.decode or plan.isolated):
            budget *= self.config.idle_budget_factor  # no stream to keep flowing: bigger prompt chunks
        plan.decode.sort(key=lambda s: s.state.slot or 0)  # consecutive slots: in-place batched state updates
        for seq in list(self.running):
            if seq.status is Status.RUNNING and not self._decoding(seq) and seq not in plan.preempted:
                budget, units = self._prefill(seq, budget, units, plan)
        while self.waiting and len(self.running) < self.config.max_num_seqs and (budget > 0 or units > 0):
            seq = self.waiting[0]
            if seq in plan.preempted or not self._admit(seq, budget):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            budget, units = self._prefill(seq, budget, units, plan)
        if plan.empty and len(self.running) > 1:
            # partly prefilled sequences hold every block and none can go on: the newest yields
            self._preempt(self.running[-1], plan)
            return self.schedule()
        return plan

    def _decoding(self, seq: Sequence) -> bool:
        return seq.num_pending == 1 and seq.encoded_units >= seq.vision_units

    def _prefill(self, seq: Sequence, budget: int, units: int, plan: StepPlan) -> tuple[int, int]:
        if seq.encoded_units < seq.vision_units:
            n = min(units, seq.vision_units - seq.encoded_units)
            if n:
                plan.encode.append((seq, n))
            return budget, units - n
        # a sequence under suspicion recomputes all but its last token, which it then decodes alone
        n = min(seq.num_pending - (1 if seq.isolate else 0), budget, self._chunk_limit(seq, plan))
        if n <= 0:
            return budget, units
        m = self.manager
        if not m.can_allocate(m.blocks_for(seq.state, seq.num_computed + n)):
            # take what fits now; the rest follows as blocks free up
            n = min(n, (len(seq.state.blocks) + m.blocks.num_free) * m.block_size - seq.num_computed)
            if n <= 0:
                return budget, units
        self.manager.grow(seq.state, seq.num_computed + n)
        plan.prefill.append((seq, n))
        return budget - n, units

    def _chunk_limit(self, seq: Sequence, plan: StepPlan) -> int:
        """The largest chunk whose attention over the cached context keeps the decoding streams' gap
        bounded: a full budget up to long_context_tokens of context, then in proportion to it."""
        c, cfg = seq.num_computed, self.config
        if not (plan.decode or plan.isolated) or c <= cfg.long_context_tokens:
            return 1 << 62
        return max(cfg.min_chunk_tokens, cfg.max_num_batched_tokens * cfg.long_context_tokens // c)

    def _admit(self, seq: Sequence, budget: int) -> bool:
        first = min(seq.num_pending, max(budget, 1))
        blocks = self.manager.blocks_for(seq.state, seq.num_computed + first)
        if not self.manager.can_allocate(blocks, 1 if self.manager.uses_slots else 0):
            return False
        if seq.num_computed == 0:
            seq.num_cached = self.manager.match(seq.state, seq.token_ids, seq.vision)
            if seq.num_cached and seq.vision_units and self._vision_covered(seq):
                seq.encoded_units = seq.vision_units  # every placeholder is in the reused prefix
        self.manager.take_slot(seq.state)
        return True

    @staticmethod
    def _vision_covered(seq: Sequence) -> bool:
        ids = {v.token_id for v in seq.vision}
        last = max((i for i, t in enumerate(seq.prompt_ids) if t in ids), default=-1)
        return last < seq.num_computed

    def _reserve(self, seq: Sequence, upto: int, plan: StepPlan) -> bool:
        """Blocks for seq's tokens [0, upto), preempting the newest running sequences if needed."""
        need = self.manager.blocks_for(seq.state, upto)
        while not self.manager.can_allocate(need):
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is seq:
                return False
        self.manager.grow(seq.state, upto)
        return True

    def requeue(self, seq: Sequence) -> None:
        """Free a running sequence's state and put it first in line: it is recomputed from its tokens."""
        self.running.remove(seq)
        self.manager.free(seq.state)
        seq.status = Status.WAITING
        if seq.features is None:  # its vision embeddings are gone: they will be encoded again
            seq.encoded_units = 0
        self.waiting.appendleft(seq)

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.requeue(seq)
        for group in (plan.decode, plan.isolated):
            if seq in group:
                group.remove(seq)
        plan.prefill = [(s, n) for s, n in plan.prefill if s is not seq]
        plan.encode = [(s, n) for s, n in plan.encode if s is not seq]
        plan.preempted.append(seq)
        self.num_preemptions += 1
