"""Frame choice and timestamp ids of the 4.0 / 4.5 video recipes.

The expected values are computed here with the model cards' own arithmetic (uniform bin centres, the
packing rule, a scipy cKDTree snap to the 0.1 s grid, int32 truncation), written out independently of
minicpmv.processing.video_v45."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial import cKDTree

from minicpmv.errors import InputError
from minicpmv.processing.processor_v4x import VIDEO_MARKER, ProcessorV4x, VideoFrames
from minicpmv.processing.video_v45 import (encode_video_v40, encode_video_v45, plan_video_v40, plan_video_v45,
                                           snap_to_grid)

torch.set_num_threads(1)

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "golden"


def recipe_v45(n_frames, fps, choose_fps, force_packing=None, max_frames=180, max_packing=3):
    """The 4.5 model card's encode_video, minus the decoding."""
    def centres(seq, n):
        gap = len(seq) / n
        return [seq[int(i * gap + gap / 2)] for i in range(n)]

    duration = n_frames / fps
    if choose_fps * int(duration) <= max_frames:
        packing = 1
        chosen = round(min(choose_fps, round(fps)) * min(max_frames, duration))
    else:
        packing = math.ceil(duration * choose_fps / max_frames)
        if packing <= max_packing:
            chosen = round(duration * choose_fps)
        else:
            chosen = round(max_frames * max_packing)
            packing = max_packing
    idx = np.array(centres(list(range(n_frames)), chosen))
    if force_packing:
        packing = min(force_packing, max_packing)
    scale = np.arange(0, duration, 0.1)
    _, nearest = cKDTree(np.asarray(scale)[:, None]).query(np.asarray(idx / fps)[:, None])
    ts_id = (np.asarray(scale)[nearest] / 0.1).astype(np.int32)
    return idx.tolist(), packing, [ts_id[i:i + packing].tolist() for i in range(0, len(ts_id), packing)]


COMBOS = [  # (frames, fps, choose_fps, force_packing, max_packing)
    (60, 24.0, 5, 3, 3),  # the golden video
    (300, 30.0, 3, None, 3),  # 10 s: one frame per group
    (2700, 30.0, 3, None, 3),  # 90 s: 270 frames in pairs
    (45000, 25.0, 5, None, 3),  # 30 min: capped at 540 frames in triples
    (1200, 60.0, 5, 6, 6),  # 20 s at 60 fps, forced groups of 6
    (4316, 23.976, 5, None, 3),  # NTSC film rate, 180 s -> packing 5 -> capped at 3
    (400, 20.0, 10, None, 3),  # 20 fps: timestamps fall exactly between grid points
    (37, 2.0, 5, None, 3),  # choose_fps above the clip's own rate
]


@pytest.mark.parametrize("frames,fps,choose_fps,force,max_packing", COMBOS)
def test_plan_v45_matches_the_recipe(frames, fps, choose_fps, force, max_packing):
    idx, packing, groups = recipe_v45(frames, fps, choose_fps, force, max_packing=max_packing)
    plan = plan_video_v45(frames, fps, choose_fps, force, max_num_packing=max_packing)
    assert plan.frame_indices == idx
    assert plan.packing == packing
    assert plan.temporal_ids == groups
    assert all(len(g) == packing for g in groups[:-1]) and 1 <= len(groups[-1]) <= packing


def test_golden_recipe_values():
    recipe = json.loads((GOLDEN / "inputs_src" / "video" / "video_recipe.json").read_text())
    plan = plan_video_v45(recipe["n_src_frames"], recipe["fps"], recipe["choose_fps"], recipe["force_packing"])
    assert plan.frame_indices == recipe["frame_idx"]
    assert plan.packing == recipe["packing_nums"]
    assert plan.temporal_ids == recipe["temporal_ids"]


