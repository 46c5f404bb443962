"""Tool-call parsing (4.6 XML and 4.5 JSON bodies); streaming equals one-shot under any chunking."""

import json
import random

import pytest

from minicpmv.prompt import ChatTemplate, ToolCallStreamParser, normalize_messages, parse_tool_calls, split_reasoning
from paths import FIXTURE_46, GOLDEN

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer"},
        "lat": {"type": "number"},
        "metric": {"type": "boolean"},
        "opts": {"type": "object"},
        "tags": {"type": "array"},
        "limit": {"type": ["integer", "null"]},
        "mode": {"anyOf": [{"type": "integer"}, {"type": "boolean"}]},
        "note": {"description": "no type given"},
    }}}},
    {"name": "search", "parameters": {"properties": {"query": {"type": "string"}}}},  # bare function form
]

XML_CALL = (
    "<tool_call>\n<function=get_weather>\n"
    "<parameter=city>\nSan Francisco\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n"
    "<parameter=lat>\n37.77\n</parameter>\n"
    "<parameter=metric>\nTrue\n</parameter>\n"
    '<parameter=opts>\n{"unit": "C", "alerts": [1, 2]}\n</parameter>\n'
    "<parameter=tags>\n['a', 'b']\n</parameter>\n"
    "<parameter=limit>\nnull\n</parameter>\n"
    "<parameter=mode>\nfalse\n</parameter>\n"
    "<parameter=note>\nline one\n\nline <three>\n</parameter>\n"
    "</function>\n</tool_call>"
)
XML_ARGS = {"city": "San Francisco", "days": 3, "lat": 37.77, "metric": True, "opts": {"unit": "C", "alerts": [1, 2]},
            "tags": ["a", "b"], "limit": None, "mode": False, "note": "line one\n\nline <three>"}


def _calls(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_xml_call_with_schema_conversion():
    content, calls = parse_tool_calls("Let me check.\n\n" + XML_CALL, TOOLS)
    assert content == "Let me check."
    assert _calls(calls) == [("get_weather", XML_ARGS)]
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")


def test_without_schema_values_stay_strings():
    _, calls = parse_tool_calls(XML_CALL)
    args = _calls(calls)[0][1]
    assert args["days"] == "3" and args["metric"] == "True" and args["limit"] == "null"


def test_values_that_do_not_fit_the_schema_stay_strings():
    text = ("<tool_call>\n<function=get_weather>\n<parameter=days>\nthree\n</parameter>\n<parameter=metric>\nyes\n"
            "</parameter>\n<parameter=opts>\n[1]\n</parameter>\n<parameter=lat>\nnan\n</parameter>\n</function>\n"
            "</tool_call>")
    assert _calls(parse_tool_calls(text, TOOLS)[1]) == [
        ("get_weather", {"days": "three", "metric": "yes", "opts": "[1]", "lat": "nan"})]


def test_several_calls_and_surrounding_content():
    text = ("I'll do two things.\n<tool_call>\n<function=search>\n<parameter=query>\ncats\n</parameter>\n</function>\n"
            "</tool_call>\n<tool_call>\n<function=search>\n<parameter=query>\ndogs\n</parameter>\n</function>\n"
            "</tool_call>\n")
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "I'll do two things."
    assert _calls(calls) == [("search", {"query": "cats"}), ("search", {"query": "dogs"})]
    assert len({c["id"] for c in calls}) == 2


def test_hermes_json_calls_for_45():
    text = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
            '<tool_call>\n{"name": "search", "arguments": "{\\"query\\": \\"x\\"}"}\n</tool_call>')
    content, calls = parse_tool_calls(text, TOOLS)
    assert content is None
    assert _calls(calls) == [("get_weather", {"city": "Paris", "days": 2}), ("search", {"query": "x"})]


