"""`MiniCPMV.chat()` for 4.0 / 4.5 with the FamilyV4x adapter, model-card style, against the goldens'
`chat()` answers: same prompt ids, same 12 greedy tokens, same decoded answer, thinking split."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

from minicpmv.chat import MiniCPMV
from minicpmv.errors import InputError
from minicpmv.families.v4x import FamilyV4x
from minicpmv.loading import load_model
from minicpmv.processing.video_v45 import plan_video_v45

torch.set_num_threads(1)

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "golden"
CASES = [("4.0", "a_single_image_sliced"), ("4.0", "b_two_images"), ("4.5", "a_single_image_sliced"),
         ("4.5", "c_video_temporal_packing"), ("4.5", "d_thinking_true"), ("4.5", "d_thinking_false")]


@lru_cache(maxsize=None)
def chat_model(version: str) -> MiniCPMV:
    folder = GOLDEN / f"minicpm-v-{version}" / "model"
    model, config = load_model(folder, "float32", "cpu", progress=False)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return MiniCPMV(folder, model, config, tokenizer, FamilyV4x(folder, config, tokenizer))


def model_card_call(version: str, name: str):
    case = GOLDEN / f"minicpm-v-{version}" / name
    request = json.loads((case / "inputs" / "request.json").read_text())
    golden = json.loads((case / "golden" / "golden.json").read_text())
    images = [Image.open(case / "inputs" / f).convert("RGB") for f in request["images"]]
    msgs = [{"role": m["role"],
             "content": [images[int(p[3:])] if p.startswith("IMG") and p[3:].isdigit() else p for p in m["content"]]}
            for m in request["msgs"]]
    return msgs, dict(request["chat_kwargs"]), golden


@pytest.mark.parametrize("version,name", CASES, ids=[f"{v}-{n}" for v, n in CASES])
def test_chat_reproduces_the_model_card_answer(version, name):
    model = chat_model(version)
    msgs, kwargs, golden = model_card_call(version, name)
    options = {k: kwargs[k] for k in ("use_image_id", "max_slice_nums", "temporal_ids", "enable_thinking") if k in kwargs}
    prepared = model.prepare(msgs, **options)
    assert prepared.prompt == golden["chat_template_prompt"]
    assert prepared.input_ids == golden["input_ids"]
    reply = model.chat(msgs=msgs, sampling=kwargs["sampling"], do_sample=kwargs["do_sample"],
                       num_beams=kwargs["num_beams"], repetition_penalty=kwargs["repetition_penalty"],
                       max_new_tokens=kwargs["max_new_tokens"], **options)
    assert reply.usage["completion_tokens"] == 12 and reply.finish_reason == "length"
    thinking = kwargs.get("enable_thinking", False)
    # the remote chat() prepends the prefilled "<think>\n" in thinking mode and strips the answer
    assert ("<think>\n" if thinking else "") + reply.raw.strip() == golden["chat_answer"]
    if thinking:  # generation starts inside the open think block: all 12 tokens are reasoning
        assert reply.reasoning is not None and reply == ""
    else:
        assert reply.reasoning is None and reply == reply.raw.lstrip()


def test_stop_tokens_and_sampling_defaults():
    m40, m45 = chat_model("4.0"), chat_model("4.5")
    assert m40.family.stop_token_ids == [2, 1015]  # </s>, <|im_end|>
    assert m45.family.stop_token_ids == [1000, 1002]  # <|endoftext|>, <|im_end|>
    p = m45.sampling_params()
    assert (p.do_sample, p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (True, 0.7, 0.8, 100, 1.03)
    assert m40.sampling_params().repetition_penalty == 1.05
    beams = m40.sampling_params(sampling=False)  # the remote code's beam search (tests/test_beam_search.py)
    assert (beams.do_sample, beams.repetition_penalty, beams.num_beams) == (False, 1.2, 3)


def test_thinking_and_temporal_ids_are_4_5_only():
    msgs = [{"role": "user", "content": "hello"}]
    with pytest.raises(InputError):
        chat_model("4.0").prepare(msgs, enable_thinking=True)
    with pytest.raises(TypeError, match="unknown option"):
        chat_model("4.5").prepare(msgs, stack_frames=2)
    assert chat_model("4.5").prepare(msgs, enable_thinking=True).starts_in_reasoning
    assert not chat_model("4.5").prepare(msgs).starts_in_reasoning


def test_video_message_is_sampled_and_packed(tmp_path):
    path = tmp_path / "clip.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=8)
        stream.width, stream.height, stream.pix_fmt = 56, 42, "yuv444p"
        for i in range(40):  # 5 s
            frame = np.full((42, 56, 3), 6 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    model = chat_model("4.5")
    msgs = [{"role": "user", "content": [{"type": "video", "video": str(path)}, "What happens?"]}]
    prepared = model.prepare(msgs, choose_fps=2, force_packing=3)
    (vision,) = prepared.vision
    expected = plan_video_v45(40, 8.0, choose_fps=2, force_packing=3).temporal_ids
    assert vision.extra["temporal_ids"] == expected and [len(g) for g in expected] == [3, 3, 3, 1]
    assert prepared.input_ids.count(vision.token_id) == 4 * 64  # one unit per group, no slices
    assert "<image_id>" not in model.tokenizer.decode(prepared.input_ids, skip_special_tokens=False)
    # the per-request names the server and vLLM users know are the same knobs
    aliased = model.prepare(msgs, fps=2, packing=3)
    assert aliased.input_ids == prepared.input_ids and aliased.vision[0].extra == vision.extra
    with pytest.raises(InputError, match="disagree"):
        model.prepare(msgs, fps=2, choose_fps=3)
    reply = model.chat(msgs=msgs, choose_fps=2, force_packing=3, sampling=False, max_new_tokens=3)
    assert reply.usage["completion_tokens"] <= 3
    # 4.0: one frame per second, frames are independent images (5 units), no temporal ids
    prepared40 = chat_model("4.0").prepare(msgs)
    (vision40,) = prepared40.vision
    assert vision40.extra == {} and prepared40.input_ids.count(vision40.token_id) == 5 * 64
