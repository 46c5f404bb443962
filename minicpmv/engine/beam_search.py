"""Beam search for one request, run to completion (what 4.0/4.5's chat(sampling=False) asks of
transformers' generate: num_beams 3, repetition penalty 1.2).

Scoring and stopping follow transformers' `_beam_search` step for step, so the same model gives the
same ids:
  * a beam's score is the sum of its tokens' log-probabilities, each taken as log_softmax(logits) and
    THEN passed through the logits processors (the repetition penalty scales those log-probs);
  * each step keeps the top K = max(2, 1 + #stop tokens) * num_beams continuations over all beams; the
    best num_beams that did not stop keep running, and those among the first num_beams that did stop
    (stop token, or max_new_tokens reached) become finished hypotheses scored
    sum_logprobs / generated_len ** length_penalty (generated_len counts the stop token);
  * the best num_beams finished hypotheses are kept; the search ends when early stopping says so:
    False (the default) = once num_beams hypotheses are finished and the best running beam, divided by
    its current length ** length_penalty, cannot beat the worst of them; True = as soon as num_beams
    hypotheses are finished; "never" = the canonical bound (max length when length_penalty > 0).
Every running beam owns its state in the engine's pool; a beam chosen twice as a parent is forked (full
KV blocks shared, the last partial block and the recurrent slot copied).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..state import ForwardBatch, SeqState
from .prefill import prompt_forward, vision_features
from .sampling import SamplingParams, apply_repetition_penalty
from .sequence import Sequence, Status

NEG = -1.0e9  # transformers' "impossible" score


@dataclass
class BeamSearchParams(SamplingParams):
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # False | True | "never", as transformers

    def __post_init__(self):
        super().__post_init__()
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.early_stopping not in (False, True, "never"):
            raise ValueError(f"early_stopping must be False, True or 'never', got {self.early_stopping!r}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("beam search with sampling (beam sample) is not supported: pass num_beams=1 to "
                             "sample, or do_sample=False for beam search")


@torch.inference_mode()
def beam_search(engine, seq: Sequence) -> Sequence:
    """Prefill `seq` (vision included, through the engine's encoder cache), search, and fill in
    seq.output_ids (the best hypothesis, its stop token included) and seq.finish_reason."""
    p: BeamSearchParams = seq.params
    model, device, nb, manager = engine.model, engine.device, p.num_beams, engine.manager
    n_prompt = len(seq.prompt_ids)
    engine.check_prompt(n_prompt)
    max_new = min(p.max_new_tokens, min(engine.max_context, manager.max_tokens) - n_prompt)
    stops = set(p.stop_token_ids)

    # prefill once; every beam starts from this state (transformers prefills num_beams copies)
    ids = torch.tensor(seq.prompt_ids, dtype=torch.long, device=device)
    features = vision_features(engine.split_vision(seq.vision), engine.runner.encode_unit)
    seq.vision = []
    owned: list[SeqState] = []
    try:
        root = _new_state(manager, owned)
        hidden, _ = prompt_forward(model, ids, features, _batch(engine, [root], n_prompt, seq.positions(0, n_prompt)))
        logits = model.logits(hidden[0, -1:]).float().expand(nb, -1)
        return _search(engine, seq, p, root, logits, owned, max_new, stops)
    except MemoryError as e:
        raise MemoryError(f"beam search with {nb} beams does not fit the state pool ({e}); "
                          f"use fewer beams or a larger kv_cache_memory") from None
    finally:
        for st in owned:
            manager.free(st)


def _new_state(manager, owned: list) -> SeqState:
    st = SeqState()
    owned.append(st)
    manager.take_slot(st)
    return st


def _batch(engine, states: list[SeqState], n: int, positions: torch.Tensor) -> ForwardBatch:
    """A ForwardBatch for n new tokens of each state (all at the same length), counted as computed."""
    start = states[0].num_computed
    for st in states:
        engine.manager.grow(st, start + n)
    batch = ForwardBatch(engine.pool, positions.to(engine.device), [st.blocks for st in states],
                         [start] * len(states), [st.slot or 0 for st in states])
    for st in states:
        st.num_computed += n
    return batch


def _search(engine, seq, p, state, logits, owned, max_new, stops):
    model, nb, manager = engine.model, p.num_beams, engine.manager
    n_prompt = len(seq.prompt_ids)
    seq.status = Status.RUNNING

    states = [state] * nb
    running = [[] for _ in range(nb)]
    running_scores = torch.full((nb,), NEG)
    running_scores[0] = 0.0  # only the first beam's continuations count at the first step
    finished = [None] * nb  # token lists of the kept hypotheses, best first
    finished_scores = torch.full((nb,), NEG)
    finished_mask = torch.zeros(nb, dtype=torch.bool)
    k = max(2, 1 + len(stops)) * nb
    top_mask = torch.arange(k) < nb
    vocab = logits.shape[-1]
    generated = 0  # tokens in every running beam
    while True:
        log_probs = torch.log_softmax(logits.cpu(), dim=-1)
        log_probs = torch.stack([_process(log_probs[b], running[b], seq.prompt_ids, p) for b in range(nb)])
        scores, flat = torch.topk((log_probs + running_scores[:, None]).reshape(-1), k)
        parents, tokens = (flat // vocab).tolist(), (flat % vocab).tolist()
        hits = torch.tensor([t in stops or generated + 1 >= max_new for t in tokens])

        # the best num_beams continuations that did not stop run on
        masked = scores + hits.to(torch.float32) * NEG
        keep = torch.topk(masked, nb).indices.tolist()
        new_scores = masked[keep]

        # continuations among the first num_beams that stopped compete with the finished hypotheses
        candidate = scores / ((generated + 1) ** p.length_penalty)
        candidate += (finished_mask.all() & (p.early_stopping is True)).to(torch.float32) * NEG
        candidate += (~(hits & top_mask)) * NEG
        merged = torch.cat([finished_scores, candidate])
        best = torch.topk(merged, nb).indices.tolist()
        finished = [finished[i] if i < nb else running[parents[i - nb]] + [tokens[i - nb]] for i in best]
        finished_mask = torch.cat([finished_mask, hits & top_mask])[best]
        finished_scores = merged[best]

        # every kept beam needs its own state: reuse a parent once, fork it for further children
        claimed, next_states = set(), []
        for i in keep:
            parent = states[parents[i]]
            if id(parent) in claimed:
                child = manager.fork(parent)
                owned.append(child)
                next_states.append(child)
            else:
                next_states.append(parent)
            claimed.add(id(parent))
        for st in {id(s): s for s in states}.values():
            if id(st) not in claimed:  # a beam no one continues: its state goes back to the pool
                manager.free(st)
                owned.remove(st)
        states = next_states
        running = [running[parents[i]] + [tokens[i]] for i in keep]
        running_scores = new_scores
        generated += 1

        if not (_improvable(running_scores, finished_scores, finished_mask, generated, max_new, p)
                and not (finished_mask.all() and p.early_stopping is True) and not hits.all()):
            break
        last = torch.tensor([r[-1] for r in running], dtype=torch.long, device=engine.device)
        embeds = model.embed(last, {}).transpose(0, 1)  # [nb, 1, D]
        # with M-RoPE, decode positions are the same on every stream: a [B, 1] tensor says so
        positions = torch.full((nb, 1), n_prompt + generated - 1 + seq.rope_delta)
        logits = model.logits(model(embeds, _batch(engine, states, 1, positions))[:, -1]).float()

    seq.output_ids = list(finished[0])
    seq.status = Status.FINISHED
    seq.finish_reason = "stop" if seq.output_ids and seq.output_ids[-1] in stops else "length"
    return seq


def _process(log_probs: torch.Tensor, output_ids: list[int], prompt_ids: list[int], p: SamplingParams):
    """transformers runs its logits processors on the log-softmax output in beam search."""
    if p.repetition_penalty != 1.0:
        seen = (prompt_ids + output_ids) if p.penalize_prompt else output_ids
        if seen:
            log_probs = apply_repetition_penalty(log_probs, torch.tensor(seen, dtype=torch.long), p.repetition_penalty)
    for process in p.logits_processors:
        log_probs = process(output_ids, log_probs)
    return log_probs


def _improvable(running_scores, finished_scores, finished_mask, generated: int, max_new: int,
                p: BeamSearchParams) -> bool:
    """transformers' early-stop heuristic: can the best running beam still beat the worst kept hypothesis?
    (Any slot not yet holding a finished hypothesis counts as -1e9, so the answer is yes until all do.)"""
    length = max_new if (p.early_stopping == "never" and p.length_penalty > 0.0) else generated
    best_possible = running_scores[0] / (length ** p.length_penalty)
    worst = torch.where(finished_mask, finished_scores.min(), torch.tensor(NEG))
    return bool((best_possible > worst).any())
