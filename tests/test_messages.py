"""normalize_messages: model-card and OpenAI inputs -> template-ready messages + media sources in prompt order."""

import json

import numpy as np
import pytest
from PIL import Image

from minicpmv.errors import InputError
from minicpmv.prompt import IMAGE_MARKER, VIDEO_MARKER, ChatTemplate, normalize_messages
import paths

V46 = str(paths.FIXTURE_46)


def test_model_card_style_list_format():
    img = Image.new("RGB", (4, 4))
    out = normalize_messages([{"role": "user", "content": [img, "What is this?"]}])
    assert out.messages == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    assert out.images == [img] and out.videos == []


def test_plain_string_content_is_kept_verbatim():
    out = normalize_messages([{"role": "user", "content": "  hi  "}], content_format="string")
    assert out.messages == [{"role": "user", "content": "  hi  "}]


def test_openai_items_keep_order_per_kind():
    frames = [np.zeros((2, 2, 3), np.uint8)] * 3
    content = [
        {"type": "image_url", "image_url": {"url": "https://a/1.png", "detail": "high"}},
        {"type": "video", "video": "/v/1.mp4"},
        {"type": "text", "text": "compare"},
        {"type": "image_url", "image_url": "data:image/png;base64,AAAA"},
        {"type": "video_url", "video_url": {"url": "https://a/2.mp4"}},
        {"type": "image", "image": b"\x89PNG"},
        {"type": "video", "video": frames},
        {"type": "image", "url": "https://a/3.png"},
        {"image": "/local/4.png"},  # no "type": inferred from the key
        np.zeros((3, 3, 3), np.uint8),
    ]
    out = normalize_messages([{"role": "user", "content": content}])
    assert out.images[:5] == ["https://a/1.png", "data:image/png;base64,AAAA", b"\x89PNG", "https://a/3.png",
                              "/local/4.png"]
    assert len(out.images) == 6 and out.videos[0] == "/v/1.mp4" and out.videos[1] == "https://a/2.mp4"
    assert out.videos[2] is frames
    kinds = [part["type"] for part in out.messages[0]["content"]]
    assert kinds == ["image", "video", "text", "image", "video", "image", "video", "image", "image", "image"]


def test_string_format_uses_markers_joined_by_newline():
    img = Image.new("RGB", (4, 4))
    out = normalize_messages(
        [{"role": "user", "content": [img, {"type": "video", "video": "a.mp4"}, "Describe."]}], content_format="string"
    )
    assert out.messages[0]["content"] == f"{IMAGE_MARKER}\n{VIDEO_MARKER}\nDescribe."


def test_assistant_reasoning_and_tool_calls():
    calls = [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1, "b": "x"}'}},
        {"function": {"name": "g", "arguments": {"k": [1]}}},
        {"name": "h", "arguments": ""},  # flat form, empty arguments
    ]
    out = normalize_messages([
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "reasoning_content": "because", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "42"}]},
    ])
    assistant = out.messages[1]
    assert assistant["content"] == [] and assistant["reasoning_content"] == assistant["reasoning"] == "because"
    assert assistant["tool_calls"] == [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1, "b": "x"}}},
        {"type": "function", "function": {"name": "g", "arguments": {"k": [1]}}},
        {"type": "function", "function": {"name": "h", "arguments": {}}},
    ]
    assert out.messages[2] == {"role": "tool", "content": [{"type": "text", "text": "42"}], "tool_call_id": "c1"}


def test_reasoning_alias_and_developer_role():
    out = normalize_messages([{"role": "developer", "content": "sys"}, {"role": "user", "content": "q"},
                              {"role": "assistant", "content": "a", "reasoning": "r"}], content_format="string")
    assert out.messages[0]["role"] == "system"
    assert out.messages[2]["reasoning_content"] == "r" and out.messages[2]["content"] == "a"


def test_input_is_not_mutated():
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}, "q"]}]
    before = json.dumps(messages)
    normalize_messages(messages)
    assert json.dumps(messages) == before


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty"),
        (["hello"], "must be a dict"),
        ([{"role": "robot", "content": "x"}], "unknown role"),
        ([{"content": "x"}], "unknown role"),
        ([{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}], "unknown content part type"),
        ([{"role": "user", "content": [{"foo": 1}]}], "unknown content part type"),
        ([{"role": "user", "content": [3.5]}], "unsupported content item"),
        ([{"role": "user", "content": [{"type": "text", "text": None}]}], "text part"),
        ([{"role": "user", "content": [{"type": "image"}]}], "needs 'image'"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"uri": "x"}}]}], "URL string"),
        ([{"role": "user", "content": 42}], "string or a list"),
        ([{"role": "user", "content": None}], "needs content"),
        ([{"role": "system", "content": [{"type": "image_url", "image_url": "x"}]}], "system message cannot"),
        ([{"role": "user", "content": "q"}, {"role": "system", "content": "late"}], "only allowed first"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": "{}"}}]}], "function name"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}],
         "not valid JSON"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}],
         "JSON object"),
        ([{"role": "assistant", "content": "", "tool_calls": {"name": "f"}}], "must be a list"),
        ([{"role": "assistant", "content": "x", "reasoning_content": 5}], "reasoning_content must be a string"),
    ],
)
def test_malformed_messages_raise_input_error(messages, match):
    with pytest.raises(InputError, match=match):
        normalize_messages(messages)


def test_normalized_messages_render_with_46_template():
    template = ChatTemplate.from_folder(V46)
    out = normalize_messages(
        [{"role": "user", "content": [Image.new("RGB", (2, 2)), {"type": "video_url", "video_url": {"url": "v"}},
                                      "Describe."]}],
        content_format=template.content_format,
    )
    assert template.render(out.messages) == (
        "<|im_start|>user\n<|image_pad|>\n<|video_pad|>\nDescribe.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
