"""ChatTemplate renders byte-identically to transformers' apply_chat_template(tokenize=False) (the oracle)."""

import json
import shutil
from pathlib import Path

import pytest

from minicpmv.errors import InputError
from minicpmv.prompt import CHATML_TEMPLATE, ChatTemplate, normalize_messages
import paths

import transformers

FIXTURES = paths.FIXTURES
V46 = FIXTURES / "minicpm-v-4.6"
GOLDEN = FIXTURES / "golden"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _hf_tokenizer(folder: Path, tmp: Path):
    # Copy only the tokenizer files: the golden config.json names remote code that is not shipped.
    tmp.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy(folder / name, tmp / name)
    return transformers.PreTrainedTokenizerFast.from_pretrained(tmp)


@pytest.fixture(scope="module")
def v46(tmp_path_factory):
    return ChatTemplate.from_folder(V46), _hf_tokenizer(V46, tmp_path_factory.mktemp("v46"))


@pytest.fixture(scope="module")
def v45(tmp_path_factory):
    folder = GOLDEN / "minicpm-v-4.5" / "model"
    return ChatTemplate.from_folder(folder), _hf_tokenizer(folder, tmp_path_factory.mktemp("v45"))


@pytest.fixture(scope="module")
def v40(tmp_path_factory):
    folder = GOLDEN / "minicpm-v-4.0" / "model"
    return ChatTemplate.from_folder(folder), _hf_tokenizer(folder, tmp_path_factory.mktemp("v40"))


def assert_parity(pair, raw_messages, **kwargs):
    ours, hf = pair
    messages = normalize_messages(raw_messages, content_format=ours.content_format).messages
    add = kwargs.pop("add_generation_prompt", True)
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add, **kwargs)
    got = ours.render(messages, add_generation_prompt=add, **kwargs)
    assert got == expected
    return got


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city — returns °C & <html>-free text",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "城市名"},
                    "days": {"type": "integer"},
                    "metric": {"type": "boolean"},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "filters": {"type": "object"}, "tags": {"type": "array"}},
            },
        },
    },
]

USER_Q = {"role": "user", "content": "What's the weather in Paris and Berlin?"}
TOOL_TURN = [
    USER_Q,
    {
        "role": "assistant",
        "content": "I'll look both up.",
        "reasoning_content": "Two cities, two calls.",
        "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2, "metric": true}'}},
            {"id": "call_2", "type": "function",
             "function": {"name": "search", "arguments": {"query": "Berlin weather", "filters": {"lang": "de"},
                                                         "tags": ["a", "b"]}}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "call_2", "content": "Berlin: 18°C, cloudy"},
]

MULTI_TURN = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "EARLY-REASONING-A"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "<think>\nEARLY-REASONING-B\n</think>\n\n6"},
    {"role": "user", "content": "And 4+4?"},
]


# ---------------------------------------------------------------- 4.6: the real template


def test_v46_system_prompt(v46):
    got = assert_parity(v46, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert got.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


@pytest.mark.parametrize("thinking", [None, True, False])
def test_v46_thinking_switch(v46, thinking):
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    got = assert_parity(v46, [USER_Q], **kwargs)
    assert got.endswith("<think>\n" if thinking else "<think>\n\n</think>\n\n")


def test_v46_multi_turn_drops_earlier_thinking(v46):
    got = assert_parity(v46, MULTI_TURN)
    assert "EARLY-REASONING" not in got
    assert "<|im_start|>assistant\n6<|im_end|>" in got


def test_v46_no_generation_prompt(v46):
    got = assert_parity(v46, MULTI_TURN[:3], add_generation_prompt=False)
    assert got.endswith("<|im_end|>\n")
    assert "EARLY-REASONING-A" in got  # the last assistant turn after the last query keeps its reasoning


def test_v46_tools(v46):
    got = assert_parity(v46, [{"role": "system", "content": "Use tools."}, USER_Q], tools=TOOLS)
    assert '"description": "城市名"' in got and "<html>" in got  # tojson: no ASCII escaping, no HTML escaping
    assert got.count("<tools>") == 1 and "\n\nUse tools.<|im_end|>" in got


def test_v46_tool_calls_and_responses(v46):
    got = assert_parity(v46, TOOL_TURN, tools=TOOLS, enable_thinking=True)
    assert "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>" in got
    assert '<parameter=filters>\n{"lang": "de"}\n</parameter>' in got
    assert "<think>\nTwo cities, two calls.\n</think>" in got  # after the last real query: kept
    assert got.count("<tool_response>") == 2 and got.count("<|im_start|>user") == 2


def test_v46_assistant_tool_call_without_content(v46):
    messages = [USER_Q, {"role": "assistant", "content": None, "tool_calls": TOOL_TURN[1]["tool_calls"][:1]},
                TOOL_TURN[2]]
    assert_parity(v46, messages, tools=TOOLS)


def test_v46_images_and_videos(v46):
    messages = [
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "text", "text": "Compare these"},
            {"type": "image", "image": "/tmp/b.png"},
            {"type": "video", "video": "/tmp/clip.mp4"},
            {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}},
        ]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": ["/not/an/image.png is text here", {"type": "image_url", "image_url": "x.jpg"}]},
    ]
    got = assert_parity(v46, messages)
    assert got.count("<|image_pad|>") == 3 and got.count("<|video_pad|>") == 2