def test_timestamp_ids_are_truncated_not_rounded():
    # 43 frames at 10 fps: frame 43 would sit at 4.3 s, whose grid value 4.3000000000000007 / 0.1 is
    # 42.99999... -> id 42 in the recipe (astype(int32) truncates)
    plan = plan_video_v45(100, 10.0, choose_fps=10)
    stamps = np.arange(0, 10.0, 0.1)
    assert plan.temporal_ids[43] == [int(stamps[43] / 0.1)] == [42]
    assert sum(g[0] != round(i / 10 / 0.1) for i, g in zip(plan.frame_indices, plan.temporal_ids)) > 0


def test_numpy_snap_agrees_with_cKDTree_off_exact_ties(monkeypatch):
    values = np.concatenate([np.arange(3000) / f for f in (23.976, 24, 25, 29.97, 30, 50, 60, 7.3)])
    grid = np.arange(0, values.max() + 0.05, 0.1)
    reference = snap_to_grid(values, grid)
    monkeypatch.setitem(sys.modules, "scipy.spatial", None)  # the fallback path (no scipy)
    fallback = snap_to_grid(values, grid)
    j = np.clip(np.searchsorted(grid, values), 1, len(grid) - 1)
    tie = (values - grid[j - 1]) ** 2 == (grid[j] - values) ** 2
    assert np.array_equal(reference[~tie], fallback[~tie])
    assert tie.sum() < 0.01 * len(values)


@pytest.mark.parametrize("frames,fps", [(300, 30.0), (7200, 30.0), (100, 2.4), (12, 6.0)])
def test_plan_v40_matches_the_recipe(frames, fps):
    step = round(fps)
    idx = list(range(0, frames, step))
    if len(idx) > 64:
        gap = len(idx) / 64
        idx = [idx[int(i * gap + gap / 2)] for i in range(64)]
    assert plan_video_v40(frames, fps).frame_indices == idx


def test_bad_settings():
    with pytest.raises(InputError):
        plan_video_v45(10, 5.0, max_num_packing=7)
    with pytest.raises(InputError):
        plan_video_v45(0, 5.0)
    assert plan_video_v45(1, 30.0).frame_indices == [0]  # shorter than one sampling period: one frame


def write_clip(path: Path, frames: int, fps: int) -> None:
    """Flat frames of brightness 5 * i, stored (nearly) losslessly so each frame can be recognised."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv444p"
        for i in range(frames):
            image = np.full((48, 64, 3), 5 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_decoded_frames_are_the_planned_ones(tmp_path):
    path = tmp_path / "clip.mkv"
    write_clip(path, frames=50, fps=10)
    video = encode_video_v45(path, choose_fps=4, force_packing=2)
    idx, _, groups = recipe_v45(50, 10.0, 4, 2)
    assert video.temporal_ids == groups
    assert len(video.frames) == len(idx) and all(isinstance(f, Image.Image) and f.mode == "RGB" for f in video.frames)
    levels = [float(np.asarray(f).mean()) for f in video.frames]
    assert levels == pytest.approx([5 * i for i in idx], abs=2)
    plain = encode_video_v40(path)
    assert plain.temporal_ids is None
    assert [float(np.asarray(f).mean()) for f in plain.frames] == pytest.approx([0, 50, 100, 150, 200], abs=2)


def test_video_marker_expands_like_the_model_card_frames():
    """A VIDEO_MARKER with frames + timestamp groups gives the golden packed-video prompt."""
    case = GOLDEN / "minicpm-v-4.5" / "c_video_temporal_packing"
    golden = json.loads((case / "golden" / "golden.json").read_text())
    request = json.loads((case / "inputs" / "request.json").read_text())
    frames = [Image.open(case / "inputs" / f).convert("RGB") for f in request["images"]]
    prompt = golden["chat_template_prompt"].replace("\n".join(["(<image>./</image>)"] * 12), VIDEO_MARKER)
    processor = ProcessorV4x.from_folder(GOLDEN / "minicpm-v-4.5" / "model")
    out = processor(prompt, [], [VideoFrames(frames, request["chat_kwargs"]["temporal_ids"])],
                    max_slice_nums=1, use_image_id=False)
    assert out.prompt == golden["expanded_prompt"]
    assert out.input_ids == golden["input_ids"]
    assert out.temporal_ids == golden["temporal_ids_model_input"]
