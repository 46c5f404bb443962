"""Tool calls the way real clients see them: reasoning that ends where a call begins, values holding tool-call
markup, the recovery forms serving stacks accept, unreadable calls kept as text, and streamed calls (name first,
then argument pieces) equal to the one-shot parse under every split of the deltas."""
import json
import random

import pytest

from minicpmv.prompt import ReasoningStreamParser, ToolCallStreamParser, parse_tool_calls, split_reasoning

TOOLS = [
    {"type": "function", "function": {"name": "run_code", "parameters": {"type": "object", "properties": {
        "code": {"type": "string"}, "timeout": {"type": "number"}, "retries": {"type": "integer"},
        "verbose": {"type": "boolean"}, "env": {"type": "object"}, "args": {"type": "array"},
        "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}]}}}}},
    {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}}}}},
]


def call(name, **params):
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def chunkings(text, seed=0):
    """Every cut into two deltas, one character per delta, and random multi-way cuts."""
    rng = random.Random(seed)
    out = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]
    for _ in range(20):
        cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(2, 12)))
        out.append([text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])])
    return out


def one_shot(text, in_reasoning, tools=TOOLS):
    """The one-shot pipeline (as chat() runs it): reasoning split, then tool calls in the content."""
    reasoning, content = split_reasoning(text, in_reasoning=in_reasoning)
    content, calls = parse_tool_calls(content, tools)
    return reasoning, content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def streamed(chunks, in_reasoning, tools=TOOLS):
    """The streaming pipeline (as the OutputDecoder runs it), rebuilt the way an OpenAI client does."""
    reasoning_parser, tool_parser = ReasoningStreamParser(in_reasoning=in_reasoning), ToolCallStreamParser(tools)
    reasoning, content, calls, whole = [], [], {}, []

    def route(pieces):
        for kind, text in pieces:
            if kind == "reasoning":
                reasoning.append(text)
            else:
                events = tool_parser.feed(text)
                take(events)

    def take(events):
        for kind, value in events:
            if kind == "content":
                assert value
                content.append(value)
            elif kind == "tool_call_delta":
                if "name" in value:  # the first delta of a call: id and name, before any arguments
                    assert value["index"] == len(calls)
                    calls[value["index"]] = [value["name"], "", value["id"]]
                else:
                    calls[value["index"]][1] += value["arguments"]
            else:
                whole.append(value)

    for chunk in chunks:
        route(reasoning_parser.feed(chunk))
    route(reasoning_parser.flush())
    take(tool_parser.flush())
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in whole] == \
        [(i, n, a) for n, a, i in calls.values()]  # the pieces add up to the finished calls
    return "".join(reasoning) or None, "".join(content) or None, [(n, a) for n, a, _ in calls.values()]


def assert_every_split_agrees(text, in_reasoning=False, tools=TOOLS):
    expected = one_shot(text, in_reasoning, tools)
    for chunks in chunkings(text, seed=len(text)):
        assert streamed(chunks, in_reasoning, tools) == expected, chunks
    return expected


def args_of(calls):
    return [(name, json.loads(arguments)) for name, arguments in calls]


# -- reasoning ends where a tool call begins ------------------------------------------------------
def test_an_unclosed_think_block_ends_at_the_tool_call():
    text = "The user wants cats.\nI will search.\n" + call("search", query="cats")
    reasoning, content, calls = assert_every_split_agrees(text, in_reasoning=True)
    assert reasoning == "The user wants cats.\nI will search."
    assert content is None and args_of(calls) == [("search", {"query": "cats"})]


def test_a_model_opened_think_block_also_ends_at_the_call():
    text = "<think>\nplan it\n" + call("search", query="dogs") + "\n"
    reasoning, content, calls = assert_every_split_agrees(text, in_reasoning=False)
    assert reasoning == "plan it" and content is None and args_of(calls) == [("search", {"query": "dogs"})]


def test_a_closed_think_block_then_a_call_is_unchanged():
    text = "why\n</think>\n\nSure.\n" + call("search", query="x")
    reasoning, content, calls = assert_every_split_agrees(text, in_reasoning=True)
    assert (reasoning, content, args_of(calls)) == ("why", "Sure.", [("search", {"query": "x"})])


# -- values that hold tool-call markup --------------------------------------------------------------
MARKUP_VALUES = [
    'print("</tool_call>")',
    "if tag == '</function>':\n    return",
    "s = '<parameter='  # a prefix only",
    "Use <parameter=x> tags like that.",
    "Example:\n" + call("search", query="nested") + "\nend of example",
    "closing tags: </parameter> and more text",
]


