"""MiniCPM-V 4.7 model parity with transformers 5.23.0 on tiny random checkpoints in the released
layout (dense with an untied head; MoE with per-expert expert tensors, which test_moe47 shows load
to the same weights as the fused 3-D layout, used end to end in test_api47): fp32 logits
within 1e-4 and greedy tokens identical for text, one image, a sliced image (16x, 4x), two images,
multi-turn, video, thinking on and off; and several sequences batched equal each alone.

Ids, pixels and target sizes come from transformers' processor; our canvas positions
(processing/canvas_rope.py) are computed from the ids, so a wrong position fails here too."""
import numpy as np
import pytest
import torch

from minicpmv.engine.engine import Engine
from minicpmv.engine.sampling import SamplingParams
from minicpmv.engine.sequence import Sequence
from minicpmv.engine.prefill import prompt_forward
from minicpmv.loading import load_model
from minicpmv.processing.canvas_rope import CanvasMarkers, canvas_positions, token_types
from test_parity46 import IMAGE_TOKEN, VIDEO_TOKEN, our_vision, picture

N_TOKENS = 12
KINDS = ["dense", "moe"]


@pytest.fixture(scope="module", params=KINDS)
def models(request):
    from transformers import AutoProcessor, MiniCPMV4_7ForConditionalGeneration

    folder = request.getfixturevalue({"dense": "tiny47_dense_dir", "moe": "tiny47_moe_dir"}[request.param])
    ref = MiniCPMV4_7ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    ours, config = load_model(folder, "float32", "cpu", progress=False)
    return ref, ours, AutoProcessor.from_pretrained(folder), config


def ref_inputs(processor, messages, images=None, videos=None, thinking=False, **kwargs):
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         enable_thinking=thinking)
    return processor(text=[text], images=images, videos=videos, return_tensors="pt", **kwargs)


def positions_of(config, ids, inputs, mode):
    sizes = {k: inputs[k].tolist() if k in inputs else [] for k in ("target_sizes", "target_sizes_videos")}
    return canvas_positions(ids, token_types(ids, IMAGE_TOKEN, VIDEO_TOKEN), sizes["target_sizes"],
                            sizes["target_sizes_videos"], 2 if mode == "4x" else 4, CanvasMarkers.from_config(config))


def our_prefill_logits(model, ids, vision, positions):
    feats = {}
    for v in vision:
        feats[v.token_id] = model.encode_vision(v.pixel_values, v.target_sizes, v.downsample_mode)
    hidden, _ = prompt_forward(model, ids, feats, positions=positions)
    return model.logits(hidden[0, -1])


def run(model, requests):
    """requests: [(ids, vision, positions, delta)] -> output ids of each, all in one engine."""
    engine = Engine(model, max_context=4096)
    seqs = [engine.add(Sequence(list(ids), SamplingParams(max_new_tokens=N_TOKENS, do_sample=False), vision,
                                position_ids=pos, rope_delta=delta)) for ids, vision, pos, delta in requests]
    while engine.has_work():
        engine.step()
    return [s.output_ids for s in seqs]


def check(models, inputs, mode="16x"):
    ref, ours, _, config = models
    ids = inputs["input_ids"][0].tolist()
    kwargs = {k: v for k, v in inputs.items() if k != "attention_mask"}
    with torch.no_grad():
        ref_logits = ref(**kwargs, downsample_mode=mode).logits[0, -1]
        ref_tokens = ref.generate(**inputs, downsample_mode=mode, max_new_tokens=N_TOKENS, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        positions, delta = positions_of(config, ids, inputs, mode)
        logits = our_prefill_logits(ours, ids, our_vision(inputs, mode), positions)
    diff = (logits - ref_logits).abs().max().item()
    print(f"max |logit diff| vs transformers: {diff:.2e}")
    assert diff < 1e-4, f"max |logit diff| {diff:.2e}"
    assert len(ref_tokens) == N_TOKENS
    assert run(ours, [(ids, our_vision(inputs, mode), positions, delta)]) == [ref_tokens]
    return ids, our_vision(inputs, mode), positions, delta, ref_tokens


@pytest.mark.parametrize("thinking", [False, True])
def test_text_only(models, thinking):
    msgs = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Name three prime numbers and explain why."}]}]
    check(models, ref_inputs(models[2], msgs, thinking=thinking))


@pytest.mark.parametrize("thinking", [False, True])
def test_one_image(models, thinking):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    check(models, ref_inputs(models[2], msgs, images=[[picture(300, 420, 7)]], thinking=thinking))


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


def test_video(models):
    frames = np.stack([np.asarray(picture(120, 160, 10 + i)) for i in range(24)])
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    inputs = ref_inputs(models[2], msgs, videos=[frames],
                        video_metadata=[{"fps": 8.0, "duration": 3.0, "total_num_frames": 24}],
                        stack_frames=2, max_slice_nums=1)
    assert len(inputs["target_sizes_videos"]) > 2
    check(models, inputs)


def test_batched_equals_alone(models):
    """A text prompt and two image prompts (different rope deltas) decode together in one engine."""
    p = models[2]

    def image_turn(question):
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]

    text = check(models, ref_inputs(p, [{"role": "user", "content": "Count to five."}]))
    one = check(models, ref_inputs(p, image_turn("Hi"), images=[[picture(300, 300, 8)]]))
    two = check(models, ref_inputs(p, image_turn("?"), images=[[picture(200, 640, 9)]]))
    requests = [r[:4] for r in (text, one, two)]
    assert run(models[1], requests) == [r[4] for r in (text, one, two)]


def test_plain_positions_would_fail(models):
    """The canvas matters: 1-D positions on an image prompt move the logits far past the tolerance."""
    ref, ours, processor, config = models
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    inputs = ref_inputs(processor, msgs, images=[[picture(390, 1130, 1)]])
    ids = inputs["input_ids"][0].tolist()
    positions, delta = positions_of(config, ids, inputs, "16x")
    assert delta < 0
    with torch.no_grad():
        ref_logits = ref(**{k: v for k, v in inputs.items() if k != "attention_mask"}).logits[0, -1]
        plain = our_prefill_logits(ours, ids, our_vision(inputs, "16x"), torch.arange(len(ids)).expand(3, -1))
    assert (plain - ref_logits).abs().max().item() > 1e-2
