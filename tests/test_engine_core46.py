"""The engine core on a real (tiny) 4.6: batched greedy output equals each request run alone
(1, 8 and 32 at once; text, images, sliced images and video of mixed lengths; prompts fed in
small chunks), multi-turn prefix reuse, and a long prompt in bounded memory."""
import resource

import pytest
import torch

import minicpmv
from minicpmv.engine.config import EngineConfig
from minicpmv.engine.engine import Engine
from minicpmv.engine.sequence import Sequence
from test_server_support import photo, video_bytes

N_TOKENS = 8


@pytest.fixture(scope="module")
def model(tiny46_dir):
    return minicpmv.load(tiny46_dir, dtype="float32", device="cpu", progress=False)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    path.write_bytes(video_bytes(seconds=3, fps=4))
    return str(path)


def messages(i: int, clip: str) -> list:
    words = " ".join(["tell me more about it"] * (1 + i % 5))
    kind = i % 4
    if kind == 0:
        content = [f"Request {i}: {words}"]
    elif kind == 1:
        content = [photo(60 + 7 * i, 90 + 5 * i, i), f"What is this? {words}"]
    elif kind == 2:
        content = [photo(300 + i, 900 - i, i), f"Describe the slices. {words}"]  # sliced
    else:
        content = [{"type": "video", "video": clip}, f"What happens? {words}"] if i % 8 == 3 else \
                  [photo(50, 50, i), photo(80, 40, i + 1), f"Compare them. {words}"]
    return [{"role": "user", "content": content}]


def run(model, engine, batch: list) -> list[list[int]]:
    seqs = [Sequence(p.input_ids, model.sampling_params(do_sample=False, max_new_tokens=N_TOKENS), p.vision)
            for p in batch]
    for s in seqs:
        engine.add(s)
    while engine.has_work():
        engine.step()
    assert all(s.finish_reason in ("stop", "length") for s in seqs), [s.error for s in seqs]
    return [s.output_ids for s in seqs]


def fresh_engine(model, **kw) -> Engine:
    return Engine(model.model, EngineConfig(max_context=model.max_context, **kw))


@pytest.fixture(scope="module")
def alone(model, clip):
    """Each request run by itself in an engine with no caches at all."""
    engine = fresh_engine(model, enable_prefix_caching=False, encoder_cache_bytes=0)
    return [run(model, engine, [model.prepare(messages(i, clip))])[0] for i in range(32)]


@pytest.mark.parametrize("n, settings", [(1, {}), (8, {}), (32, {}), (8, {"max_num_batched_tokens": 16}),
                                         (32, {"max_num_seqs": 8, "encoder_chunk_patches": 64})])
def test_batched_greedy_equals_each_alone(model, clip, alone, n, settings):
    engine = fresh_engine(model, **settings)
    got = run(model, engine, [model.prepare(messages(i, clip)) for i in range(n)])
    assert got == alone[:n]
    engine.manager.clear_prefix_cache()
    assert engine.manager.blocks.num_free == engine.plan.num_blocks
    assert engine.manager.slots.num_free == engine.plan.num_slots


def run_one(model, engine, msgs) -> Sequence:
    p = model.prepare(msgs)
    seq = engine.add(Sequence(p.input_ids, model.sampling_params(do_sample=False, max_new_tokens=12), p.vision,
                              reuse_boundary=p.reuse_boundary))
    while engine.has_work():
        engine.step()
    return seq


def test_turn_two_costs_only_its_new_tokens_and_answers_the_same(model):
    image = photo(120, 160, 5)
    warm, cold = fresh_engine(model), fresh_engine(model, enable_prefix_caching=False, encoder_cache_bytes=0)
    turn1 = [{"role": "user", "content": [image, "What is in the picture?"]}]
    first = run_one(model, warm, turn1)
    reply = model.tokenizer.decode(first.output_ids[:-1] if first.finish_reason == "stop" else first.output_ids)
    turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And what colour is it?"}]
    encodes = warm.encoder_cache.misses
    second = run_one(model, warm, turn2)
    assert second.num_cached == first.reuse_boundary  # turn 1's prompt up to its last turn, image included
    # only the reply and the new question are computed
    assert len(second.prompt_ids) - second.num_cached < len(first.prompt_ids) - first.reuse_boundary + 30
    assert warm.encoder_cache.misses == encodes  # the image was not encoded again
    assert second.output_ids == run_one(model, cold, turn2).output_ids


