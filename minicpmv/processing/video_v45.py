"""Which frames MiniCPM-V 4.0 / 4.5 look at, following their model cards' `encode_video` recipes.

4.5 ("3D" packing): sample about `choose_fps` frames per second (at most MAX_NUM_FRAMES * packing),
give each a timestamp id in 0.1 s units, and group consecutive frames by `packing` (1..6): the
resampler turns each group into 64 tokens. Timestamps are snapped to the 0.1 s grid
numpy.arange(0, duration, 0.1) and then divided by 0.1 and truncated to int32, exactly as the recipe
does, so float error makes e.g. the grid value 4.3 s id 42, not 43 (kept on purpose: the model was
trained with these ids).

4.0: one frame per second (step = round(fps)), spread uniformly down to 64 frames; no timestamps.

Frames are decoded with PyAV (media.load_video, which decodes only the chosen frames) where the recipes
use decord; frame numbers count decoded frames from the start in both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import InputError
from .media import load_video
from .processor_v4x import VideoFrames

MAX_NUM_FRAMES_V45 = 180  # frames after packing, i.e. resampler groups
MAX_NUM_PACKING_V45 = 3  # the model card's default; the 3D resampler was trained with 1..6
TIME_SCALE = 0.1  # seconds per timestamp id
MAX_NUM_FRAMES_V40 = 64


@dataclass
class VideoPlan:
    frame_indices: list[int]  # source frame numbers, in order (repeats possible for very low fps)
    packing: int  # frames per resampler group
    temporal_ids: list[list[int]] | None  # timestamp ids grouped by `packing` (None for 4.0)


def uniform_sample(items: list, n: int) -> list:
    """n items at the centres of n equal bins (int() truncation), as both recipes do."""
    gap = len(items) / n
    return [items[int(i * gap + gap / 2)] for i in range(n)]


def snap_to_grid(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Nearest grid value of each value. The recipe queries a scipy cKDTree; when scipy is installed we
    do the same, so exact midpoint ties resolve as the tree resolves them. Without scipy the nearest
    point is found by comparing the same squared distances, and an exact tie takes the earlier grid
    point (cKDTree's choice there depends on the tree's shape; it agrees about two times in three)."""
    values, grid = np.asarray(values, dtype=np.float64), np.asarray(grid, dtype=np.float64)
    try:
        from scipy.spatial import cKDTree
    except ImportError:
        cKDTree = None
    if cKDTree is not None:
        return grid[cKDTree(grid[:, None]).query(values[:, None])[1]]
    if len(grid) == 1:
        return np.full_like(values, grid[0])
    upper = np.clip(np.searchsorted(grid, values), 1, len(grid) - 1)
    below, above = (values - grid[upper - 1]) ** 2, (grid[upper] - values) ** 2
    return grid[np.where(above < below, upper, upper - 1)]


def plan_video_v45(total_frames: int, fps: float, choose_fps: float = 3, force_packing: int | None = None,
                   max_num_frames: int = MAX_NUM_FRAMES_V45, max_num_packing: int = MAX_NUM_PACKING_V45,
                   time_scale: float = TIME_SCALE) -> VideoPlan:
    """The 4.5 model card's frame choice and timestamp grouping for a clip of total_frames at fps."""
    if total_frames < 1 or fps <= 0:
        raise InputError(f"a video needs frames and a positive frame rate (got {total_frames} frames at {fps} fps)")
    if not 1 <= max_num_packing <= 6:
        raise InputError(f"max_num_packing must be in 1..6 (the 3D resampler's trained range), got {max_num_packing}")
    if choose_fps <= 0:
        raise InputError(f"choose_fps must be positive, got {choose_fps}")
    duration = total_frames / fps
    if choose_fps * int(duration) <= max_num_frames:
        packing = 1
        count = round(min(choose_fps, round(fps)) * min(max_num_frames, duration))
    else:
        packing = math.ceil(duration * choose_fps / max_num_frames)
        if packing <= max_num_packing:
            count = round(duration * choose_fps)
        else:
            count = round(max_num_frames * max_num_packing)
            packing = max_num_packing
    count = max(count, 1)  # the recipe divides by zero on clips shorter than one sampling period
    indices = uniform_sample(list(range(total_frames)), count)
    if force_packing:
        packing = min(int(force_packing), max_num_packing)
    stamps = np.asarray(indices) / fps
    grid = np.arange(0, duration, time_scale)
    ids = (snap_to_grid(stamps, grid) / time_scale).astype(np.int32).tolist()
    groups = [ids[i:i + packing] for i in range(0, len(ids), packing)]
    return VideoPlan(indices, packing, groups)


def plan_video_v40(total_frames: int, fps: float, max_num_frames: int = MAX_NUM_FRAMES_V40) -> VideoPlan:
    """The 4.0 model card's choice: one frame per second, spread uniformly down to max_num_frames."""
    if total_frames < 1 or fps <= 0:
        raise InputError(f"a video needs frames and a positive frame rate (got {total_frames} frames at {fps} fps)")
    step = max(round(fps), 1)
    indices = list(range(0, total_frames, step))
    if len(indices) > max_num_frames:
        indices = uniform_sample(indices, max_num_frames)
    return VideoPlan(indices, 1, None)


def _decode(src, plan_of) -> tuple[list[Image.Image], VideoPlan]:
    plans = []

    def choose(meta):
        plans.append(plan_of(meta.total_num_frames, meta.fps))
        return plans[0].frame_indices

    video = load_video(src, frame_indices=choose)
    if not plans:  # an already decoded Video: plan on its metadata
        plans.append(plan_of(video.meta.total_num_frames, video.meta.fps))
    frames = video.frames_at(plans[0].frame_indices)
    return [Image.fromarray(f).convert("RGB") for f in frames], plans[0]


def encode_video_v45(src, choose_fps: float = 3, force_packing: int | None = None,
                     max_num_frames: int = MAX_NUM_FRAMES_V45, max_num_packing: int = MAX_NUM_PACKING_V45
                     ) -> VideoFrames:
    """Path / URL / bytes / Video -> frames + timestamp groups, ready for ProcessorV4x (4.5)."""
    frames, plan = _decode(src, lambda n, fps: plan_video_v45(n, fps, choose_fps, force_packing, max_num_frames,
                                                              max_num_packing))
    return VideoFrames(frames, plan.temporal_ids)


def encode_video_v40(src, max_num_frames: int = MAX_NUM_FRAMES_V40) -> VideoFrames:
    """Path / URL / bytes / Video -> frames as independent images (4.0)."""
    frames, _ = _decode(src, lambda n, fps: plan_video_v40(n, fps, max_num_frames))
    return VideoFrames(frames, None)
