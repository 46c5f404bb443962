"""A private pool for one sequence: the state for one-off forwards outside the engine's
scheduler (tests against an oracle, quantization calibration, benchmarks of a bare model)."""
from __future__ import annotations

import torch

from .batch import ForwardBatch
from .manager import SeqState, StateManager
from .pool import PoolPlan, StatePool
from .spec import AttentionSpec, LinearSpec


class SingleSequence:
    def __init__(self, spec: list, capacity: int, dtype: torch.dtype, device="cpu", block_size: int = 16):
        per_block = sum(s.bytes_per_token(dtype) for s in spec if isinstance(s, AttentionSpec)) * block_size
        per_slot = sum(s.bytes_per_slot(dtype) for s in spec if isinstance(s, LinearSpec))
        plan = PoolPlan(-(-max(capacity, 1) // block_size) if per_block else 0, 1 if per_slot else 0, block_size,
                        per_block, per_slot)
        self.pool = StatePool(spec, plan, dtype, device)
        self.manager = StateManager(plan, self.pool, prefix_caching=False)
        self.state = SeqState()
        self.manager.take_slot(self.state)

    @classmethod
    def for_model(cls, model, capacity: int) -> "SingleSequence":
        device = next(model.parameters()).device
        return cls(model.state_spec(), capacity, model.dtype, device)

    def batch(self, num_new: int, positions: torch.Tensor | None = None) -> ForwardBatch:
        """The ForwardBatch for the sequence's next `num_new` tokens (positions default to their
        indices); the sequence counts them as computed."""
        st = self.state
        start = st.num_computed
        self.manager.grow(st, start + num_new)
        if positions is None:
            positions = torch.arange(start, start + num_new, device=self.pool.device)[None]
        st.num_computed += num_new
        return ForwardBatch(self.pool, positions, [st.blocks], [start], [st.slot or 0])
