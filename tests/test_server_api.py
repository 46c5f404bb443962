"""`minicpmv serve` as a client sees it: a real server subprocess on 127.0.0.1 with a tiny 4.6
checkpoint, driven by the official openai client. Answers are checked against the Python API
run in this process on the same checkpoint (same tokens, same usage)."""
import json

import jsonschema
import openai
import pytest

import minicpmv
from test_server_support import (MODEL_NAME, ServerProcess, data_url, image_part, image_url, photo, user,
                                 video_bytes)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    photo(80, 120, 5).save(folder / "allowed.png")
    return folder


@pytest.fixture(scope="module")
def server(tiny46_dir, media_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    s = ServerProcess(tiny46_dir, "--allowed-local-media-path", str(media_dir), "--max-image-pixels", "1000000",
                      "--max-concurrency", "8", "--max-queue", "32", log_path=log)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def local(tiny46_dir):
    return minicpmv.load(tiny46_dir, dtype="float32", device="cpu", progress=False)


def ask(client, messages, **kwargs):
    kwargs.setdefault("max_tokens", 10)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL_NAME, messages=messages, **kwargs)


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]


def test_image_chat_matches_the_python_api_token_for_token(client, local):
    image = photo(200, 300, 1)
    reply = ask(client, user(image_part(image), "What is in this image?"), max_tokens=12)
    ref = local.chat(msgs=[{"role": "user", "content": [image, "What is in this image?"]}], do_sample=False,
                     max_new_tokens=12)
    assert reply.choices[0].message.content == str(ref)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == ref.usage["prompt_tokens"]
    assert reply.usage.completion_tokens == 12 == ref.usage["completion_tokens"]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_two_images(client, local):
    a, b = photo(120, 200, 2), photo(300, 150, 3)
    reply = ask(client, user(image_part(a), image_part(b), "Compare the two images."))
    prepared = local.prepare([{"role": "user", "content": [a, b, "Compare the two images."]}])
    ref = local.chat(msgs=[{"role": "user", "content": [a, b, "Compare the two images."]}], do_sample=False,
                     max_new_tokens=10)
    assert reply.usage.prompt_tokens == len(prepared.input_ids)
    assert reply.choices[0].message.content == str(ref)


def test_video_with_per_request_frame_sampling(client, local, tmp_path):
    clip = video_bytes(seconds=4)
    part = {"type": "video_url", "video_url": {"url": data_url(clip, "video/mp4")}}
    counts = {}
    for options in ({}, {"max_num_frames": 2}, {"max_num_frames": 2, "stack_frames": 2},
                    {"mm_processor_kwargs": {"max_num_frames": 1}}, {"fps": 2}):
        reply = ask(client, user(part, "What happens?"), max_tokens=4, extra_body=options)
        (tmp_path / "clip.mp4").write_bytes(clip)
        flat = {**options.pop("mm_processor_kwargs", {}), **options}
        prepared = local.prepare([{"role": "user", "content": [{"type": "video", "video": str(tmp_path / "clip.mp4")},
                                                               "What happens?"]}], **flat)
        assert reply.usage.prompt_tokens == len(prepared.input_ids), flat
        counts[json.dumps(flat)] = reply.usage.prompt_tokens
    assert len(set(counts.values())) == 5, counts  # every sampling choice changed what the model saw
    # stacking is defined per second: another sampling rate with it is a clear 400
    with pytest.raises(openai.BadRequestError, match="stack_frames"):
        ask(client, user(part, "What happens?"), extra_body={"fps": 4, "stack_frames": 2})