def kept_and_stopped(model):
    """Turn 1's prompt as one chunk that passes its reuse boundary b, and the same prompt stopped at
    b: the DeltaNet states (conv, recurrent) each engine keeps for the b-token prefix, per layer."""
    msgs = [{"role": "user", "content": [photo(70, 90, 3), "What is in the picture?"]},
            {"role": "assistant", "content": "A small picture."}, {"role": "user", "content": "Say more."}]
    p = model.prepare(msgs)
    b = p.reuse_boundary
    kept, ref = fresh_engine(model, max_num_batched_tokens=4096), fresh_engine(model)
    keeps = []
    orig = kept.runner.prefill
    kept.runner.prefill = lambda s, n, keep=None: keeps.append(keep) or orig(s, n, keep)
    for engine, ids, reuse in ((kept, p.input_ids, b), (ref, p.input_ids[:b], None)):
        seq = engine.add(Sequence(ids, model.sampling_params(do_sample=False, max_new_tokens=1), p.vision,
                                  reuse_boundary=reuse))
        while engine.has_work():
            engine.step()
        assert seq.finish_reason == "length", seq.error
    assert [k[0] for k in keeps if k] == [b]  # one chunk, the state kept at offset b
    [a] = [e for e in kept.manager.prefix.entries.values() if e.length == b]
    [r] = [e for e in ref.manager.prefix.entries.values() if e.length == b]
    assert a.key == r.key and a.slot is not None
    return [(kept.pool.conv[layer][a.slot], ref.pool.conv[layer][r.slot], kept.pool.recurrent[layer][a.slot],
             ref.pool.recurrent[layer][r.slot]) for layer in kept.pool.recurrent]


def test_the_state_kept_inside_a_chunk_is_the_state_at_the_boundary(model):
    """The DeltaNet state kept mid-chunk equals that of a prompt that stops at the boundary."""
    for conv_a, conv_r, rec_a, rec_r in kept_and_stopped(model):
        torch.testing.assert_close(conv_a, conv_r, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rec_a, rec_r, rtol=1e-5, atol=1e-6)


def test_the_cpu_plans_prompt_rule_keeps_the_boundarys_state_though_it_works_in_place(tmp_path):
    """The same on a 16-bit CPU plan, whose prompt rule (the extension's, where this CPU has it)
    advances the pool's state in place: what is kept is the state at the boundary, not the one at
    the chunk's end. The two engines' bf16 products see different row counts, so not bit for bit:
    within 1e-3 of each state's scale (one token more of the recurrence moves it by ~1e-1)."""
    from minicpmv.cpu import native
    from minicpmv.cpu.isa import detect
    from tiny46 import build_tiny_46

    fast = minicpmv.load(build_tiny_46(tmp_path, seed=1, dtype=torch.bfloat16), device="cpu", progress=False)
    mixer = fast.model.language_model.layers[0].linear_attn
    assert mixer.native is not None or native.unusable(detect()) is not None  # the extension's rule ran
    for conv_a, conv_r, rec_a, rec_r in kept_and_stopped(fast):
        assert (conv_a - conv_r).abs().max() <= 1e-3 * conv_r.abs().max()
        assert (rec_a - rec_r).abs().max() <= 1e-3 * rec_r.abs().max()


def test_chat_reports_cached_tokens(model):
    msgs = [{"role": "user", "content": [photo(64, 64, 9), "Hello there"]}]
    model.chat(msgs=msgs, do_sample=False, max_new_tokens=4)
    again = model.chat(msgs=msgs, do_sample=False, max_new_tokens=4)
    assert again.usage["cached_tokens"] == model.prepare(msgs).reuse_boundary


def test_a_long_prompt_runs_in_chunks_in_bounded_memory(model):
    n = 32_768
    engine = Engine(model.model, EngineConfig(max_context=n + 64, max_num_batched_tokens=256))  # 1024 when alone
    ids = torch.randint(10, 1000, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from minicpmv.engine.sampling import SamplingParams
    seq = engine.add(Sequence(ids, SamplingParams(max_new_tokens=2)))
    while engine.has_work():
        engine.step()
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    assert seq.finish_reason == "length"
    # the KV of 32k tokens is 8 MB here; a T x T fp32 score matrix alone would be 4 GiB per head
    assert grown < engine.plan.nbytes + (256 << 20), grown
