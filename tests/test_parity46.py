"""MiniCPM-V 4.6 model parity with transformers 5.23.0 (the oracle) on a tiny random checkpoint
in the released layout: fp32 logits within 1e-4 and 20 greedy tokens identical, for text, a
sliced odd-aspect image (16x and 4x), two images, a multi-turn chat and a stack_frames video.

The inputs (ids, pixels, target sizes) come from transformers' own processor and are fed to
both models, so this file tests the model path; preprocessing parity has its own tests."""
import numpy as np
import pytest
import torch
from PIL import Image

from minicpmv.engine.engine import Engine
from minicpmv.engine.sampling import SamplingParams
from minicpmv.engine.sequence import Sequence, VisionInputs
from minicpmv.engine.prefill import prompt_forward
from minicpmv.loading import load_model

IMAGE_TOKEN, VIDEO_TOKEN = 248056, 248057
N_TOKENS = 20


@pytest.fixture(scope="module")
def models(tiny46_dir):
    from transformers import AutoProcessor, MiniCPMV4_6ForConditionalGeneration

    ref = MiniCPMV4_6ForConditionalGeneration.from_pretrained(tiny46_dir, dtype=torch.float32).eval()
    ours, _ = load_model(tiny46_dir, "float32", "cpu", progress=False)
    return ref, ours, AutoProcessor.from_pretrained(tiny46_dir)


def picture(h, w, seed):
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) % 64) * 4], -1)
    return Image.fromarray(np.clip(base + rng.randint(0, 40, (h, w, 3)), 0, 255).astype("uint8"))


def ref_inputs(processor, messages, images=None, videos=None, **kwargs):
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=images, videos=videos, return_tensors="pt", **kwargs)


def our_vision(inputs, mode):
    vision = []
    if "pixel_values" in inputs:
        vision.append(VisionInputs(IMAGE_TOKEN, inputs["pixel_values"], inputs["target_sizes"], mode))
    if "pixel_values_videos" in inputs:
        vision.append(VisionInputs(VIDEO_TOKEN, inputs["pixel_values_videos"], inputs["target_sizes_videos"], mode))
    return vision


def our_prefill_logits(model, ids, vision):
    feats = {}
    for v in vision:
        feats[v.token_id] = model.encode_vision(v.pixel_values, v.target_sizes, v.downsample_mode)
    hidden, _ = prompt_forward(model, ids, feats)
    return model.logits(hidden[0, -1])


def our_greedy(model, ids, vision, n=N_TOKENS):
    engine = Engine(model, max_context=4096)
    seq = engine.add(Sequence(list(ids), SamplingParams(max_new_tokens=n, do_sample=False), vision))
    while engine.has_work():
        engine.step()
    return seq.output_ids


def check(models, inputs, mode="16x"):
    ref, ours, _ = models
    ids = inputs["input_ids"][0].tolist()
    kwargs = {k: v for k, v in inputs.items() if k != "attention_mask"}
    with torch.no_grad():
        ref_logits = ref(**kwargs, downsample_mode=mode).logits[0, -1]
        ref_tokens = ref.generate(**inputs, downsample_mode=mode, max_new_tokens=N_TOKENS, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        logits = our_prefill_logits(ours, ids, our_vision(inputs, mode))
    diff = (logits - ref_logits).abs().max().item()
    print(f"max |logit diff| vs transformers: {diff:.2e}")
    assert diff < 1e-4, f"max |logit diff| {diff:.2e}"
    assert len(ref_tokens) == N_TOKENS
    assert our_greedy(ours, ids, our_vision(inputs, mode)) == ref_tokens
    return diff


def test_text_only(models):
    msgs = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Name three prime numbers and explain why."}]}]
    check(models, ref_inputs(models[2], msgs))


@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_sliced_odd_aspect_image(models, mode):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    inputs = ref_inputs(models[2], msgs, images=[[picture(390, 1130, 1)]], downsample_mode=mode)
    assert len(inputs["target_sizes"]) > 1  # really sliced
    check(models, inputs, mode)


def test_two_images(models):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                         {"type": "text", "text": "Compare the two images."}]}]
    check(models, ref_inputs(models[2], msgs, images=[[picture(600, 400, 2), picture(280, 700, 3)]]))


def test_multi_turn(models):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour dominates?"}]},
            {"role": "assistant", "content": "Mostly blue, with a red gradient."},
            {"role": "user", "content": [{"type": "text", "text": "And in the corners?"}]}]
    check(models, ref_inputs(models[2], msgs, images=[[picture(500, 500, 4)]]))


def test_video_stack_frames(models):
    rng = np.random.RandomState(5)
    frames = np.stack([np.asarray(picture(120, 160, 10 + i)) for i in range(48)])
    frames[:, :20, :20] = rng.randint(0, 255, (48, 1, 1, 3))  # something that moves between frames
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    inputs = ref_inputs(models[2], msgs, videos=[frames],
                        video_metadata=[{"fps": 12.0, "duration": 4.0, "total_num_frames": 48}],
                        stack_frames=3, max_slice_nums=1, use_image_id=False)
    assert len(inputs["target_sizes_videos"]) == 8  # 4 seconds: 4 frames + 4 stacked composites
    check(models, inputs)
