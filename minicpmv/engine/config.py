"""EngineConfig: every knob of the engine core in one place, shared by the Python API, the CLI
and the server (which only builds one of these and never reaches further in)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..state import has_linear_spec, plan_pool
from ..state.pool import PoolPlan

AUTO_TOKENS_PER_SEQUENCE = 4096  # what an automatic budget plans for each of max_num_seqs sequences


@dataclass
class EngineConfig:
    max_context: int
    kv_cache_memory: int | None = None  # bytes for KV blocks + recurrent slots; None = sized automatically
    block_size: int = 16
    max_num_seqs: int = 32  # sequences decoding together
    # tokens (decode + prefill chunks) per step while streams decode: bounds their stall behind a long
    # prompt (real 4.6 here: 64 -> 0.85 s at 16k context, 256 -> 2.45 s; docs/performance.md)
    max_num_batched_tokens: int = 64
    # the budget of a step in which nothing decodes (one user's prompt): 64 x 8 = 512-token chunks, one
    # pass over the weights for a 512-token prompt (Zen 5, 2026-12-03: 5-7% faster than two of 256)
    idle_budget_factor: int = 8
    # past this many cached tokens, a prompt chunk beside decoding streams shrinks in proportion to its
    # context (never below min_chunk_tokens): its attention work, which grows with the context, then
    # stays that of a full chunk at this context, and so does the streams' gap (docs/engine.md)
    long_context_tokens: int = 8192
    min_chunk_tokens: int = 16
    encoder_chunk_patches: int = 4096  # vision work is cut into units of about this many patches...
    max_encoder_units_per_step: int = 1  # ...and at most this many units run per step
    # a step's prompt chunks and decode tokens in one model call (one pass over the weights per step,
    # on models that take it). False: one call per chunk, so what a sequence computes never depends
    # on what else runs beside it, under every weight format (int8/int4/bf16 kernels change with the
    # row count; fp32 output is the same either way)
    mixed_steps: bool = True
    enable_prefix_caching: bool = True
    encoder_cache_bytes: int = 256 << 20

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "idle_budget_factor", "encoder_chunk_patches",
                     "max_encoder_units_per_step", "long_context_tokens", "min_chunk_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")

    def plan(self, spec: list, dtype) -> PoolPlan:
        slots = 2 * self.max_num_seqs  # half for running sequences, half for prefix snapshots
        budget = self.kv_cache_memory
        if budget is None:
            tokens = self.max_num_seqs * min(self.max_context, AUTO_TOKENS_PER_SEQUENCE)
            want = plan_pool(spec, 1 << 62, dtype, self.block_size, slots)
            need = tokens // self.block_size * want.bytes_per_block + slots * want.bytes_per_slot
            if has_linear_spec(spec) and want.bytes_per_block:
                need = max(need, 2 * slots * want.bytes_per_slot)  # slots may take half the budget
            budget = min(need, max(256 << 20, available_memory() // 5))
        return plan_pool(spec, budget, dtype, self.block_size, slots)


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_bytes(text: str) -> int:
    """'2GiB', '512M', '1.5G', '1073741824' -> bytes (for --kv-cache-memory)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in "KMGT" else t
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 2GiB, 512MiB)") from None
    if value <= 0:
        raise ValueError(f"a memory size must be > 0, got {text!r}")
    return int(value)
