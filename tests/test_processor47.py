"""MiniCPM-V 4.7 preprocessing against transformers 5.23 (the oracle): token ids, target sizes,
pixels, and canvas M-RoPE position ids and rope_delta (MiniCPMV4_7Model.get_rope_index) for
images (sliced, unsliced, numbered or not, 16x/4x, many slices), videos (never numbered,
stacked frames) and mixtures; plus the family's prepare() end to end."""
import numpy as np
import pytest
import torch
from PIL import Image

from minicpmv.errors import InputError
from minicpmv.processing import Video
from minicpmv.processing.canvas_rope import CanvasMarkers, canvas_positions, grid_linspace, token_types
from minicpmv.processing.processor47 import Processor47

IMAGE_TOKEN, VIDEO_TOKEN = 248056, 248057
TURN = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def image(w, h, seed=0):
    rng = np.random.default_rng(seed + w * 31 + h)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def clip(n, w, h, fps=4.0, seed=0):
    rng = np.random.default_rng(seed)
    return Video.from_frames(rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8), fps)


@pytest.fixture(scope="module")
def setup(tiny47_dense_dir):
    import json

    from transformers import AutoProcessor, MiniCPMV4_7Config, MiniCPMV4_7Model

    config = json.loads((tiny47_dense_dir / "config.json").read_text())
    with torch.device("meta"):
        ref_model = MiniCPMV4_7Model(MiniCPMV4_7Config.from_pretrained(tiny47_dense_dir))
    oracle = AutoProcessor.from_pretrained(tiny47_dense_dir)
    assert type(oracle).__name__ == "MiniCPMV4_7Processor"
    return Processor47.from_pretrained(tiny47_dense_dir), oracle, ref_model, CanvasMarkers.from_config(config)