def test_unparsable_call_stays_content_verbatim():
    text = "Before \n<tool_call>\nnot a call\n</tool_call> after"
    assert parse_tool_calls(text) == (text, [])
    text = '<tool_call>{"arguments": {}}</tool_call>'  # JSON without a name
    assert parse_tool_calls(text) == (text, [])


def test_unclosed_call_at_end_is_still_a_call():
    text = "<tool_call>\n<function=search>\n<parameter=query>\nmulti\nline\n</parameter>\n</function>\n"
    assert _calls(parse_tool_calls(text, TOOLS)[1]) == [("search", {"query": "multi\nline"})]
    assert parse_tool_calls("ok <tool_call>\n<func") == ("ok <tool_call>\n<func", [])


def test_plain_content_is_untouched():
    for text in ["Just text.\n", "a < b <tool_ c", "  spaced  ", "中文 ✅ <tool_call"]:
        assert parse_tool_calls(text) == (text, [])


@pytest.mark.parametrize("folder", [str(FIXTURE_46),
                                    str(GOLDEN / "minicpm-v-4.5" / "model")])
def test_round_trip_through_the_chat_template(folder):
    # Whatever the template teaches the model to write for a call, the parser reads back.
    template = ChatTemplate.from_folder(folder)
    args = {"city": "Köln", "days": 5, "metric": False, "opts": {"a": [1, {"b": None}]}, "tags": ["x"],
            "note": "two\nlines"}
    messages = normalize_messages([
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": args}}]},
    ], content_format=template.content_format).messages
    prompt = template.render(messages, tools=TOOLS, add_generation_prompt=False)
    reply = prompt[prompt.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n"):-len("<|im_end|>\n")]
    reasoning, reply = split_reasoning(reply)  # the pipeline: reasoning split first, then tool calls
    content, calls = parse_tool_calls(reply, TOOLS)
    assert reasoning is None and content == "Checking." and _calls(calls) == [("get_weather", args)]


STREAM_CASES = [
    "Let me check.\n\n" + XML_CALL,
    "x\n" + XML_CALL + "\n\n" + XML_CALL + "\nDone. ",
    '<tool_call>\n{"name": "search", "arguments": {"query": "<tool_call> inside"}}\n</tool_call>',
    "Before \n<tool_call>\nnot a call\n</tool_call> after",
    "a < b <tool_ c <tool_call",
    "<tool_call>\n<function=search>\n<parameter=query>\nunclosed\n",
]


@pytest.mark.parametrize("text", STREAM_CASES)
def test_streaming_equals_one_shot(text):
    expected_content, expected_calls = parse_tool_calls(text, TOOLS)
    rng = random.Random(len(text))
    chunkings = [list(text)] + [[text[:i], text[i:]] for i in range(len(text) + 1)]
    for _ in range(30):
        cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(1, 10)))
        chunkings.append([text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])])
    for chunks in chunkings:
        parser = ToolCallStreamParser(TOOLS)
        events = [e for chunk in chunks for e in parser.feed(chunk)] + parser.flush()
        content = "".join(v for k, v in events if k == "content") or None
        assert all(v for k, v in events if k == "content")
        assert content == expected_content, chunks
        assert _calls([v for k, v in events if k == "tool_call"]) == _calls(expected_calls)


def test_partial_open_tag_never_leaks():
    parser = ToolCallStreamParser(TOOLS)
    assert parser.feed("Sure <tool") == [("content", "Sure")]  # the space waits: a call may follow
    [(kind, head)] = parser.feed("_call>\n<function=search>\n")  # the call is announced by name
    assert kind == "tool_call_delta" and head["name"] == "search" and head["index"] == 0
    events = parser.feed("<parameter=query>\nq\n</parameter>\n</function>\n</tool_call>")
    assert [k for k, _ in events] == ["tool_call_delta", "tool_call_delta", "tool_call"]
    assert events[-1][1]["id"] == head["id"] and events[-1][1]["function"]["arguments"] == '{"query": "q"}'
    assert parser.feed("\n\nAfter") == [("content", "After")]
    assert parser.flush() == []
