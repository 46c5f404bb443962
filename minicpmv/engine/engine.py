"""The engine loop under the Python API, the CLI, batch jobs and the server.

`step()` = schedule -> run (vision units, prompt chunks, one batched decode) -> sample -> update.
New sequences join between any two steps (continuous batching). A failure inside a step fails
only the sequences it touches: a vision unit or prompt chunk fails its own sequence; a failed
batched decode sends its sequences back to be recomputed, each then decoding alone once so that
a sequence which fails again fails by itself. step() itself never raises for a request's fault."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import PromptTooLongError
from ..state import StateManager, StatePool
from .config import EngineConfig
from .encoder_cache import EncoderCache, content_key
from .runner import ModelRunner
from .sampling import sample_sequences
from .scheduler import Scheduler
from .sequence import Sequence, Status

log = logging.getLogger("minicpmv.engine")


@dataclass
class StepOutput:
    seq: Sequence
    token_id: int | None  # None when the sequence ended without a new token (error)
    finished: bool


class Engine:
    def __init__(self, model, config: EngineConfig | None = None, **overrides):
        if config is None:
            config = EngineConfig(**overrides)
        elif overrides:
            raise TypeError("pass either an EngineConfig or keyword settings, not both")
        self.model = model
        self.config = config
        self.device = next(model.parameters()).device
        self.spec = model.state_spec()
        self.plan = config.plan(self.spec, model.dtype)
        self.pool = StatePool(self.spec, self.plan, model.dtype, self.device)
        self.manager = StateManager(self.plan, self.pool, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.manager, config)
        self.encoder_cache = EncoderCache(config.encoder_cache_bytes)
        self.runner = ModelRunner(model, self.pool, self.encoder_cache)
        self.num_steps = 0
        self.num_failed = 0

    @property
    def max_context(self) -> int:
        return self.config.max_context

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def waiting(self):
        return self.scheduler.waiting

    def describe(self) -> str:
        return f"state pool {self.plan.describe()}; up to {self.config.max_num_seqs} sequences, " \
               f"{self.config.max_num_batched_tokens} tokens per step"

    # -- requests -------------------------------------------------------------------------------
    def check_prompt(self, n: int) -> None:
        """Raise PromptTooLongError when a prompt of n tokens can never run (before any work)."""
        limit = min(self.max_context, self.manager.max_tokens)
        if n >= limit:
            where = (f"the model's context is {limit} tokens" if limit == self.max_context else
                     f"the KV cache holds {limit} tokens (raise kv_cache_memory / --kv-cache-memory)")
            raise PromptTooLongError(
                f"the prompt is {n} tokens (text and vision placeholders) but {where}; shorten the text, "
                f"send fewer/smaller images or frames, or lower max_slice_nums")

    def add(self, seq: Sequence) -> Sequence:
        n = len(seq.prompt_ids)
        self.check_prompt(n)
        seq.params.max_new_tokens = min(seq.params.max_new_tokens,
                                        min(self.max_context, self.manager.max_tokens) - n)
        seq.vision_parts = self.split_vision(seq.vision)
        self.scheduler.add(seq)
        return seq

    def split_vision(self, vision: list) -> list:
        """Vision inputs -> bounded units (content keys set), in placeholder order."""
        parts = []
        split = getattr(self.model, "vision_chunks", None)
        for v in vision:
            if v.cache_key is None:
                v.cache_key = content_key(v)
            pieces = split(v, self.config.encoder_chunk_patches) if split else [v]
            for i, p in enumerate(pieces):
                if len(pieces) > 1:
                    p.cache_key = f"{v.cache_key}#{i}/{len(pieces)}"
                parts.append(p)
        return parts

    def abort(self, seq: Sequence) -> None:
        if seq.status is not Status.FINISHED:
            self._finish(seq, "abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @torch.inference_mode()
    def idle(self) -> None:
        """Work for a moment with nothing to run (the server's engine thread calls it when the queue
        empties): the next prefix snapshots' state slots and the next prompts' KV blocks are written
        once, off any request's path."""
        self.manager.warm_snapshot_slots()
        self.manager.warm_blocks()

    # -- the loop -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        plan = self.scheduler.schedule()
        self.num_steps += 1
        outputs: list[StepOutput] = []
        for seq, units in plan.encode:
            self._guard(outputs, seq, self.runner.encode, seq, units)
        to_sample, rows = [], []
        chunks = [(seq, n) for seq, n in plan.prefill if not seq.finished]
        mixes = self.runner.mixes and self.config.mixed_steps
        together = [(seq, n) for seq, n in chunks if not seq.isolate] if mixes else []
        if len(together) + bool(plan.decode) < 2:
            together = []
        if together:  # one call, one pass over the weights
            self._mixed(together, plan.decode, outputs, to_sample, rows)
        for seq, n in chunks:
            if any(seq is s for s, _ in together):
                continue
            pending = self._boundary_inside(seq, n)
            logits = self._guard(outputs, seq, self.runner.prefill, seq, n, self._keep(seq, pending))
            self._after_chunk(seq, pending, logits, to_sample, rows)
        if plan.decode and not together:
            try:
                rows.append(self.runner.decode(plan.decode))
                to_sample += plan.decode
            except Exception as e:  # noqa: BLE001 - attribute it by recomputing each alone
                if len(plan.decode) == 1:
                    self._fail(outputs, plan.decode[0], e)
                else:
                    log.warning("a batched decode of %d sequences failed (%s); recomputing each alone",
                                len(plan.decode), e)
                    self._recompute_alone(plan.decode)
        for seq in plan.isolated:
            logits = self._guard(outputs, seq, self.runner.decode, [seq])
            if not seq.finished:
                seq.isolate = False
                to_sample.append(seq)
                rows.append(logits)
        if to_sample:
            self._sample((rows[0] if len(rows) == 1 else torch.cat(rows)).float(), to_sample, outputs)
        return outputs

    def _mixed(self, chunks, decodes, outputs, to_sample, rows) -> None:
        """Prompt chunks and decode tokens in one model call. A failure there cannot be pinned on one
        request: every sequence in the call is recomputed alone (one that fails again fails by itself)."""
        pendings = [self._boundary_inside(seq, n) for seq, n in chunks]
        try:
            chunk_logits, decode_logits = self.runner.mixed(
                [(seq, n, self._keep(seq, p)) for (seq, n), p in zip(chunks, pendings)], decodes)
        except Exception as e:  # noqa: BLE001 - attribute it by recomputing each alone
            for p in pendings:
                if p is not None:
                    self.manager.cancel_snapshot(p)
            seqs = [seq for seq, _ in chunks] + decodes
            log.warning("a step of %d sequences failed (%s); recomputing each alone", len(seqs), e)
            self._recompute_alone(seqs)
            return
        for (seq, _), pending, logits in zip(chunks, pendings, chunk_logits):
            self._after_chunk(seq, pending, logits, to_sample, rows)
        if decodes:
            rows.append(decode_logits)
            to_sample += decodes

    def _recompute_alone(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self.scheduler.requeue(seq)
            seq.isolate = True

    def _after_chunk(self, seq: Sequence, pending, logits, to_sample, rows) -> None:
        """Bookkeeping after one prompt chunk: the snapshot at its reuse boundary, features freed once
        the prompt is in, its last logits to sample when the chunk ended the prompt."""
        if pending is not None:
            if seq.finished:
                self.manager.cancel_snapshot(pending)
            else:
                self.manager.commit_snapshot(seq.state, pending)
        if seq.finished:
            return
        if seq.num_computed == seq.reuse_boundary:
            self.manager.snapshot(seq.state, seq.token_ids, seq.vision)
        if seq.num_computed >= len(seq.prompt_ids):
            seq.features = None  # every placeholder is in the pool now
        if logits is not None:
            to_sample.append(seq)
            rows.append(logits[None])

    @staticmethod
    def _keep(seq: Sequence, pending) -> tuple[int, int] | None:
        """ForwardBatch.keep for a chunk whose reserved snapshot has a recurrent-state slot."""
        return None if pending is None or pending.slot is None else (pending.length - seq.num_computed, pending.slot)

    def _boundary_inside(self, seq: Sequence, n: int):
        """A snapshot reserved at the sequence's reuse boundary when it falls strictly inside this
        chunk: the DeltaNet layers fill its slot during the chunk (ForwardBatch.keep); a KV-only
        model needs nothing more, its blocks up to the boundary stay as they are."""
        b, c = seq.reuse_boundary, seq.num_computed
        if not b or not c < b < c + n:
            return None
        return self.manager.reserve_snapshot(seq.state, seq.token_ids, seq.vision, b)

    def _guard(self, outputs, seq, fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - one request's fault ends that request only
            self._fail(outputs, seq, e)
            return None

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], outputs: list[StepOutput]) -> None:
        try:
            tokens = sample_sequences(logits, seqs)
        except Exception:  # noqa: BLE001 - a logits processor of one request failed: find it
            tokens = [self._guard(outputs, s, lambda i=i, s=s: sample_sequences(logits[i:i + 1], [s])[0])
                      for i, s in enumerate(seqs)]
        for seq, token in zip(seqs, tokens):
            if seq.finished:
                continue
            seq.append(token)
            p = seq.params
            if token in p.stop_token_ids:
                self._finish(seq, "stop")
            elif len(seq.output_ids) >= p.max_new_tokens:
                self._finish(seq, "length")
            outputs.append(StepOutput(seq, token, seq.finished))

    def _fail(self, outputs: list[StepOutput], seq: Sequence, error: BaseException) -> None:
        log.warning("sequence %d failed: %s: %s", seq.seq_id, type(error).__name__, error)
        self.num_failed += 1
        seq.error = error
        self._finish(seq, "error")
        outputs.append(StepOutput(seq, None, True))

    def _finish(self, seq: Sequence, reason: str) -> None:
        if reason in ("stop", "length") and seq.num_computed:
            self.manager.snapshot(seq.state, seq.token_ids, seq.vision)
        self.scheduler.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.features = None

    def fail_all(self, error: BaseException) -> list[StepOutput]:
        """End every sequence with an error (the loop hit a fault it cannot attribute)."""
        outputs: list[StepOutput] = []
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._fail(outputs, seq, error)
        return outputs

    # -- observability ----------------------------------------------------------------------------
    def metrics(self) -> dict:
        m = self.manager
        prefix = m.prefix
        return {
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
            "steps": self.num_steps, "preemptions": self.scheduler.num_preemptions, "failed": self.num_failed,
            "kv_blocks_total": m.plan.num_blocks, "kv_blocks_free": m.blocks.num_free,
            "state_slots_total": m.plan.num_slots, "state_slots_free": m.slots.num_free,
            "prefix_entries": len(prefix) if prefix else 0, "prefix_hits": prefix.hits if prefix else 0,
            "prefix_misses": prefix.misses if prefix else 0, "prefix_hit_tokens": prefix.hit_tokens if prefix else 0,
            "encoder_cache_bytes": self.encoder_cache.nbytes, "encoder_cache_entries": len(self.encoder_cache.entries),
            "encoder_cache_hits": self.encoder_cache.hits, "encoder_cache_misses": self.encoder_cache.misses,
        }