CASES = {
    "one image": (TURN.format("<|image_pad|>\nWhat is it?"), [(448, 448)], [], {}),
    "sliced wide image": (TURN.format("<|image_pad|>\nRead it."), [(1130, 390)], [], {}),
    "sliced tall image 4x": (TURN.format("<|image_pad|>\nRead it."), [(500, 1400)], [], {"downsample_mode": "4x"}),
    "many slices": (TURN.format("<|image_pad|>x"), [(2000, 1500)], [], {"max_slice_nums": 20}),
    "two images with ids": (TURN.format("<|image_pad|><|image_pad|>\nCompare."), [(600, 400), (280, 700)], [], {}),
    "two images without ids": (TURN.format("<|image_pad|>\n<|image_pad|>\nSame?"), [(900, 600), (300, 300)], [],
                               {"use_image_id": False}),
    "video": (TURN.format("<|video_pad|>\nWhat happens?"), [], [clip(12, 160, 120)], {"max_slice_nums": 1}),
    "video stacked frames": (TURN.format("<|video_pad|>\nWhat happens?"), [], [clip(20, 96, 64, fps=5.0)],
                             {"stack_frames": 2, "max_slice_nums": 1}),
    "sliced video units": (TURN.format("<|video_pad|>?"), [], [clip(6, 640, 480, fps=2.0)], {"max_slice_nums": 2}),
    "image then video": (TURN.format("<|image_pad|> then <|video_pad|>?"), [(700, 500)],
                         [clip(8, 160, 120, seed=3)], {}),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_oracle(setup, case):
    ours, oracle, ref_model, markers = setup
    prompt, image_sizes, videos, kwargs = CASES[case]
    images = [image(w, h, i) for i, (w, h) in enumerate(image_sizes)]
    got = ours(prompt, images, videos, **kwargs)
    ref = oracle(text=[prompt], images=images or None, videos=[v.frames for v in videos] or None,
                 video_metadata=[{"fps": v.meta.fps, "duration": v.meta.duration,
                                  "total_num_frames": v.meta.total_num_frames} for v in videos] or None, **kwargs)
    ids = got.input_ids
    assert ids == ref["input_ids"][0].tolist()
    assert token_types(ids, IMAGE_TOKEN, VIDEO_TOKEN) == ref["mm_token_type_ids"][0].tolist()
    for suffix in ("", "_videos"):
        if f"target_sizes{suffix}" in ref:
            assert torch.equal(getattr(got, f"target_sizes{suffix}"), ref[f"target_sizes{suffix}"])
            assert (getattr(got, f"pixel_values{suffix}") - ref[f"pixel_values{suffix}"]).abs().max() <= 1e-5
    mode = kwargs.get("downsample_mode", "16x")
    positions, delta = canvas_positions(ids, token_types(ids, IMAGE_TOKEN, VIDEO_TOKEN),
                                        got.target_sizes.tolist() if images else [],
                                        got.target_sizes_videos.tolist() if videos else [],
                                        2 if mode == "4x" else 4, markers)
    ref_positions, ref_delta = ref_model.get_rope_index(
        ref["input_ids"], mm_token_type_ids=ref["mm_token_type_ids"], target_sizes=ref.get("target_sizes"),
        target_sizes_videos=ref.get("target_sizes_videos"), downsample_mode=mode)
    assert torch.equal(positions, ref_positions[:, 0])
    assert delta == ref_delta.item() and delta < 0


def test_videos_are_never_numbered(setup):
    ours = setup[0]
    got = ours(TURN.format("<|video_pad|>"), [], [clip(4, 96, 64)], max_slice_nums=1, use_image_id=True)
    assert ours.tokenizer.token_to_id("<image_id>") not in got.input_ids
    numbered = ours(TURN.format("<|image_pad|>"), [image(200, 200)], [], use_image_id=True)
    assert ours.tokenizer.token_to_id("<image_id>") in numbered.input_ids


def test_placeholder_count_mismatch_is_rejected(setup):
    with pytest.raises(InputError, match="placeholder"):
        setup[0](TURN.format("<|image_pad|>"), [image(50, 50), image(60, 60)], [])


def test_worked_example_from_spec():
    """v47.md 4.2: [t, <image>, 4 pads (a 2x2 grid), </image>, t] with ids 10/11, pad 100."""
    markers = CanvasMarkers(10, 11, 12, 13, 14)
    ids = [5, 10, 100, 100, 100, 100, 11, 6]
    pos, delta = canvas_positions(ids, token_types(ids, 100, None), [(8, 8)], [], 4, markers)
    assert pos.tolist() == [[0, 1, 1, 1, 1, 1, 1, 4], [0, 0, 1, 1, 2, 2, 3, 4], [0, 0, 1, 2, 1, 2, 3, 4]]
    assert delta == -3


def test_linspace_rounds_half_to_even():
    assert grid_linspace(10, 7).tolist() == [0, 2, 3, 4, 6, 8, 9]


def test_text_only_prompt_is_plain():
    ids = list(range(7))
    pos, delta = canvas_positions(ids, [0] * 7, [], [], 4, None)
    assert pos.tolist() == [list(range(7))] * 3 and delta == 0


def test_family_prepare(tiny47_dense_dir):
    """Family47.prepare carries the canvas positions of the processed prompt; thinking is a flag."""
    from tokenizers import Tokenizer

    from minicpmv.families import adapter_for
    import json

    config = json.loads((tiny47_dense_dir / "config.json").read_text())
    family = adapter_for(tiny47_dense_dir, config, Tokenizer.from_file(str(tiny47_dense_dir / "tokenizer.json")))
    msgs = [{"role": "user", "content": [image(900, 500, 1), "Describe."]}]
    off = family.prepare(msgs)
    on = family.prepare(msgs, enable_thinking=True)
    assert off.prompt.endswith("<think>\n\n</think>\n\n") and on.prompt.endswith("<think>\n")
    assert on.starts_in_reasoning and not off.starts_in_reasoning
    v = off.vision[0]
    expected, delta = canvas_positions(off.input_ids, token_types(off.input_ids, IMAGE_TOKEN, VIDEO_TOKEN),
                                       v.target_sizes.tolist(), [], 4, CanvasMarkers.from_config(config))
    assert torch.equal(off.position_ids, expected) and off.rope_delta == delta < 0
    text = family.prepare([{"role": "user", "content": "Hi"}])
    assert text.position_ids is None and text.rope_delta == 0
    video = family.prepare([{"role": "user", "content": [{"type": "video", "video": clip(8, 160, 120)}, "What?"]}],
                           max_slice_nums=1, use_image_id=True)
    v = video.vision[0]
    assert v.token_id == VIDEO_TOKEN and len(v.target_sizes) > 1
    assert family.processor.tokenizer.token_to_id("<image_id>") not in video.input_ids
    expected, delta = canvas_positions(video.input_ids, token_types(video.input_ids, IMAGE_TOKEN, VIDEO_TOKEN), [],
                                       v.target_sizes.tolist(), 4, CanvasMarkers.from_config(config))
    assert torch.equal(video.position_ids, expected) and video.rope_delta == delta < 0


def test_sizes_that_do_not_match_the_prompt_are_clear_errors():
    markers = CanvasMarkers(10, 11, 12, 13, 14)
    ids = [5, 10, 100, 100, 100, 100, 11, 6]
    types = token_types(ids, 100, None)
    with pytest.raises(ValueError, match="more vision crops than target sizes"):
        canvas_positions(ids, types, [], [], 4, markers)
    with pytest.raises(ValueError, match="does not match its patch grid"):
        canvas_positions(ids, types, [(8, 12)], [], 4, markers)
    with pytest.raises(ValueError, match="canvas marker ids"):
        canvas_positions(ids, types, [(8, 8)], [], 4, None)
