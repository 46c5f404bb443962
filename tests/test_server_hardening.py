"""A real `minicpmv serve` fed what attackers and sloppy clients send: out-of-range numbers, too much media, wrong
content types, deep JSON, oversized chunked bodies, unknown routes. Each is a 4xx in OpenAI's error shape, naming
the field, before any work; the fields OpenAI clients commonly send are accepted; tool_choice "required" and a
named function are honoured; and afterwards the server still answers a normal request, with memory near idle."""
import json

import httpx
import jsonschema
import openai
import pytest
from PIL import Image

from test_server_support import MODEL_NAME, ServerProcess, image_part, photo, user

LIMIT_FLAGS = ("--limit-mm-per-prompt", '{"image": 3, "video": 1}', "--max-video-frames", "16",
               "--max-request-pixels", "200000", "--max-inflight-pixels", "300000", "--max-request-mb", "0.5")
BODY = {"model": MODEL_NAME, "max_tokens": 3, "messages": user("hi")}


@pytest.fixture(scope="module")
def server(tiny46_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    s = ServerProcess(tiny46_dir, "--max-concurrency", "4", *LIMIT_FLAGS, log_path=log)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local(tiny46_dir):
    import minicpmv

    return minicpmv.load(tiny46_dir, dtype="float32", device="cpu", progress=False)


def raw(obj_text: str) -> bytes:
    """A body with a literal the json module would never write (NaN, 1e400)."""
    return obj_text.encode()


def nested(depth: int) -> bytes:
    return (json.dumps(BODY)[:-1] + ', "metadata": {"x": ' + "[" * depth + "]" * depth + "}}").encode()


def flat(h: int, w: int, shade: int) -> dict:
    """An image part of one colour: many pixels, few bytes (the body limit here is 0.5 MB)."""
    return image_part(Image.new("RGB", (w, h), (shade, 255 - shade, 90)))


def tiny_images(n: int) -> list[dict]:
    return [image_part(photo(8, 8, i)) for i in range(n)]


def bad_inputs():
    """(name, body, extra headers, status, message fragment, param)."""
    big = flat(300, 400, 1)  # 120k pixels
    return [
        ("seed over 64 bits", {**BODY, "seed": 2 ** 64}, {}, 400, "seed", "seed"),
        ("negative seed", {**BODY, "seed": -1}, {}, 400, "seed", "seed"),
        ("seed + n over 64 bits", {**BODY, "seed": 2 ** 64 - 2, "n": 3}, {}, 400, "seed + n - 1", "seed"),
        ("absurd max_tokens", {**BODY, "max_tokens": 1_000_000_000}, {}, 400, "more than the model's context",
         "max_tokens"),
        ("max_tokens written 1e9", raw('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
                                       '"max_tokens": 1e9}'), {}, 400, "max_tokens is 1000000000", "max_tokens"),
        ("max_completion_tokens over the context", {**BODY, "max_completion_tokens": 4097}, {}, 400,
         "context of 4096", "max_completion_tokens"),
        ("negative temperature", {**BODY, "temperature": -0.5}, {}, 400, "temperature", "temperature"),
        ("NaN temperature", raw('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
                                '"temperature": NaN}'), {}, 400, "NaN", None),
        ("infinite top_p", raw('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": 1e400}'),
         {}, 400, "finite", "top_p"),
        ("negative top_k", {**BODY, "top_k": -5}, {}, 400, "top_k", "top_k"),
        ("zero repetition_penalty", {**BODY, "repetition_penalty": 0}, {}, 400, "repetition_penalty",
         "repetition_penalty"),
        ("presence_penalty out of range", {**BODY, "presence_penalty": -3}, {}, 400, "presence_penalty",
         "presence_penalty"),
        ("min_p over 1", {**BODY, "min_p": 1.5}, {}, 400, "min_p", "min_p"),
        ("four images", {**BODY, "messages": user(*tiny_images(4), "hi")}, {}, 400,
         "4 images, over this server's limit of 3", "messages"),
        ("a thousand tiny images", {**BODY, "messages": user(*tiny_images(1000), "hi")}, {}, 400,
         "1000 images", "messages"),
        ("two videos", {**BODY, "messages": user({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AA"}},
                                                 {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AA"}},
                                                 "hi")}, {}, 400, "2 videos", "messages"),
        ("too many frames asked", {**BODY, "max_num_frames": 64}, {}, 400, "max_num_frames is 64", "max_num_frames"),
        ("pixels over the request budget", {**BODY, "messages": user(big, big, "hi")}, {}, 400,
         "240000 pixels, over this server's limit of 200000", None),
        ("a field that changes the answer", {**BODY, "logit_bias": {"11": 100}}, {}, 400, "logit_bias", "logit_bias"),
        ("top_logprobs without logprobs", {**BODY, "top_logprobs": 2}, {}, 400, "top_logprobs", "top_logprobs"),
        ("too many top_logprobs", {**BODY, "logprobs": True, "top_logprobs": 21}, {}, 400, "top_logprobs",
         "top_logprobs"),
        ("tool_choice names an unknown function", {**BODY, "tools": [{"type": "function", "function": {"name": "f"}}],
                                                   "tool_choice": {"type": "function", "function": {"name": "g"}}},
         {}, 400, "'g'", "tool_choice"),
        ("tool_choice required without tools", {**BODY, "tool_choice": "required"}, {}, 400, "needs 'tools'",
         "tool_choice"),
        ("not an image", {**BODY, "messages": user({"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + "QUJD" * 10}}, "hi")}, {}, 400, "not a recognizable image", None),
        ("text/plain body", json.dumps(BODY), {"Content-Type": "text/plain"}, 415, "application/json", None),
        ("form body", json.dumps(BODY), {"Content-Type": "application/x-www-form-urlencoded"}, 415,
         "application/json", None),
        ("JSON nested too deeply for the parser", nested(100_000), {}, 400, "nested too deeply", None),
        ("JSON nested deeper than the limit", nested(80), {}, 400, "nested too deeply", None),
        ("an array body", b"[1, 2]", {}, 400, "must be a JSON object, got an array", None),
    ]


def check_error(response, status, fragment, param, name):
    assert response.status_code == status, (name, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, name
    error = body["error"]
    assert fragment in error["message"], (name, error)
    assert error["type"] == "invalid_request_error", (name, error)
    if param is not None:
        assert error["param"] == param, (name, error)
    for leak in ("object at 0x", "Value error", "Traceback", "pydantic", "<_io"):
        assert leak not in error["message"], (name, error)


def test_bad_inputs_are_refused_and_the_server_keeps_serving(server):
    server.post(BODY)  # warm up, so the memory baseline includes a served request
    idle_rss = server.rss()
    for name, body, headers, status, fragment, param in bad_inputs():
        check_error(server.post(body, headers), status, fragment, param, name)
    # no content type at all
    response = httpx.post(server.base + "/v1/chat/completions", content=json.dumps(BODY).encode(),
                          headers={"Authorization": f"Bearer {server.api_key}"}, timeout=60)
    check_error(response, 415, "application/json", None, "no content type")
    # a chunked body (no Content-Length) is cut off once it passes --max-request-mb 0.5
    sent = []

    def chunks():
        for _ in range(64):
            sent.append(1)
            yield b" " * 65536
    response = httpx.post(server.base + "/v1/chat/completions", content=chunks(), timeout=60,
                          headers={"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"})
    check_error(response, 413, "over the limit of 524288 bytes", None, "chunked body")
    # routes and methods
    for method, path, status in (("GET", "/v1/nothing", 404), ("POST", "/v2/chat", 404),
                                 ("GET", "/v1/chat/completions", 405), ("DELETE", "/v1/models", 405)):
        response = httpx.request(method, server.base + path, timeout=30,
                                 headers={"Authorization": f"Bearer {server.api_key}"})
        check_error(response, status, path, None, f"{method} {path}")
    # a request that reserves pixels and then fails (prompt over the context) gives them back: four of them
    # would hold 4 x 90000 pixels, over the 300000 in flight, if they leaked
    for _ in range(4):
        check_error(server.post({**BODY, "messages": user(flat(300, 300, 2), "lorem ipsum " * 3000)}),
                    400, "context is 4096 tokens", None, "prompt over the context")
    # and after all of it, a normal request is served correctly
    reply = server.client().chat.completions.create(model=MODEL_NAME, messages=user(flat(300, 300, 3),
                                                                                    "still there?"), max_tokens=4)
    assert reply.usage.completion_tokens == 4 and reply.choices[0].finish_reason == "length"
    server.wait_idle()
    assert server.rss() < idle_rss + (96 << 20)  # nothing of the refused requests stays behind


def test_pixels_in_flight_are_bounded_and_released(server):
    body = {"model": MODEL_NAME, "messages": user(flat(400, 400, 4), "Go on."), "max_tokens": 3000,
            "temperature": 0, "stream": True, "ignore_eos": True}  # 160000 pixels each, 300000 in flight
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, headers=headers, timeout=60) as one:
        lines = one.iter_lines()
        next(lines)
        assert one.status_code == 200
        second = server.post({**body, "stream": False, "max_tokens": 2})
        check_error_429 = second.json()["error"]
        assert second.status_code == 429 and "pixels" in check_error_429["message"]
        assert check_error_429["type"] == "rate_limit_error"
    server.wait_idle()
    again = server.post({**body, "stream": False, "max_tokens": 2})
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 2


def test_common_openai_fields_are_accepted(server):
    client = server.client()
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=user("hello"), max_tokens=4, temperature=0.7, seed=3, n=2, user="u-1",
        metadata={"team": "a"}, store=False, parallel_tool_calls=True, logprobs=False, presence_penalty=0.5,
        frequency_penalty=0.25, prompt_cache_key="k", safety_identifier="s-1", service_tier="auto",
        stream_options=None, extra_body={"some_future_field": {"x": 1}, "top_logprobs": 0})
    assert len(reply.choices) == 2 and reply.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=user("hello"), max_tokens=4,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 4


def test_presence_frequency_and_min_p_reach_the_sampler(server, local):
    from minicpmv.server.jobs import build_job
    from minicpmv.server.protocol import ChatCompletionRequest

    client = server.client()
    ask = lambda **kw: client.chat.completions.create(  # noqa: E731
        model=MODEL_NAME, messages=user("Say something."), max_tokens=12, temperature=0, **kw).choices[0].message
    assert ask(presence_penalty=0.0, frequency_penalty=0.0).content == ask().content
    assert ask(presence_penalty=1.5, frequency_penalty=-0.5).content  # accepted and served
    for knobs, expected in (({"presence_penalty": 1.5, "frequency_penalty": -0.5, "min_p": 0.1}, (1.5, -0.5, 0.1)),
                            ({}, (0, 0, 0))):
        chat = ChatCompletionRequest.model_validate({**BODY, "n": 2, **knobs})
        job = build_job(local, chat, chat.messages, None, 10 ** 6)
        assert [(p.presence_penalty, p.frequency_penalty, p.min_p) for p in job.params] == [expected] * 2


WEATHER = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
        "required": ["zone"], "additionalProperties": False}}},
]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_tool_choice_is_honoured_one_shot_and_streamed(server, choice):
    client = server.client()
    kwargs = dict(model=MODEL_NAME, messages=user("Weather in Paris?"), tools=WEATHER, tool_choice=choice,
                  max_tokens=120, temperature=0, parallel_tool_calls=False)
    reply = client.chat.completions.create(**kwargs)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls" and message.tool_calls, message
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in WEATHER}
    for call in message.tool_calls:
        if isinstance(choice, dict):
            assert call.function.name == "get_time"
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    streamed = {}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = streamed.setdefault(delta.index, {"name": delta.function.name, "arguments": ""})
            entry["arguments"] += delta.function.arguments or ""
    assert [(e["name"], e["arguments"]) for _, e in sorted(streamed.items())] == \
        [(c.function.name, c.function.arguments) for c in message.tool_calls]


def test_the_python_api_raises_the_same_errors(local):
    from minicpmv.errors import InputError

    model = local
    msgs = [{"role": "user", "content": "hi"}]
    for kwargs, message in (({"seed": 2 ** 64}, "seed"), ({"seed": -1}, "seed"),
                            ({"temperature": float("nan")}, "temperature"), ({"temperature": -1}, "temperature"),
                            ({"top_p": float("nan")}, "top_p"), ({"repetition_penalty": float("inf")},
                                                                 "repetition_penalty"),
                            ({"max_new_tokens": 10 ** 9}, "max_new_tokens")):
        with pytest.raises(ValueError, match=message):
            model.chat(msgs=msgs, **kwargs)
    with pytest.raises(InputError, match="context of 4096"):
        model.chat(msgs=msgs, max_new_tokens=5000)
    # the edges of the range are fine, and the engine is left clean by the refusals
    assert model.chat(msgs=msgs, max_new_tokens=2, seed=2 ** 64 - 1, do_sample=True).usage["completion_tokens"] == 2
    assert model.chat(msgs=msgs, max_new_tokens=2, seed=0, do_sample=True).usage["completion_tokens"] == 2
    assert not model.engine.has_work()


def test_logprobs_one_shot_and_streamed(server):
    client = server.client()
    kwargs = dict(model=MODEL_NAME, messages=user("Count with me."), max_tokens=6, temperature=0, logprobs=True,
                  top_logprobs=3)
    reply = client.chat.completions.create(**kwargs)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens == 6
    for e in entries:  # greedy, no constraint: the chosen token is the most likely one
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert e.logprob == e.top_logprobs[0].logprob <= 0
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    assert bytes(b for e in entries for b in e.bytes).decode() == reply.choices[0].message.content
    streamed = [e for chunk in client.chat.completions.create(**kwargs, stream=True) if chunk.choices
                for e in ((chunk.choices[0].logprobs.content or []) if chunk.choices[0].logprobs else [])]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in entries]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(streamed, entries)) < 1e-5
    plain = client.chat.completions.create(**{**kwargs, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == reply.choices[0].message.content


def test_error_bodies_for_openai_clients(server):
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(model=MODEL_NAME, messages=user("hi"), seed=2 ** 70)
    assert info.value.body["param"] == "seed" and info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as info:
        server.client().chat.completions.create(model="gpt-9", messages=user("hi"))
    assert info.value.body["type"] == "invalid_request_error" and info.value.body["code"] == "model_not_found"