def test_streaming_equals_the_one_shot_answer(client):
    messages = user(image_part(photo(100, 100, 4)), "Describe it.")
    whole = ask(client, messages, max_tokens=12)
    chunks = list(ask(client, messages, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_thinking_is_split_into_reasoning_content(client, local):
    messages = [{"role": "user", "content": "Think about the number seven."}]
    on = {"chat_template_kwargs": {"enable_thinking": True}}
    reply = ask(client, messages, max_tokens=12, extra_body=on)
    ref = local.chat(msgs=messages, enable_thinking=True, do_sample=False, max_new_tokens=12)
    message = reply.choices[0].message
    assert message.reasoning_content == ref.reasoning and message.content == str(ref) == ""
    chunks = list(ask(client, messages, max_tokens=12, stream=True, extra_body=on))
    streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert streamed == ref.reasoning
    off = ask(client, messages, max_tokens=12)
    assert off.choices[0].message.reasoning_content is None and off.choices[0].message.content


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
# The tiny random model would never write a call on its own; a grammar makes it write exactly the
# 4.6 (Qwen3-coder XML) call format, which the server must parse into tool_calls. <tool_call> is a
# special token: the Lark form names it as one.
CALL = ('start: <tool_call> "\\n<function=get_weather>\\n<parameter=city>\\nParis\\n</parameter>\\n'
        '<parameter=days>\\n3\\n</parameter>\\n</function>\\n" </tool_call>')


def test_tool_call_round_trip(client, local):
    messages = user("What is the weather in Paris?")
    forced = {"structured_outputs": {"grammar": CALL}}
    reply = ask(client, messages, tools=WEATHER, max_tokens=60, extra_body=forced)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    assert reply.usage.prompt_tokens == len(local.prepare(messages, tools=WEATHER).input_ids)

    chunks = list(ask(client, messages, tools=WEATHER, max_tokens=60, stream=True, extra_body=forced))
    streamed = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(t.index, t.function.name, json.loads(t.function.arguments)) for t in streamed] == \
        [(0, "get_weather", {"city": "Paris", "days": 3})]

    follow_up = messages + [choice.message.model_dump(exclude_none=True),
                            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21}'}]
    answer = ask(client, follow_up, tools=WEATHER)
    assert answer.usage.prompt_tokens == len(local.prepare(follow_up, tools=WEATHER).input_ids)
    assert answer.choices[0].message.content


def test_json_schema_output_validates(client):
    schema = {"type": "object", "additionalProperties": False, "required": ["animal", "legs", "wild"],
              "properties": {"animal": {"type": "string", "maxLength": 12}, "legs": {"type": "integer", "minimum": 0,
                                                                                    "maximum": 8},
                             "wild": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "animal", "schema": schema}}
    for seed in range(3):
        reply = ask(client, user(image_part(photo(64, 64, seed)), "Describe the animal as JSON."), max_tokens=80,
                    response_format=fmt, temperature=1.0, seed=seed)
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    anything = ask(client, user("Give me JSON."), max_tokens=8, response_format={"type": "json_object"})
    assert anything.choices[0].message.content.startswith("{")


def test_n_choices_and_seeds(client):
    messages = user("Tell me a story.")
    a = ask(client, messages, n=3, temperature=1.0, seed=11, max_tokens=8)
    b = ask(client, messages, n=3, temperature=1.0, seed=11, max_tokens=8)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1  # each choice samples with its own seed
    assert a.usage.completion_tokens == 24


def test_stop_strings_cut_the_answer(client):
    messages = user("Count to ten.")
    full = ask(client, messages, max_tokens=16).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = ask(client, messages, max_tokens=16, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < 16


def test_follow_up_turn_reuses_the_vision_encoding(server, client):
    image = image_part(photo(160, 240, 9))
    first = ask(client, user(image, "What is it?"))
    before = server.metrics()
    turns = user(image, "What is it?") + [{"role": "assistant", "content": first.choices[0].message.content},
                                          {"role": "user", "content": "And its colour?"}]
    ask(client, turns)
    after = server.metrics()
    assert after["minicpmv_encoder_cache_hits_total"] == before["minicpmv_encoder_cache_hits_total"] + 1
    assert after["minicpmv_encoder_cache_misses_total"] == before["minicpmv_encoder_cache_misses_total"]


def test_local_path_inside_the_allowed_folder(client, media_dir):
    for url in (str(media_dir / "allowed.png"), (media_dir / "allowed.png").as_uri()):
        assert ask(client, user({"type": "image_url", "image_url": {"url": url}}, "What is it?")).usage.prompt_tokens


def bad_requests(media_dir):
    big = photo(1000, 1100, 0)  # 1.1 M pixels, over --max-image-pixels 1000000
    body = {"model": MODEL_NAME, "max_tokens": 4}
    return [
        ("malformed JSON", b'{"model": "tiny", "messages": [', {}, 400, "not valid JSON"),
        ("unknown model", {**body, "model": "gpt-9", "messages": user("hi")}, {}, 404, "'gpt-9' does not exist"),
        ("invalid base64", {**body, "messages": user({"type": "image_url", "image_url": {
            "url": "data:image/png;base64,@@@not-base64@@@"}}, "hi")}, {}, 400, "invalid base64"),
        ("not an image", {**body, "messages": user({"type": "image_url", "image_url": {
            "url": data_url(b"just some text, not pixels", "image/png")}}, "hi")}, {}, 400, "not a recognizable image"),
        ("too many pixels", {**body, "messages": user({"type": "image_url", "image_url": {"url": image_url(big)}},
                                                      "hi")}, {}, 400, "over the limit of 1000000 pixels"),
        ("URL with fetching off", {**body, "messages": user({"type": "image_url", "image_url": {
            "url": "http://127.0.0.1:9/cat.png"}}, "hi")}, {}, 400, "--allow-url-fetch"),
        ("path outside the folder", {**body, "messages": user({"type": "image_url", "image_url": {
            "url": str(media_dir / ".." / "secret.png")}}, "hi")}, {}, 400, "outside the allowed media folder"),
        ("file URL outside the folder", {**body, "messages": user({"type": "image_url", "image_url": {
            "url": "file:///etc/passwd"}}, "hi")}, {}, 400, "outside the allowed media folder"),
        ("prompt over the context", {**body, "messages": user("lorem ipsum " * 3000)}, {}, 400,
         "context is 4096 tokens"),
        ("max_tokens 0", {**body, "max_tokens": 0, "messages": user("hi")}, {}, 400, "max_tokens: must be at least 1"),
        ("max_completion_tokens < 0", {**body, "max_completion_tokens": -3, "messages": user("hi")}, {}, 400,
         "max_completion_tokens: must be at least 1"),
        ("wrong API key", {**body, "messages": user("hi")}, {"Authorization": "Bearer nope"}, 401, "invalid or missing"),
        ("unknown field", {**body, "max_slice_num": 3, "messages": user("hi")}, {}, 400, "max_slice_num: unknown field"),
        ("bad role", {**body, "messages": [{"role": "robot", "content": "hi"}]}, {}, 400, "unknown role 'robot'"),
        ("bad JSON schema", {**body, "messages": user("hi"), "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, {}, 400,
         "constraint"),
    ]


def test_bad_requests_get_precise_4xx_and_the_server_keeps_serving(server, media_dir):
    for name, body, headers, status, message in bad_requests(media_dir):
        response = server.post(body, headers)
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert message in error["message"], (name, error)
    ok = server.post({"model": MODEL_NAME, "max_tokens": 3, "messages": user("still there?")})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    assert server.wait_idle()["minicpmv_requests_total{outcome=\"rejected\"}"] >= len(bad_requests(media_dir))


def test_the_openai_client_raises_typed_errors(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client().chat.completions.create(model="nope", messages=user("hi"))
