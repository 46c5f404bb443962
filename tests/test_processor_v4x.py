"""4.0/4.5 slicing and placeholder rules beyond what the golden cases cover."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from minicpmv.errors import InputError, PromptTooLongError, PromptTruncatedWarning
from minicpmv.processing.processor_v4x import IMAGE_MARKER, ProcessorV4x
from minicpmv.processing.slicing_v4x import SliceConfigV4x, slice_image

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "golden"


@pytest.fixture(scope="module")
def processor():
    return ProcessorV4x.from_folder(GOLDEN / "minicpm-v-4.5" / "model")


# the spec's worked examples (max_slice_nums 9): (width, height) -> grid (cols, rows), overview, one slice
@pytest.mark.parametrize("size,grid,overview,cell", [
    ((1920, 1080), (4, 2), (602, 336), (420, 476)),
    ((800, 600), (2, 2), (518, 392), (518, 392)),
    ((448, 448), None, (448, 448), None),
    ((300, 200), None, (546, 364), None),  # small images are upscaled to ~448^2
    ((1000, 3000), (2, 4), (252, 770), (364, 546)),
])
def test_slicing_worked_examples(size, grid, overview, cell):
    crops, got = slice_image(Image.new("RGB", size), SliceConfigV4x())
    assert got == grid and crops[0].size == overview
    if grid is None:
        assert len(crops) == 1
    else:
        assert len(crops) == 1 + grid[0] * grid[1] and {c.size for c in crops[1:]} == {cell}


def test_max_slice_nums_and_image_ids(processor):
    image = Image.new("RGB", (1920, 1080), (200, 10, 10))
    out = processor(f"a {IMAGE_MARKER} b", [image], max_slice_nums=1)
    assert len(out.image_bounds) == 1 and out.prompt.startswith("a <image_id>0</image_id><image>")
    out = processor(f"a {IMAGE_MARKER} b", [image], max_slice_nums=4, use_image_id=False)
    assert "<image_id>" not in out.prompt and len(out.image_bounds) == 4  # overview + 3x1 (closest aspect)
    assert "\n" not in out.prompt
    out = processor(f"a {IMAGE_MARKER} b", [Image.new("RGB", (800, 600))])
    assert len(out.image_bounds) == 5  # overview + 2x2
    assert out.prompt.count("\n") == 1  # grid rows joined by one newline, none after the last


def test_image_ids_count_packed_frames_too(processor):
    """Upstream numbers an image by its marker's position, skipped (packed) frames included."""
    frames = [Image.new("RGB", (64, 48), (i * 40, 0, 0)) for i in range(3)]
    photo = Image.new("RGB", (64, 64))
    prompt = "\n".join([IMAGE_MARKER] * 4) + "\nwhat?"
    out = processor(prompt, frames + [photo], use_image_id=True, max_slice_nums=1,
                    temporal_ids=[[1, 2, 3], [-1]])
    assert out.prompt.count("<image_id>") == 2 and "<image_id>3</image_id>" in out.prompt
    assert out.temporal_ids == [[1, 2, 3], [-1]] and out.target_sizes.shape[0] == 4


def test_max_inp_length_keeps_the_first_tokens_but_never_cuts_an_image(processor):
    image = Image.new("RGB", (100, 100))
    full = processor(f"{IMAGE_MARKER} and then a long tail of text", [image])
    with pytest.warns(PromptTruncatedWarning, match=f"the prompt is {len(full.input_ids)} tokens"):  # never silent
        cut = processor(f"{IMAGE_MARKER} and then a long tail of text", [image], max_inp_length=len(full.input_ids) - 2)
    assert cut.input_ids == full.input_ids[:-2]
    with pytest.raises(PromptTooLongError):
        processor(f"{IMAGE_MARKER} tail", [image], max_inp_length=30)


def test_bad_inputs(processor):
    image = Image.new("RGB", (100, 100))
    with pytest.raises(InputError, match="markers"):
        processor(f"{IMAGE_MARKER}{IMAGE_MARKER}", [image])
    with pytest.raises(InputError, match="reserved"):
        processor(f"{IMAGE_MARKER} <unk> sneaky", [image])
    with pytest.raises(InputError, match="same size"):
        processor(f"{IMAGE_MARKER}{IMAGE_MARKER}", [image, Image.new("RGB", (1000, 1000))], temporal_ids=[[1, 2]])
    with pytest.raises(InputError, match="cover"):
        processor(f"{IMAGE_MARKER}{IMAGE_MARKER}", [image, image], temporal_ids=[[1]])
