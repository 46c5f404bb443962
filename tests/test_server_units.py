"""The server's parts in-process, without HTTP: the choice decoder (stop strings, reasoning,
tool calls, token counts), the media policy, the request model, the grammar constraint, and the
engine hooks it relies on (encoder cache, logits processors, KV reserve growth)."""
import os

import pytest
import torch
from pydantic import ValidationError
from tokenizers import Tokenizer

import minicpmv
from minicpmv.engine.encoder_cache import EncoderCache
from minicpmv.engine.sequence import Sequence
from minicpmv.errors import InputError
from minicpmv.output import OutputDecoder
from minicpmv.server.constrained import GrammarFactory
from minicpmv.server.media_policy import MediaPolicy
from minicpmv.server.protocol import ChatCompletionRequest
from test_server_support import photo
from tiny46 import FIXTURES

STOP_IDS = [248044, 248046]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(str(FIXTURES / "tokenizer.json"))


def decode_all(decoder, tokenizer, text, reason="stop"):
    events = []
    for token in tokenizer.encode(text, add_special_tokens=False).ids:
        events += decoder.feed(token)
    if not decoder.done:
        events += decoder.finish(reason)
    return events


def joined(events, kind):
    return "".join(v for k, v in events if k == kind)


def test_stop_string_across_tokens_cuts_the_text_and_counts_tokens(tokenizer):
    decoder = OutputDecoder(tokenizer, STOP_IDS, starts_in_reasoning=False, tools=None, stop=["STOP here"])
    events = decode_all(decoder, tokenizer, "Hello world, STOP here and more")
    assert joined(events, "content") == "Hello world, " and decoder.finish_reason == "stop"
    n = len(tokenizer.encode("Hello world, STOP here", add_special_tokens=False).ids)
    assert decoder.num_tokens == n  # tokens after the stop string are not counted
    assert decoder.feed(42) == [] and decoder.num_tokens == n


def test_reasoning_and_tool_calls_are_split(tokenizer):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}}}}]
    decoder = OutputDecoder(tokenizer, STOP_IDS, starts_in_reasoning=True, tools=tools, stop=[])
    text = ("let me think</think>\n\nCalling.\n<tool_call>\n<function=f>\n<parameter=x>\n7\n</parameter>\n"
            "</function>\n</tool_call>")
    events = decode_all(decoder, tokenizer, text)
    assert joined(events, "reasoning") == "let me think" and joined(events, "content") == "Calling."
    (call,) = [v for k, v in events if k == "tool_call"]
    assert call["function"] == {"name": "f", "arguments": '{"x": 7}'} and decoder.finish_reason == "tool_calls"


