"""MiniCPM-V 4.6 image preprocessing against transformers 5.23's MiniCPMV4_6Processor (the oracle):
token ids, target sizes and pixel strips for many image shapes, both downsample modes and
several max_slice_nums."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from minicpmv.errors import InputError
from minicpmv.processing import Processor46
from minicpmv.processing.image_slicing import find_best_resize, get_sliced_grid, patchify
from paths import FIXTURE_46

torch.set_num_threads(1)
FIXTURE = str(FIXTURE_46)
PROMPT = "<|im_start|>user\n<|image_pad|>\nDescribe this image.<|im_end|>\n<|im_start|>assistant\n"
PIXEL_TOL = 1e-5


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + width * 7919 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def assert_same(ours_out, ref, prefix=""):
    assert ours_out.input_ids == ref["input_ids"][0].tolist()
    ts, ref_ts = getattr(ours_out, f"target_sizes{prefix}"), ref[f"target_sizes{prefix}"]
    assert ts.dtype == torch.int32 and torch.equal(ts, ref_ts)
    pv, ref_pv = getattr(ours_out, f"pixel_values{prefix}"), ref[f"pixel_values{prefix}"]
    assert pv.dtype == torch.float32 and pv.shape == ref_pv.shape
    diff = (pv - ref_pv).abs().max().item()
    assert diff <= PIXEL_TOL, diff
    return diff


# (width, height): tiny, square, huge, extreme aspect ratios, odd sizes
SIZES = [(1, 1), (2, 3), (20, 20), (448, 448), (700, 500), (4000, 3000), (100, 1500),
         (2000, 500), (5000, 60), (333, 777), (1921, 1079), (449, 449)]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_single_image_matches_oracle(ours, oracle, size, mode):
    image = random_image(*size)
    for max_slice_nums in (None, 1, 2, 36):
        kwargs = {} if max_slice_nums is None else {"max_slice_nums": max_slice_nums}
        got = ours(PROMPT, [image], downsample_mode=mode, **kwargs)
        ref = oracle(text=[PROMPT], images=[image], downsample_mode=mode, **kwargs)
        assert_same(got, ref)
        assert got.num_images == 1 and got.pixel_values_videos is None and got.downsample_mode == mode


@pytest.mark.parametrize("kwargs", [{}, {"use_image_id": False}, {"slice_mode": False}, {"max_slice_nums": 4}])
def test_several_images_with_ids(ours, oracle, kwargs):
    images = [random_image(900, 600, 1), random_image(30, 90, 2), random_image(1500, 1500, 3)]
    prompt = "A <|image_pad|> B <|image_pad|>\nC <|image_pad|> end"
    got = ours(prompt, images, **kwargs)
    assert_same(got, oracle(text=[prompt], images=images, **kwargs))
    assert got.input_ids.count(248078) == 3 and got.num_images == 3  # one <image> per item


def test_non_rgb_modes_match_oracle(ours, oracle):
    rgba = random_image(300, 200).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(300, dtype=np.uint8)[None, :], (200, 1))))
    images = [rgba, random_image(250, 260).convert("L"), random_image(90, 70).convert("P")]
    prompt = "<|image_pad|><|image_pad|><|image_pad|>"
    assert_same(ours(prompt, images), oracle(text=[prompt], images=images))


def test_defaults_come_from_preprocessor_config(tmp_path):
    import transformers
    shutil.copytree(FIXTURE, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    config.update(max_slice_nums=3, downsample_mode="4x", use_image_id=False, scale_resolution=224)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    image = random_image(1200, 800)
    got = Processor46.from_pretrained(tmp_path)(PROMPT, [image])
    assert_same(got, transformers.AutoProcessor.from_pretrained(str(tmp_path))(text=[PROMPT], images=[image]))
    assert 248090 not in got.input_ids  # no <image_id>


def test_spec_examples():
    # grids and crop sizes quoted in the spec (16x mode), checked against our helpers
    assert get_sliced_grid((500, 700), 9, 448) == (1, 2)
    assert get_sliced_grid((1080, 1920), 9, 448) == (2, 4)
    assert get_sliced_grid((300, 300), 9, 448) is None
    assert get_sliced_grid((2000, 500), 9, 448) == (4, 1)
    assert find_best_resize((500, 700), 448, 14, "16x") == (392, 504)  # (28, 36) patches
    assert find_best_resize((100, 1500), 448, 14, "16x", allow_upscale=True) == (112, 1736)  # (8, 124)
    assert find_best_resize((300, 300), 448, 14, "4x", allow_upscale=True) == (448, 448)


def test_placeholder_layout(ours):
    out = ours("<|image_pad|>", [random_image(700, 500)])
    text = ours.tokenizer.decode(out.input_ids, skip_special_tokens=False)
    pad = "<|image_pad|>"
    assert text == ("<image_id>0</image_id><image>" + pad * 63 + "</image>"
                    + ("<slice>" + pad * 70 + "</slice>") * 2)


def test_patch_strip_order():
    crop = torch.arange(3 * 28 * 42, dtype=torch.float32).reshape(3, 28, 42)
    strip = patchify(crop, 14)  # 2 x 3 patches
    assert strip.shape == (3, 14, 6 * 14)
    for i in range(6):
        r, c = divmod(i, 3)
        assert torch.equal(strip[:, :, i * 14:(i + 1) * 14], crop[:, r * 14:(r + 1) * 14, c * 14:(c + 1) * 14])


def test_count_mismatch_raises(ours):
    with pytest.raises(InputError, match=r"1 <\|image_pad\|> placeholder\(s\) but 2 image"):
        ours("<|image_pad|>", [random_image(10, 10), random_image(10, 10)])
    with pytest.raises(InputError, match="0 <\\|video_pad\\|> placeholder"):
        ours("no pads", videos=[object()])
    with pytest.raises(InputError, match="downsample_mode"):
        ours("x", downsample_mode="8x")


def test_text_only(ours, oracle):
    out = ours(PROMPT.replace("<|image_pad|>", ""))
    assert out.pixel_values is None and out.num_images == 0
    assert out.input_ids == oracle(text=[PROMPT.replace("<|image_pad|>", "")])["input_ids"][0].tolist()
