"""The Python API end to end on a tiny 4.6 checkpoint: the whole pipeline (template, media,
placeholders, engine) against transformers' processor + generate, the reasoning split,
streaming, sampling controls and the errors bad input must raise."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

import minicpmv
from minicpmv.errors import ImageError, PromptTooLongError, VideoError


@pytest.fixture(scope="module")
def model(tiny46_dir):
    return minicpmv.load(tiny46_dir, dtype="float32", device="cpu", progress=False)


def photo(h=390, w=1130, seed=0):
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 255, (h, w, 3)).astype("uint8"))


def test_chat_pipeline_matches_transformers_generate(model, tiny46_dir):
    from transformers import AutoProcessor, MiniCPMV4_6ForConditionalGeneration

    image = photo()
    question = "Describe this image in detail."
    processor = AutoProcessor.from_pretrained(tiny46_dir)
    ref = MiniCPMV4_6ForConditionalGeneration.from_pretrained(tiny46_dir, dtype=torch.float32).eval()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[[image]], return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref_ids = out[0, inputs["input_ids"].shape[1]:].tolist()

    reply = model.chat(msgs=[{"role": "user", "content": [image, question]}], do_sample=False, max_new_tokens=20)
    assert reply.usage["prompt_tokens"] == inputs["input_ids"].shape[1]
    assert reply.raw == model.tokenizer.decode(ref_ids, skip_special_tokens=False)
    assert reply.finish_reason == "length" and reply.usage["completion_tokens"] == 20


def test_openai_style_items_and_image_argument_give_the_same_prompt(model):
    image = photo(200, 300, 1)
    a = model.prepare([{"role": "user", "content": [image, "What is it?"]}])
    b = model.prepare([{"role": "user", "content": [{"type": "image", "image": image},
                                                    {"type": "text", "text": "What is it?"}]}])
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    import base64
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    c = model.prepare([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                    {"type": "text", "text": "What is it?"}]}])
    assert a.input_ids == b.input_ids == c.input_ids
    assert torch.equal(a.vision[0].pixel_values, c.vision[0].pixel_values)


def test_thinking_split_and_stream_equal_the_reply(model):
    msgs = [{"role": "user", "content": "Think about the number seven."}]
    reply = model.chat(msgs=msgs, enable_thinking=True, do_sample=False, max_new_tokens=12)
    # a random model never closes its think block: everything it wrote is reasoning
    assert reply.reasoning is not None and reply.reasoning == reply.raw.strip()
    assert str(reply) == ""
    pieces = list(model.chat(msgs=msgs, enable_thinking=True, do_sample=False, max_new_tokens=12, stream=True))
    assert {p.kind for p in pieces} == {"reasoning"}
    assert "".join(pieces).strip() == reply.reasoning

    off = model.chat(msgs=msgs, do_sample=False, max_new_tokens=12)  # thinking off (template default)
    assert off.reasoning is None and str(off) == off.raw.lstrip()


def test_sampling_is_reproducible_with_a_seed(model):
    msgs = [{"role": "user", "content": "Tell me a story."}]
    a = model.chat(msgs=msgs, do_sample=True, temperature=1.0, top_p=0.9, top_k=50, seed=7, max_new_tokens=10)
    b = model.chat(msgs=msgs, do_sample=True, temperature=1.0, top_p=0.9, top_k=50, seed=7, max_new_tokens=10)
    c = model.chat(msgs=msgs, do_sample=True, temperature=1.0, top_p=0.9, top_k=50, seed=8, max_new_tokens=10)
    assert a.raw == b.raw and a.raw != c.raw


def test_defaults_come_from_the_checkpoint(model):
    params = model.sampling_params()
    assert params.do_sample is True and params.temperature == 0.7 and params.top_k == 0
    assert set(params.stop_token_ids) == {248044, 248046}
    assert model.sampling_params(do_sample=False).do_sample is False


def test_corrupt_image_file_is_a_clear_error(model, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageError, match="broken.png"):
        model.chat(msgs=[{"role": "user", "content": [{"type": "image", "image": str(bad)}, "What is it?"]}],
                   max_new_tokens=2)


def test_zero_byte_video_is_a_clear_error(model, tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match="empty"):
        model.chat(msgs=[{"role": "user", "content": [{"type": "video", "video": str(empty)}, "What happens?"]}],
                   max_new_tokens=2)


def test_image_over_the_pixel_limit_is_a_clear_error(model):
    with pytest.raises(ImageError, match="over the limit"):
        model.chat(msgs=[{"role": "user", "content": [photo(300, 400), "What is it?"]}], max_pixels=100_000,
                   max_new_tokens=2)


def test_prompt_longer_than_the_context_is_a_clear_error(model):
    long_text = "lorem ipsum " * 3000  # > 4096 tokens, the tiny model's context
    with pytest.raises(PromptTooLongError, match="context is 4096 tokens"):
        model.chat(msgs=[{"role": "user", "content": long_text}], max_new_tokens=2)
    # the engine is still usable afterwards
    assert model.chat(msgs=[{"role": "user", "content": "hi"}], do_sample=False, max_new_tokens=2).usage


def test_unknown_option_is_rejected(model):
    with pytest.raises(TypeError, match="max_slice_num"):
        model.chat(msgs=[{"role": "user", "content": "hi"}], max_slice_num=3)


def test_top_k_top_p_sampling_only_draws_allowed_tokens():
    from minicpmv.engine.sampling import SamplingParams, sample_rows

    logits = torch.tensor([5.0, 4.0, 3.0, 0.0, -1.0, 2.9])
    g = torch.Generator().manual_seed(0)

    def draws(params, n=300):
        out = sample_rows(logits.expand(n, -1).clone(), [params] * n, [[]] * n, [[]] * n, [g] + [None] * (n - 1))
        return set(out)

    assert draws(SamplingParams(do_sample=True, top_k=3)) == {0, 1, 2}
    # top_p 0.7 over softmax([5, 4, 3, 2.9, 0, -1]) keeps only the two most likely
    assert draws(SamplingParams(do_sample=True, top_p=0.7)) == {0, 1}
    assert draws(SamplingParams(do_sample=True, top_k=3, top_p=0.7)) == {0, 1}
    # min_p 0.3: only tokens with at least 0.3x the top probability (5.0 and 4.0: e^-1 = 0.37)
    assert draws(SamplingParams(do_sample=True, min_p=0.3)) == {0, 1}
    assert draws(SamplingParams(do_sample=True)) >= {0, 1, 2, 5}
