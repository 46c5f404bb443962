"""Every family serves: the golden MiniCPM-V 4.5 checkpoint behind `minicpmv serve`, with 3D video
packing chosen per request and the thinking split, checked against the Python API."""
from pathlib import Path

import pytest

import minicpmv
from test_server_support import MODEL_NAME, ServerProcess, data_url, user, video_bytes

MODEL_45 = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "golden" / "minicpm-v-4.5" / "model"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ServerProcess(MODEL_45, log_path=tmp_path_factory.mktemp("logs") / "server45.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local():
    return minicpmv.load(MODEL_45, dtype="float32", device="cpu", progress=False)


def test_video_packing_per_request(server, local, tmp_path):
    clip = video_bytes(seconds=4, fps=8)
    (tmp_path / "clip.mp4").write_bytes(clip)
    part = {"type": "video_url", "video_url": {"url": data_url(clip, "video/mp4")}}
    client = server.client()
    tokens = {}
    for packing in (1, 3):
        reply = client.chat.completions.create(model=MODEL_NAME, messages=user(part, "What happens?"),
                                               max_tokens=3, temperature=0, extra_body={"fps": 3, "packing": packing})
        prepared = local.prepare([{"role": "user", "content": [{"type": "video", "video": str(tmp_path / "clip.mp4")},
                                                               "What happens?"]}], fps=3, packing=packing)
        assert reply.usage.prompt_tokens == len(prepared.input_ids)
        tokens[packing] = reply.usage.prompt_tokens
    assert tokens[3] < tokens[1]  # packing 3 frames per unit gives the LLM fewer vision tokens


def test_thinking_split_for_45(server, local):
    messages = [{"role": "user", "content": "Think about the number seven."}]
    client = server.client()
    on = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0,
                                        extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    ref = local.chat(msgs=messages, enable_thinking=True, do_sample=False, max_new_tokens=8)
    assert ref.reasoning and on.choices[0].message.reasoning_content == ref.reasoning
    assert (on.choices[0].message.content or "") == str(ref)
    off = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0)
    ref_off = local.chat(msgs=messages, do_sample=False, max_new_tokens=8)
    assert (off.choices[0].message.content or "") == str(ref_off)
    assert "</think>" not in (off.choices[0].message.content or "")
