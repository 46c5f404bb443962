"""One output pipeline for every caller: the Python stream, the one-shot reply and a finished
sequence read back (the batch command's path) give the same text, reasoning, tool calls and
finish reason; stop strings end the answer in the Python API as on the server."""
import json

import pytest

import minicpmv
from minicpmv.chat import _stream_pieces
from minicpmv.engine.sampling import SamplingParams
from minicpmv.engine.sequence import Sequence
from test_tool_calls import TOOLS, XML_ARGS, XML_CALL


@pytest.fixture(scope="module")
def model(tiny46_dir):
    return minicpmv.load(tiny46_dir, dtype="float32", device="cpu", progress=False)


MSGS = [{"role": "user", "content": "Tell me a story about a lighthouse."}]


def test_stop_strings_end_the_answer_in_the_python_api(model):
    full = model.chat(msgs=MSGS, do_sample=False, max_new_tokens=24)
    assert len(full) > 12
    stop = full[6:10]
    cut = model.chat(msgs=MSGS, do_sample=False, max_new_tokens=24, stop=[stop])
    assert cut == full[:full.index(stop)] and cut.finish_reason == "stop"
    assert cut.usage["completion_tokens"] < full.usage["completion_tokens"]
    pieces = list(model.chat(msgs=MSGS, do_sample=False, max_new_tokens=24, stop=[stop], stream=True))
    assert "".join(pieces) == cut and {p.kind for p in pieces} == {"content"}
    assert not model.engine.has_work()  # the stopped sequence was freed


def test_stream_one_shot_and_read_back_agree(model):
    reply = model.chat(msgs=MSGS, do_sample=False, max_new_tokens=16)
    streamed = "".join(model.chat(msgs=MSGS, do_sample=False, max_new_tokens=16, stream=True))
    assert streamed == reply
    prepared = model.prepare(MSGS)
    seq = Sequence(prepared.input_ids, SamplingParams(max_new_tokens=16, stop_token_ids=model.family.stop_token_ids),
                   prepared.vision)
    model.engine.add(seq)
    while model.engine.has_work():
        model.engine.step()
    again = model.reply_for(seq, prepared.starts_in_reasoning)
    assert again == reply and again.raw == reply.raw and again.finish_reason == reply.finish_reason


def test_tool_calls_and_reasoning_from_generated_ids(model):
    text = "I should look it up.</think>\n\nChecking.\n" + XML_CALL
    ids = model.tokenizer.encode(text, add_special_tokens=False).ids + [model.family.stop_token_ids[0]]
    seq = Sequence([1, 2, 3], SamplingParams(max_new_tokens=len(ids)))
    seq.output_ids = list(ids)
    seq.finish_reason = "stop"
    reply = model.reply_for(seq, starts_in_reasoning=True, tools=TOOLS)
    assert reply.reasoning == "I should look it up."
    assert reply.strip() == "Checking."
    assert [json.loads(c["function"]["arguments"]) for c in reply.tool_calls] == [XML_ARGS]
    assert reply.finish_reason == "tool_calls"
    # the Python stream yields the same call as one piece
    decoder = model.output_decoder(True, TOOLS)
    events = [e for t in ids for e in decoder.feed(t)] + decoder.finish("stop")
    calls = [p.tool_call for p in _stream_pieces(iter(events)) if p.kind == "tool_call"]
    assert [c["function"] for c in calls] == [c["function"] for c in reply.tool_calls]  # ids are random