@pytest.mark.parametrize("value", MARKUP_VALUES)
def test_string_values_keep_their_markup(value):
    text = "Running it.\n" + call("run_code", code=value, timeout="2.5")
    reasoning, content, calls = assert_every_split_agrees(text)
    assert content == "Running it."
    assert args_of(calls) == [("run_code", {"code": value, "timeout": 2.5})]


def test_two_calls_with_markup_values_stay_two_calls():
    text = call("run_code", code="x = '</tool_call>\\n<tool_call>'") + "\n" + call("search", query="</parameter>")
    _, content, calls = assert_every_split_agrees(text)
    assert content is None
    assert args_of(calls) == [("run_code", {"code": "x = '</tool_call>\\n<tool_call>'"}),
                              ("search", {"query": "</parameter>"})]


# -- typed values --------------------------------------------------------------------------------
def test_values_follow_the_schema():
    text = call("run_code", code="1", timeout="1e-3", retries="3.0", verbose="false",
                env="{'PATH': '/bin', 'DEBUG': True}", args="['-v', 2]", limit="null")
    _, _, calls = assert_every_split_agrees(text)
    assert args_of(calls) == [("run_code", {"code": "1", "timeout": 0.001, "retries": 3, "verbose": False,
                                            "env": {"PATH": "/bin", "DEBUG": True}, "args": ["-v", 2],
                                            "limit": None})]
    _, _, calls = one_shot(call("run_code", retries="2.5", limit="7", timeout="-0.25"), False)
    assert args_of(calls) == [("run_code", {"retries": "2.5", "limit": 7, "timeout": -0.25})]


# -- recovery forms ------------------------------------------------------------------------------
def test_a_function_block_without_the_tool_call_wrapper():
    text = "Let me look.\n<function=search>\n<parameter=query>\nbare\n</parameter>\n</function>\nDone."
    _, content, calls = assert_every_split_agrees(text)
    assert content == "Let me look.Done." and args_of(calls) == [("search", {"query": "bare"})]
    # with a stray closing wrapper, and without </parameter>
    text = "<function=search>\n<parameter=query>\nq\n</function>\n</tool_call>"
    _, content, calls = assert_every_split_agrees(text)
    assert content is None and args_of(calls) == [("search", {"query": "q"})]


def test_json_arguments_inside_a_function_block():
    for text in ('<tool_call>\n<function=run_code>\n{"code": "a </function> b", "retries": 2}\n</function>\n'
                 "</tool_call>", "Sure.\n<function=run_code>{'code': 'x', 'verbose': True}</function>"):
        _, content, calls = assert_every_split_agrees(text)
        assert content in (None, "Sure.") and calls[0][0] == "run_code"
    assert args_of(calls) == [("run_code", {"code": "x", "verbose": True})]
    _, _, calls = one_shot('<tool_call>\n<function=run_code>\n{"code": "a </function> b", "retries": 2}\n'
                           "</function>\n</tool_call>", False)
    assert args_of(calls) == [("run_code", {"code": "a </function> b", "retries": 2})]


def test_a_function_tag_in_prose_is_prose():
    for text in ["Write <function=search> to call it.", "<function=unknown>\n<parameter=a>\n1\n</parameter>\n"
                                                         "</function>", "<function=search> is the tool"]:
        assert assert_every_split_agrees(text)[1:] == (text, [])


def test_quoted_and_namespaced_function_names():
    text = (call('"search"', query="q") + "\n" + '<tool_call>\n{"name": "functions.run_code", "arguments": {}}\n'
            "</tool_call>\n" + call("functions.search", query="r"))
    _, content, calls = assert_every_split_agrees(text)
    assert content is None
    assert args_of(calls) == [("search", {"query": "q"}), ("run_code", {}), ("search", {"query": "r"})]


def test_python_dict_bodies_and_arguments():
    text = ("<tool_call>\n{'name': 'run_code', 'arguments': {'code': 'x', 'verbose': True, 'limit': None}}\n"
            "</tool_call>\n<tool_call>\n{\"name\": \"search\", \"arguments\": \"{'query': 'py'}\"}\n</tool_call>")
    _, content, calls = assert_every_split_agrees(text)
    assert content is None
    assert args_of(calls) == [("run_code", {"code": "x", "verbose": True, "limit": None}),
                              ("search", {"query": "py"})]


def test_a_json_string_holding_the_closing_tag():
    text = '<tool_call>\n{"name": "search", "arguments": {"query": "a </tool_call> b"}}\n</tool_call>'
    _, content, calls = assert_every_split_agrees(text)
    assert content is None and args_of(calls) == [("search", {"query": "a </tool_call> b"})]


