"""The web chat page's route, and the API's opt-in for escaped newlines: off by default (the
raw text the model wrote), on per request (`unescape_newlines: true`) or by the server's
--unescape-newlines default, which a request can still turn off. The tiny checkpoint is made to write a fixed text with backslash-n
in prose, inline code and math through constrained decoding (structured_outputs.choice)."""
import json

import pytest
from starlette.testclient import TestClient
from tokenizers import Tokenizer

import minicpmv
from minicpmv.server.app import create_app
from minicpmv.output import OutputDecoder
from minicpmv.server.config import ServeConfig
from tiny46 import FIXTURES

RAW = "one\\ntwo `a\\nb` $\\nabla$\\nend"
SHOWN = "one\ntwo `a\\nb` $\\nabla$\nend"
STOP_IDS = [248044, 248046]


@pytest.fixture(scope="module")
def model(tiny46_dir):
    return minicpmv.load(tiny46_dir, dtype="float32", device="cpu", progress=False)


@pytest.fixture(scope="module")
def plain(model):
    """A server with the defaults but --no-web-chat."""
    with TestClient(create_app(model, ServeConfig(served_model_names=["tiny"], web_chat=False))) as client:
        yield client


@pytest.fixture(scope="module")
def unescaping(model):
    """A server with the page and --unescape-newlines."""
    with TestClient(create_app(model, ServeConfig(served_model_names=["tiny"], unescape_newlines=True))) as client:
        yield client


def ask(client, stream=False, **fields):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "stream": stream,
            "structured_outputs": {"choice": [RAW]}, **fields}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    if not stream:
        return response.json()["choices"][0]["message"]["content"]
    pieces = []
    for line in response.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            pieces += [c["delta"].get("content") or "" for c in json.loads(line[6:])["choices"]]
    return "".join(pieces)


def test_raw_by_default_and_unescaped_on_request(plain):
    client = plain
    assert ask(client) == RAW
    assert ask(client, unescape_newlines=True) == SHOWN
    assert ask(client, stream=True, unescape_newlines=True) == SHOWN
    assert ask(client, stream=True) == RAW
    bad = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                    "unescape_newlines": "sometimes"})
    assert bad.status_code == 400 and "unescape_newlines" in bad.json()["error"]["message"]


def test_server_default_and_request_override(unescaping):
    client = unescaping
    assert ask(client, stream=True) == SHOWN
    assert ask(client, unescape_newlines=False) == RAW


def test_output_decoder_unescapes_reasoning_and_content_not_tool_arguments():
    tokenizer = Tokenizer.from_file(str(FIXTURES / "tokenizer.json"))
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string"}}}}}]
    decoder = OutputDecoder(tokenizer, STOP_IDS, starts_in_reasoning=True, tools=tools, stop=["STOP"],
                            unescape_newlines=True)
    text = ("a\\nb</think>\n\nx\\ny\n<tool_call>\n<function=f>\n<parameter=s>\nq\\nr\n</parameter>\n</function>\n"
            "</tool_call>tail\\STOP never")
    events = []
    for token in tokenizer.encode(text, add_special_tokens=False).ids:
        events += decoder.feed(token)
    events += decoder.finish("stop")
    assert "".join(v for k, v in events if k == "reasoning") == "a\nb"
    assert "".join(v for k, v in events if k == "content") == "x\nytail\\"
    (call,) = [v for k, v in events if k == "tool_call"]
    assert call["function"]["arguments"] == '{"s": "q\\\\nr"}'


def test_web_chat_page_is_served_with_a_strict_policy_or_not_at_all(unescaping, plain):
    r = unescaping.get("/")
    assert r.status_code == 200 and "<title>MiniCPM-V chat</title>" in r.text
    policy = r.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert "http" not in r.text  # nothing loaded from elsewhere
    for asset in ("app.js", "markdown.js", "newlines.js", "style.css"):
        assert unescaping.get(f"/static/{asset}").status_code == 200
    assert plain.get("/").status_code == 404 and plain.get("/static/app.js").status_code == 404  # --no-web-chat
    assert plain.get("/health").status_code == 200
