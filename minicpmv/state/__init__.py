"""The state manager: the memory every sequence's text model keeps between steps (paged KV
blocks for attention layers, fixed slots for gated-DeltaNet state), the prefix cache, and the
ForwardBatch through which layers reach it."""
from .batch import ForwardBatch, MixedBatch
from .manager import SeqState, StateManager
from .pool import PoolPlan, StatePool, plan_pool
from .single import SingleSequence
from .spec import AttentionSpec, LinearSpec, has_linear as has_linear_spec

__all__ = ["AttentionSpec", "has_linear_spec", "ForwardBatch", "LinearSpec", "MixedBatch", "PoolPlan", "SeqState", "SingleSequence", "StateManager",
           "StatePool", "plan_pool"]