@pytest.mark.parametrize("text", [
    "<tool_call>\nnot a call\n</tool_call>",
    '<tool_call>\n{"name": "search", "arguments": [1, 2]}\n</tool_call>',
    '<tool_call>\n{"name": "search", "arguments": {"query": "x"}} trailing\n</tool_call>',
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "</function>\n</tool_call>",  # the template's own example, echoed: not a tool of this request
    '<tool_call>\n{"name": "no_such_tool", "arguments": {}}\n</tool_call>',
    "<tool_call>\n<function=search\n<parameter=query>\nq\n</parameter>\n</tool_call>",
])
def test_malformed_calls_become_text_verbatim(text):
    reasoning, content, calls = assert_every_split_agrees("Before.\n" + text + "\nAfter.")
    assert content == "Before.\n" + text + "\nAfter." and calls == []


def test_a_good_call_after_a_malformed_one_is_kept():
    bad = "<tool_call>\nnot a call\n</tool_call>"
    _, content, calls = assert_every_split_agrees(bad + "\n" + call("search", query="ok"))
    assert content == bad and args_of(calls) == [("search", {"query": "ok"})]


def test_a_call_cut_off_by_the_token_limit_keeps_its_finished_parameters():
    text = "<tool_call>\n<function=run_code>\n<parameter=retries>\n4\n</parameter>\n<parameter=code>\nprint(1"
    _, content, calls = assert_every_split_agrees(text)
    assert content is None and args_of(calls) == [("run_code", {"retries": 4, "code": "print(1"})]


# -- the streamed shape ----------------------------------------------------------------------------
def test_streamed_arguments_arrive_per_parameter_after_the_name():
    parser = ToolCallStreamParser(TOOLS)
    text = call("run_code", code="a", retries="2")
    cut = text.index("<parameter=retries>") + len("<parameter=retries>\n")  # `code` is over once this is seen
    first = parser.feed(text[:cut])
    assert [e[1].get("name") for e in first] == ["run_code", None]
    assert first[1][1]["arguments"] == '{"code": "a"'
    middle = "2\n</parameter>\n"
    assert text[cut:].startswith(middle) and parser.feed(middle) == []  # `retries` may go on: nothing yet
    rest = parser.feed(text[cut + len(middle):]) + parser.flush()
    assert [e[1]["arguments"] for e in rest if e[0] == "tool_call_delta"] == [', "retries": 2', "}"]
    assert rest[-1][1]["function"]["arguments"] == '{"code": "a", "retries": 2}'


def test_a_call_without_parameters_streams_empty_arguments():
    _, _, calls = assert_every_split_agrees("<tool_call>\n<function=search>\n</function>\n</tool_call>")
    assert calls == [("search", "{}")]


FRAGMENTS = ["<tool_call>", "</tool_call>", "<tool_call>\n", "<function=search>", "<function=run_code>\n",
             "<function=bad>\n", "</function>", "<parameter=query>\n", "<parameter=retries>\n", "<parameter=code>\n",
             "</parameter>", "\n", " ", "x", "3", "<", ">", "{", "}", '"', "'", "=", "hello", "<think>", "</think>",
             '{"name": "search", "arguments": {"query": "a"}}']


def test_random_markup_streams_as_it_parses_and_loses_nothing():
    """Seeded soup of tags and text: streaming under random cuts equals the one-shot parse, every call's
    arguments are JSON, and when no call is found the content is the text, verbatim."""
    rng = random.Random(13)
    for _ in range(400):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 14)))
        for in_reasoning in (False, True):
            expected = one_shot(text, in_reasoning)
            for _ in range(2):
                cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(1, 6)))
                assert streamed([text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])], in_reasoning) == expected
            assert all(isinstance(json.loads(arguments), dict) for _, arguments in expected[2])
        content, calls = parse_tool_calls(text, TOOLS)
        assert calls or (content or "") == text


def test_a_long_value_is_scanned_once_not_once_per_delta(monkeypatch):
    """20k characters of HTML in a string value, streamed 4 characters at a time: each '<' is looked at a
    bounded number of times in all (rescanning the value on every delta made this quadratic)."""
    from minicpmv.prompt import tool_call_scan

    looks = []
    original = tool_call_scan.CallScan._tag_at
    monkeypatch.setattr(tool_call_scan.CallScan, "_tag_at", lambda self, lt: looks.append(lt) or original(self, lt))
    code = "".join(f"<div class='r{i}'>{i} < {i + 1}</div>\n" for i in range(600))
    text = call("run_code", code=code)
    _, content, calls = streamed([text[i:i + 4] for i in range(0, len(text), 4)], False)
    assert content is None and args_of(calls) == [("run_code", {"code": code})]
    assert len(looks) < 3 * text.count("<")