def test_v46_unicode_and_markup_in_content(v46):
    assert_parity(v46, [{"role": "user", "content": "  你好 👋 <b>&amp;</b> {{ not jinja }}  "}])


def test_v46_template_errors_are_input_errors(v46):
    ours, _ = v46
    with pytest.raises(InputError, match="System message cannot contain images"):
        ours.render([{"role": "system", "content": [{"type": "image"}]}, {"role": "user", "content": "x"}])
    with pytest.raises(InputError, match="No user query"):
        ours.render([{"role": "assistant", "content": "x"}])
    with pytest.raises(InputError):
        ours.render([])


def test_v46_special_tokens_and_format(v46):
    ours, hf = v46
    assert ours.special_tokens == hf.special_tokens_map
    assert ours.content_format == "list"


# ---------------------------------------------------------------- 4.5 / 4.0 golden templates


def _golden_cases(version):
    return sorted(p.name for p in (GOLDEN / version).iterdir() if (p / "golden").is_dir())


def _golden_messages(case_dir: Path):
    call = json.loads((case_dir / "golden" / "golden.json").read_text())["chat_call"]
    msgs = [{**m, "content": [{"type": "image", "image": c} if c.startswith("IMG") and c[3:].isdigit() else c
                              for c in m["content"]]} for m in call["msgs"]]
    return msgs, call


@pytest.mark.parametrize("case", _golden_cases("minicpm-v-4.5"))
def test_v45_golden_prompts(v45, case):
    case_dir = GOLDEN / "minicpm-v-4.5" / case
    msgs, call = _golden_messages(case_dir)
    # chat() always passes enable_thinking (default False) to the template.
    got = assert_parity(v45, msgs, enable_thinking=call.get("enable_thinking", False))
    assert got == (case_dir / "golden" / "prompt_chat_template.txt").read_text()


@pytest.mark.parametrize("case", _golden_cases("minicpm-v-4.0"))
def test_v40_golden_prompts(v40, case):
    case_dir = GOLDEN / "minicpm-v-4.0" / case
    msgs, _ = _golden_messages(case_dir)
    got = assert_parity(v40, msgs)
    assert got == (case_dir / "golden" / "prompt_chat_template.txt").read_text()


def test_v45_multi_turn_thinking_and_tools(v45):
    assert "EARLY-REASONING" not in assert_parity(v45, MULTI_TURN, enable_thinking=True)
    got = assert_parity(v45, TOOL_TURN, tools=TOOLS, enable_thinking=False)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2, "metric": true}}' in got
    assert "<think>\nTwo cities, two calls.\n</think>" in got  # 4.5 reads `reasoning`, set by normalize_messages


def test_v40_v45_special_tokens_and_format(v45, v40):
    for ours, hf in (v45, v40):
        assert ours.special_tokens == hf.special_tokens_map
        assert ours.content_format == "string"


# ---------------------------------------------------------------- loading rules


def test_fallback_chatml(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    template = ChatTemplate.from_folder(tmp_path)
    assert template.source == CHATML_TEMPLATE
    got = template.render([{"role": "user", "content": "hi"}])
    assert got == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_named_templates_and_env_options_match_transformers(tmp_path):
    # tokenizer_config with a list of named templates: "tool_use" is picked when tools are given.
    default = "{{ bos_token }}{% for m in messages %}{{ m.content | tojson(indent=2, sort_keys=True) }}{% endfor %}"
    tool_use = (
        "{% generation %}{{ tools | tojson(separators=(',', ':')) }}{% endgeneration %}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}"
        "{{ namespace(a=1).a }}{{ dict(x=2).x }}{{ strftime_now('%Y') | length }}"
    )
    config = {"image_token": "<img>", "eos_token": "</s>",
              "chat_template": [{"name": "default", "template": default}, {"name": "tool_use", "template": tool_use}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    # The legacy map overrides the config and may hold serialized AddedTokens.
    legacy = {"bos_token": {"content": "<s>", "special": True}, "eos_token": "<|im_end|>"}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(legacy))
    shutil.copy(GOLDEN / "minicpm-v-4.0" / "model" / "tokenizer.json", tmp_path / "tokenizer.json")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    ours = ChatTemplate.from_folder(tmp_path)
    messages = [{"role": "user", "content": {"b": "é<>", "a": [1, 2.5, None]}}, {"role": "assistant", "content": "x"}]
    assert ours.special_tokens == hf.special_tokens_map
    assert ours.render(messages) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = hf.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert ours.render(messages, tools=TOOLS) == expected


def test_sandbox_blocks_unsafe_access():
    template = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(InputError, match="unsafe"):
        template.render([{"role": "user", "content": "x"}])