def test_a_call_inside_an_unclosed_think_block_is_still_a_call(tokenizer):
    """Token by token through the decoder the server runs: the reasoning ends where <tool_call> begins, the
    call streams as its name then argument pieces, and the pieces add up to the finished call."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}, "note": {"type": "string"}}}}}]
    decoder = OutputDecoder(tokenizer, STOP_IDS, starts_in_reasoning=True, tools=tools, stop=[])
    text = ("I need f.\n<tool_call>\n<function=f>\n<parameter=x>\n7\n</parameter>\n<parameter=note>\n"
            "say </tool_call> here\n</parameter>\n</function>\n</tool_call>")
    events = decode_all(decoder, tokenizer, text)
    assert joined(events, "reasoning") == "I need f." and joined(events, "content") == ""
    deltas = [v for k, v in events if k == "tool_call_delta"]
    (call,) = [v for k, v in events if k == "tool_call"]
    assert deltas[0] == {"index": 0, "id": call["id"], "name": "f"}
    assert "".join(d["arguments"] for d in deltas[1:]) == call["function"]["arguments"] == \
        '{"x": 7, "note": "say </tool_call> here"}'
    assert decoder.finish_reason == "tool_calls"


def test_media_policy(tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    photo(10, 10, 0).save(allowed / "ok.png")
    os.symlink("/etc/hostname", allowed / "escape.png")
    policy = MediaPolicy(allowed_local_path=allowed)
    part = lambda url: [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]  # noqa: E731
    assert policy.apply(part(str(allowed / "ok.png")))[0]["content"][0] == {"type": "image",
                                                                             "image": str(allowed / "ok.png")}
    assert policy.apply(part("data:image/png;base64,AAAA"))[0]["content"][0]["image"].startswith("data:")
    for url, message in [(str(allowed / "escape.png"), "outside"), (str(allowed / ".." / "x.png"), "outside"),
                         ("http://127.0.0.1:9/a.png", "--allow-url-fetch"), ("ftp://host/a.png", "scheme 'ftp'")]:
        with pytest.raises(InputError, match=message):
            policy.apply(part(url))
    with pytest.raises(InputError, match="--allowed-local-media-path"):
        MediaPolicy().apply([{"role": "user", "content": [{"type": "video", "video": "/tmp/clip.mp4"}]}])


def test_request_model_checks_and_merges_options():
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    req = ChatCompletionRequest.model_validate({**base, "max_slice_nums": 4, "mm_processor_kwargs": {
        "max_slice_nums": 9, "downsample_mode": "4x", "custom_knob": 1}})
    assert req.media_options() == {"max_slice_nums": 4, "downsample_mode": "4x", "custom_knob": 1}
    assert ChatCompletionRequest.model_validate({**base, "response_format": {"type": "json_object"}}).constraint() \
        == ("json", {"type": "object"})
    choice = ChatCompletionRequest.model_validate({**base, "structured_outputs": {"choice": ["a+", "b"]}})
    assert choice.constraint() == ("regex", r"a\+|b")
    for bad in ({"n": 0}, {"temperature": -1}, {"top_logprobs": 3}, {"tool_choice": "required"}, {"seed": -1},
                {"top_p": float("nan")}, {"logit_bias": {"1": 2}}, {"guided_json": {}},
                {"structured_outputs": {"regex": "a", "choice": ["b"]}}):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate({**base, **bad})
    with pytest.raises(ValidationError, match="downsample_mode"):
        ChatCompletionRequest.model_validate({**base, "downsample_mode": "8x"}).media_options()


def test_grammar_constraint_starts_after_the_reasoning(tokenizer):
    factory = GrammarFactory(tokenizer, STOP_IDS)
    constraint = factory.processor("regex", "yes|no", starts_in_reasoning=True)
    logits = torch.zeros(248320)
    assert torch.equal(constraint([11, 12], logits), logits)  # still thinking: free text
    masked = constraint([11, 12, factory.think_close_id], logits)
    allowed = {tokenizer.decode([i]) for i in torch.nonzero(masked > float("-inf")).flatten().tolist()}
    assert allowed and allowed <= {"y", "ye", "yes", "n", "no"}


def test_encoder_cache_evicts_least_recently_used():
    cache = EncoderCache(max_bytes=3 * 400)
    for key in "abc":
        cache.put(key, torch.zeros(100))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", torch.zeros(100))
    assert cache.get("b") is None and cache.get("a") is not None and cache.nbytes == 1200


@pytest.fixture(scope="module")
def model(tiny46_dir):
    return minicpmv.load(tiny46_dir, dtype="float32", device="cpu", progress=False)


def run(engine, seqs):
    for s in seqs:
        engine.add(s)
    while engine.has_work():
        engine.step()
    return [s.output_ids for s in seqs]


def test_engine_hooks_keep_answers_unchanged(model, monkeypatch):
    """Cached vision encodings, a prompt fed in chunks of 8 tokens with another sequence beside it,
    and a no-op logits processor all give exactly the tokens of the plain path."""
    prepared = model.prepare([{"role": "user", "content": [photo(150, 220, 3), "What is it?"]}])
    params = lambda **kw: model.sampling_params(do_sample=False, max_new_tokens=20, **kw)  # noqa: E731
    seq = lambda p: Sequence(prompt_ids=prepared.input_ids, params=p, vision=list(prepared.vision))  # noqa: E731
    engine = model.engine
    engine.encoder_cache.clear()
    calls = []
    original = model.model.encode_vision
    monkeypatch.setattr(model.model, "encode_vision", lambda *a, **k: calls.append(1) or original(*a, **k))
    plain = run(engine, [seq(params())])
    monkeypatch.setattr(engine.config, "max_num_batched_tokens", 8)  # the prompt in chunks of 8 tokens
    seen = []
    recorder = lambda ids, logits: seen.append(len(ids)) or logits  # noqa: E731
    p = params()
    p.logits_processors.append(recorder)
    again = run(engine, [seq(p), seq(params())])
    assert again == plain * 2
    assert len(calls) == 1  # encoded once, then served from the cache
    assert seen == list(range(20))
