"""The engine core on a fake model: chunked prefill, admission by memory, preemption and resume,
prefix reuse, vision units, cancellation and faults. Every test ends with the pool empty."""
import pytest
import torch

from fake_model import PLACEHOLDER, FakeModel, reference_tokens
from minicpmv.engine.config import EngineConfig, parse_bytes
from minicpmv.engine.engine import Engine
from minicpmv.engine.sampling import SamplingParams
from minicpmv.engine.sequence import Sequence, VisionInputs
from minicpmv.errors import PromptTooLongError

BLOCK = 4


def engine_for(model=None, blocks=64, slots=8, **kw):
    model = model or FakeModel()
    probe = EngineConfig(max_context=10_000, block_size=BLOCK).plan(model.state_spec(), model.dtype)
    budget = blocks * probe.bytes_per_block + slots * probe.bytes_per_slot
    kw.setdefault("max_num_seqs", slots // 2)
    return Engine(model, EngineConfig(max_context=10_000, block_size=BLOCK, kv_cache_memory=budget, **kw))


def seq(prompt, n=6, vision=None):
    return Sequence(list(prompt), SamplingParams(max_new_tokens=n, stop_token_ids=[]), vision)


def prompt(i, length):
    return [(7 * i + 3 * j) % 90 + 1 for j in range(length)]


def run(engine, seqs, on_step=None):
    for s in seqs:
        engine.add(s)
    steps = 0
    while engine.has_work():
        plan_tokens = engine.step()
        steps += 1
        if on_step:
            on_step(engine, plan_tokens)
        assert steps < 10_000
    return [s.output_ids for s in seqs]


def record_chunks(engine, note):
    """Call note(seq, n, keep) for every prompt chunk the runner feeds, alone or in a mixed call."""
    prefill, mixed = engine.runner.prefill, engine.runner.mixed

    def one(seq, n, keep=None):
        note(seq, n, keep)
        return prefill(seq, n, keep)

    def many(chunks, decodes):
        for c in chunks:
            note(*c)
        return mixed(chunks, decodes)

    engine.runner.prefill, engine.runner.mixed = one, many


@pytest.fixture(autouse=True, params=[True, False], ids=["one-call-per-step", "one-call-per-chunk"])
def runner_mode(request, monkeypatch):
    """Every test runs with the step's chunks and decode tokens in one model call, and without."""
    monkeypatch.setattr(FakeModel, "mixed_default", request.param)
    return request.param


@pytest.fixture(autouse=True)
def pool_back_to_empty(request):
    engines = []
    request.node.engines = engines
    yield
    for e in engines:
        e.manager.clear_prefix_cache()
        assert e.manager.blocks.num_free == e.plan.num_blocks, "KV blocks leaked"
        assert e.manager.slots.num_free == e.plan.num_slots, "state slots leaked"
        assert not e.has_work()


def track(request, engine):
    request.node.engines.append(engine)
    return engine


def test_outputs_match_the_reference(request):
    e = track(request, engine_for())
    seqs = [seq(prompt(i, 5 + 3 * i), n=8) for i in range(3)]
    assert run(e, seqs) == [reference_tokens(s.prompt_ids, 8) for s in seqs]
    assert all(s.finish_reason == "length" for s in seqs)


def test_prompts_are_fed_in_chunks_under_the_token_budget(request):
    e = track(request, engine_for(max_num_batched_tokens=8))
    long, short = seq(prompt(1, 30), n=5), seq(prompt(2, 3), n=12)
    chunks = []
    record_chunks(e, lambda s, n, keep: chunks.append((s.seq_id, n)))
    gaps = []

    def on_step(engine, outs):
        gaps.append([o.seq.seq_id for o in outs])

    e.add(short)
    e.step()  # the short one is decoding before the long one arrives
    out = run(e, [long], on_step)
    assert out == [reference_tokens(long.prompt_ids, 5)]
    assert short.output_ids == reference_tokens(short.prompt_ids, 12)
    long_chunks = [n for sid, n in chunks if sid == long.seq_id]
    assert long_chunks == [7, 7, 7, 7, 2], long_chunks  # the decode token takes one of the 8 each step
    # the running stream got a token in every step while the long prompt was prefilled
    assert all(short.seq_id in ids for ids in gaps[:4])


def test_admission_waits_for_memory_and_everyone_finishes(request):
    e = track(request, engine_for(blocks=12, slots=10, max_num_seqs=5, enable_prefix_caching=False))
    seqs = [seq(prompt(i, 9), n=6) for i in range(5)]  # a 9-token prompt takes 3 blocks: 4 fit at once
    peak = []
    run(e, seqs, lambda engine, _: peak.append((len(engine.running), len(engine.waiting))))
    assert max(r for r, _ in peak) == 4 and peak[0] == (4, 1)  # the fifth waited for memory, not a place
    assert [s.output_ids for s in seqs] == [reference_tokens(s.prompt_ids, 6) for s in seqs]


def test_preempted_sequences_resume_with_identical_output(request):
    e = track(request, engine_for(blocks=10, slots=8, max_num_seqs=4, enable_prefix_caching=False))
    seqs = [seq(prompt(i, 6), n=14) for i in range(3)]  # 3 x 2 blocks to start, 3 x 5 blocks to end
    run(e, seqs)
    assert e.scheduler.num_preemptions > 0
    assert [s.output_ids for s in seqs] == [reference_tokens(s.prompt_ids, 14) for s in seqs]


def test_a_prompt_that_can_never_fit_is_refused_before_any_work(request):
    e = track(request, engine_for(blocks=4))
    with pytest.raises(PromptTooLongError, match="KV cache holds 16 tokens"):
        e.add(seq(prompt(0, 16)))
    s = e.add(seq(prompt(0, 10), n=50))
    assert s.params.max_new_tokens == 6  # capped to what the pool can ever hold
    run(e, [])


def test_prefix_reuse_skips_the_shared_part_and_keeps_the_output(request):
    e = track(request, engine_for())
    first = seq(prompt(3, 10), n=5)
    run(e, [first])
    fed = []
    record_chunks(e, lambda s, n, keep: fed.append(n))
    turn2 = seq(first.token_ids + [5, 6, 7], n=5)  # the reply (but its last token) is in the pool
    run(e, [turn2])
    assert turn2.num_cached == len(first.token_ids) - 1
    assert sum(fed) == 4
    assert turn2.output_ids == reference_tokens(turn2.prompt_ids, 5)
    other = seq(prompt(4, 13), n=3)  # nothing in common
    run(e, [other])
    assert other.num_cached == 0 and other.output_ids == reference_tokens(other.prompt_ids, 3)
    hits, misses = e.manager.prefix.hits, e.manager.prefix.misses
    assert (hits, misses) == (1, 2)


def test_chunks_beside_streams_shrink_as_the_context_grows(request):
    e = track(request, engine_for(blocks=64, max_num_batched_tokens=8, long_context_tokens=16, min_chunk_tokens=2))
    fed = []
    record_chunks(e, lambda s, n, keep: fed.append((s.seq_id, s.num_computed, n)))
    stream, long = seq(prompt(1, 4), n=60), seq(prompt(2, 90), n=2)
    run(e, [stream], on_step=lambda eng, _: eng.add(long) if len(stream.output_ids) == 1 else None)
    assert stream.output_ids == reference_tokens(stream.prompt_ids, 60)
    assert long.output_ids == reference_tokens(long.prompt_ids, 2)
    chunks = [(c, n) for sid, c, n in fed if sid == long.seq_id]
    assert sum(n for _, n in chunks) == 90
    assert [n for c, n in chunks if c <= 16] == [7, 7, 7]  # a full budget less the stream's token
    later = [(c, n) for c, n in chunks if c > 16]
    assert later and all(n == min(90 - c, max(2, 8 * 16 // c)) for c, n in later), later
    alone = seq(prompt(3, 90), n=1)
    fed.clear()
    run(e, [alone])  # nothing decodes beside it: full (idle) chunks whatever the context
    full = 8 * e.config.idle_budget_factor
    assert full < 90 and [n for _, _, n in fed] == [min(full, 90 - c) for c in range(0, 90, full)]


@pytest.mark.parametrize("mixed_steps", [True, False])
def test_a_step_is_one_model_call_when_the_model_takes_mixed_batches(request, runner_mode, mixed_steps):
    e = track(request, engine_for(max_num_batched_tokens=8, mixed_steps=mixed_steps))
    calls = []
    forward = e.model.forward
    e.model.forward = lambda x, batch: calls.append(e.num_steps) or forward(x, batch)
    a, b, c = seq(prompt(1, 5), n=10), seq(prompt(2, 30), n=4), seq(prompt(3, 9), n=4)
    run(e, [a])
    run(e, [b, c])
    assert [s.output_ids for s in (a, b, c)] == [reference_tokens(s.prompt_ids, len(s.output_ids)) for s in (a, b, c)]
    per_step = [calls.count(i) for i in sorted(set(calls))]
    if runner_mode and mixed_steps:
        assert per_step == [1] * len(per_step)
    else:  # b and c prefill in the same steps at first: one call each
        assert max(per_step) >= 2


def test_a_reuse_boundary_inside_a_chunk_is_kept_without_cutting_the_chunk(request):
    e = track(request, engine_for(max_num_batched_tokens=64))
    calls = []
    record_chunks(e, lambda s, n, keep: calls.append((n, keep and keep[0])))
    turn1 = Sequence(prompt(5, 20), SamplingParams(max_new_tokens=3, stop_token_ids=[]), reuse_boundary=13)
    run(e, [turn1])
    assert calls == [(20, 13)]  # one pass over the prompt; the state after 13 tokens kept meanwhile
    assert turn1.output_ids == reference_tokens(turn1.prompt_ids, 3)
    calls.clear()
    other_turn = seq(prompt(5, 20)[:13] + [9, 8, 7, 6], n=4)  # same history, a different last turn
    run(e, [other_turn])
    assert other_turn.num_cached == 13 and calls == [(4, None)]
    assert other_turn.output_ids == reference_tokens(other_turn.prompt_ids, 4)


def test_a_snapshot_reserved_for_a_failing_chunk_is_given_back(request):
    model = FakeModel(fail_on_token=77, fail_in="prefill")
    e = track(request, engine_for(model))
    bad = Sequence(prompt(5, 12) + [77, 1, 2], SamplingParams(max_new_tokens=3, stop_token_ids=[]), reuse_boundary=6)
    run(e, [bad])
    assert bad.finish_reason == "error" and len(e.manager.prefix) == 0
    assert e.manager.slots.num_free == e.plan.num_slots


def vision(values):
    return VisionInputs(PLACEHOLDER, torch.tensor(values, dtype=torch.float64), torch.ones(len(values), 2))


def test_prefix_keys_include_the_pixels(request):
    e = track(request, engine_for())
    toks = [1, 2, PLACEHOLDER, PLACEHOLDER, 3, 4]
    a = seq(toks, n=4, vision=[vision([10.0, 20.0])])
    run(e, [a])
    assert a.output_ids == reference_tokens([1, 2, 10, 20, 3, 4], 4)
    same = seq(a.token_ids + [9], n=3, vision=[vision([10.0, 20.0])])
    other = seq(a.token_ids + [9], n=3, vision=[vision([11.0, 20.0])])
    run(e, [same])
    run(e, [other])
    assert same.num_cached > 0 and other.num_cached == 0
    assert other.output_ids == reference_tokens([1, 2, 11, 20, 3, 4] + a.output_ids + [9], 3)
    assert same.output_ids == reference_tokens([1, 2, 10, 20, 3, 4] + a.output_ids + [9], 3)


def test_vision_is_encoded_in_bounded_units_between_decode_steps(request):
    model = FakeModel()
    e = track(request, engine_for(model, encoder_chunk_patches=1, enable_prefix_caching=False))
    runner = seq(prompt(5, 4), n=10)
    e.add(runner)
    e.step()
    pictures = seq([1] + [PLACEHOLDER] * 4 + [2], n=3, vision=[vision([5.0, 6.0, 7.0, 8.0])])
    steps_with_runner_token = []
    run(e, [pictures], lambda engine, outs: steps_with_runner_token.append(any(o.seq is runner for o in outs)))
    assert model.encode_calls == 4  # one unit per step
    assert all(steps_with_runner_token[:4])
    assert pictures.output_ids == reference_tokens([1, 5, 6, 7, 8, 2], 3)


def test_cancelled_sequences_free_their_blocks_and_slots(request):
    e = track(request, engine_for(max_num_batched_tokens=4))
    mid_prefill, decoding, queued = seq(prompt(1, 20)), seq(prompt(2, 3), n=50), seq(prompt(3, 5))
    e.add(decoding)
    e.step()
    e.add(mid_prefill)
    e.step()
    assert 0 < mid_prefill.num_computed < 20
    e.add(queued)
    for s in (mid_prefill, decoding, queued):
        e.abort(s)
        assert s.finish_reason == "abort"
    assert not e.has_work()


def test_a_fault_in_one_request_fails_only_that_request(request):
    model = FakeModel(fail_on_token=55, fail_in="prefill")
    e = track(request, engine_for(model))
    good = [seq(prompt(i, 6), n=8) for i in range(3)]
    bad = seq([1, 55, 2], n=8)
    run(e, good[:1])
    run(e, good[1:] + [bad])
    assert bad.finish_reason == "error" and "injected fault" in str(bad.error)
    assert [s.output_ids for s in good] == [reference_tokens(s.prompt_ids, 8) for s in good]


def test_a_fault_inside_a_batched_decode_is_pinned_on_its_sequence(request):
    model = FakeModel(fail_on_token=None, fail_in="decode")
    e = track(request, engine_for(model))
    seqs = [seq(prompt(i, 5), n=10) for i in range(4)]
    doomed = seqs[2]
    expected = reference_tokens(doomed.prompt_ids, 10)
    model.fail_on_token = expected[3]  # doomed's 4th token, fed back in the decode that follows
    others = [s for s in seqs if s is not doomed]
    # the trigger token appears in no other sequence's input
    assert not any(model.fail_on_token in s.prompt_ids + reference_tokens(s.prompt_ids, 10)[:-1] for s in others)
    run(e, seqs)
    assert doomed.finish_reason == "error" and doomed.output_ids == expected[:4]
    assert [s.output_ids for s in others] == [reference_tokens(s.prompt_ids, 10) for s in others]


def test_sequences_have_identity():
    a, b = seq([1, 2, 3]), seq([1, 2, 3])
    assert a != b and a not in [b] and a in [a]


def test_kv_cache_memory_sizes_parse():
    assert parse_bytes("2GiB") == 2 << 30 and parse_bytes("512M") == 512 << 20 and parse_bytes("1000") == 1000
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_decode_state_is_updated_in_place_per_run_of_slots():
    from minicpmv.state import ForwardBatch, StatePool
    from minicpmv.state.pool import plan_pool

    model = FakeModel()
    pool = StatePool(model.state_spec(), plan_pool(model.state_spec(), 1 << 20, torch.float64, BLOCK, 8),
                     torch.float64, "cpu")
    batch = ForwardBatch(pool, torch.zeros(5, 1, dtype=torch.long), [[0]] * 5, [0] * 5, [0, 1, 3, 4, 7])
    views = batch.recurrent_views(1)
    assert [(r.start, r.stop) for r, _ in views] == [(0, 2), (2, 4), (4, 5)]
    assert all(v.data_ptr() == pool.recurrent[1][s].data_ptr() for (_, v), s in zip(views, (0, 3, 7)))


def test_sequences_take_low_slots_and_snapshots_high_ones():
    from minicpmv.state.alloc import SlotAllocator

    slots = SlotAllocator(6)
    a, b = slots.allocate(), slots.allocate()
    snap = slots.allocate(high=True)
    slots.release(a)
    assert (a, b, snap, slots.allocate()) == (0, 1, 5, 0)
    ahead, low = slots.peek_many(3, high=True), slots.peek_many(9)
    assert ahead == [slots.allocate(high=True) for _ in range(3)] == [4, 3, 2] and low == [2, 3, 4]


def test_idle_writes_the_next_snapshot_slots_once_and_keeps_the_output(request):
    """Engine.idle (the server's engine thread, queue empty) writes the two slots the next prefix
    snapshots take (the highest free) when they were never written: a request with a reuse boundary
    inside its prompt takes two, one at the boundary and one when it ends, and both then copy into
    committed pages. Nothing when the slots were written before or no prefix cache is kept; outputs
    unchanged."""
    e = track(request, engine_for())
    pool, slots = e.manager.pool, e.manager.slots
    top = slots.peek_many(2, high=True)
    assert top == [e.plan.num_slots - 1, e.plan.num_slots - 2] and not any(pool.touched[s] for s in top)
    for s in top:
        pool.recurrent[1][s].fill_(float("nan"))  # whatever an unwritten slot holds
    e.idle()
    for s in top:
        assert pool.touched[s] and torch.equal(pool.recurrent[1][s], torch.zeros_like(pool.recurrent[1][s]))
    assert e.manager.warm_snapshot_slots() == []  # written already
    cold = []
    copy = pool.copy_slot
    pool.copy_slot = lambda src, dst: (cold.append(not pool.touched[dst]), copy(src, dst))
    first = Sequence(prompt(5, 20), SamplingParams(max_new_tokens=4, stop_token_ids=[]), reuse_boundary=13)
    run(e, [first])
    assert first.output_ids == reference_tokens(first.prompt_ids, 4)
    kept = sorted(entry.slot for entry in e.manager.prefix.entries.values() if entry.slot is not None)
    assert kept == sorted(top)  # the boundary's and the end's snapshots took the slots idle wrote
    assert cold == [False]  # the end's snapshot copied into a written slot
    nxt = slots.peek_many(2, high=True)
    assert not any(pool.touched[s] for s in nxt) and e.manager.warm_snapshot_slots() == nxt
    assert all(pool.touched[s] for s in nxt)
    off = track(request, engine_for(enable_prefix_caching=False))
    assert off.manager.warm_snapshot_slots() == []
    assert not any(off.manager.pool.touched)


def test_idle_writes_the_fresh_kv_blocks_the_next_prompts_take_and_nothing_held(request):
    """Engine.idle also writes, once, the never-used KV blocks the next prompts will take (from the
    allocator's high mark, up to 2,048 tokens / 64 MB ahead), so a prompt's first writes land in
    committed pages; blocks a sequence or the prefix cache holds are never written; outputs unchanged."""
    e = track(request, engine_for())
    m, pool = e.manager, e.manager.pool
    ahead = min(2048 // BLOCK, (64 << 20) // m.plan.bytes_per_block, m.plan.num_blocks)
    layer = next(iter(pool.keys))
    pool.keys[layer].fill_(float("nan"))  # whatever unwritten memory holds
    e.idle()
    assert pool.written_blocks == ahead and m.blocks.high == 0
    assert torch.equal(pool.keys[layer][:ahead * BLOCK], torch.zeros_like(pool.keys[layer][:ahead * BLOCK]))
    assert pool.keys[layer][ahead * BLOCK:].isnan().all()
    assert m.warm_blocks() == 0  # nothing new to write
    first = seq(prompt(5, 40), n=4)
    run(e, [first])
    assert first.output_ids == reference_tokens(first.prompt_ids, 4)
    held = sorted({b for entry in m.prefix.entries.values() for b in entry.blocks})
    assert held and m.blocks.high == max(held) + 1
    rows = torch.cat([pool.keys[layer][b * BLOCK:(b + 1) * BLOCK] for b in held])
    assert m.warm_blocks() == min(m.blocks.high + ahead, m.plan.num_blocks) - ahead
    assert torch.equal(torch.cat([pool.keys[layer][b * BLOCK:(b + 1) * BLOCK] for b in held]), rows)
    again = seq(prompt(5, 40), n=4)  # the cached prefix is read back from the held blocks
    run(e, [again])
    assert again.output_ids == first.output_ids
