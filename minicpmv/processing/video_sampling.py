"""Which frames of a video MiniCPM-V 4.6 looks at, and how they become image-like "units".

Main frames are taken at 1 fps (or spread uniformly when the clip is longer than max_num_frames
seconds). With stack_frames = s > 1, each second also contributes s-1 sub-frames that are pasted
side by side into one composite canvas, so the model sees [main_0, canvas_0, main_1, canvas_1, ...].
Index arithmetic follows transformers 5.23's MiniCPMV4_6VideoProcessor exactly, quirks included."""
from __future__ import annotations

import math

import numpy as np
import torch

from minicpmv.errors import InputError
from minicpmv.processing.types import VideoMeta

SEPARATOR_PX = 6  # black gap between sub-frames on a composite canvas


def _spread(items: list, limit: int) -> list:
    """Keep `limit` items at evenly spaced positions (numpy linspace truncated to int)."""
    if len(items) <= limit:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, limit, dtype=int)]


def sub_frame_timestamps(duration: float, max_num_frames: int, stack_frames: int) -> list[float]:
    """Seconds of the sub-frames (sec + j/s for j = 1..s-1, inside the clip), capped to
    max_num_frames*(s-1) by uniform spreading."""
    if not stack_frames or stack_frames <= 1:
        return []
    stamps = [sec + j / stack_frames
              for sec in range(math.ceil(duration)) for j in range(1, stack_frames)
              if sec + j / stack_frames < duration]
    return _spread(stamps, max_num_frames * (stack_frames - 1))


def sample_frame_indices(meta: VideoMeta, max_num_frames: int, stack_frames: int,
                         sample_fps: float = 1.0) -> tuple[list[int], list[int]]:
    """(main frame indices, sub-frame indices) into the source video. `sample_fps` other than 1
    is our extension (per-request sampling rate): main frames every 1/sample_fps seconds,
    spread uniformly when there would be more than max_num_frames; no stacking then."""
    fps, duration, total = meta.fps, meta.duration, meta.total_num_frames
    if sample_fps != 1.0:
        if sample_fps <= 0:
            raise InputError(f"fps must be > 0, got {sample_fps}")
        if stack_frames > 1:
            raise InputError("stack_frames > 1 samples one main frame per second; use it with fps=1")
        count = max(1, math.ceil(duration * sample_fps))
        main = [min(int(k / sample_fps * fps), total - 1) for k in range(count)]
        return _spread(main, max_num_frames), []
    if duration > max_num_frames:
        # long clip: a 10 Hz grid of timestamps, thinned to max_num_frames
        stamps = [round(i * 0.1, 1) for i in range(int(duration / 0.1))]
        main = _spread([min(int(ts * fps), total - 1) for ts in stamps], max_num_frames)
    else:
        main = [int(sec * fps) for sec in range(math.ceil(duration))]
    sub = [min(int(ts * fps), total - 1) for ts in sub_frame_timestamps(duration, max_num_frames, stack_frames)]
    return main, sub


def stack_canvas(frames: torch.Tensor) -> torch.Tensor:
    """(n, C, H, W) uint8 sub-frames -> one (C, H', W') canvas: 2x2 for four, the more square of
    1xn / nx1 for two or three, otherwise a single row; black separators between cells."""
    n, channels, height, width = frames.shape

    def squareness(rows: int, cols: int) -> float:
        canvas_w = cols * width + (cols - 1) * SEPARATOR_PX
        canvas_h = rows * height + (rows - 1) * SEPARATOR_PX
        return abs(canvas_w / max(1, canvas_h) - 1.0)

    if n == 4:
        rows, cols = 2, 2
    elif n == 3:
        rows, cols = min([(1, 3), (3, 1)], key=lambda rc: squareness(*rc))  # first wins a tie
    elif n == 2:
        if squareness(1, 2) == squareness(2, 1):
            rows, cols = (1, 2) if width >= height else (2, 1)
        else:
            rows, cols = min([(1, 2), (2, 1)], key=lambda rc: squareness(*rc))
    else:
        rows, cols = 1, n
    canvas = torch.zeros((channels, rows * height + (rows - 1) * SEPARATOR_PX,
                          cols * width + (cols - 1) * SEPARATOR_PX), dtype=torch.uint8)
    for k in range(n):
        top, left = (k // cols) * (height + SEPARATOR_PX), (k % cols) * (width + SEPARATOR_PX)
        canvas[:, top:top + height, left:left + width] = frames[k]
    return canvas


def build_units(main: torch.Tensor, sub: torch.Tensor, duration: float, max_num_frames: int,
                stack_frames: int) -> list[torch.Tensor]:
    """Interleave main frames (n, C, H, W) with per-second canvases of the sub-frames.

    The i-th main frame is paired with the canvas of second i. For clips longer than
    max_num_frames seconds that pairing is off in time; the reference does the same."""
    units = [frame for frame in main]
    if stack_frames <= 1 or len(sub) == 0:
        return units
    stamps = sub_frame_timestamps(duration, max_num_frames, stack_frames)
    assert len(stamps) == len(sub)
    canvases, cursor = [], 0
    for sec in range(math.ceil(duration)):
        start = cursor
        while cursor < len(stamps) and stamps[cursor] < sec + 1:
            cursor += 1
        canvases.append(stack_canvas(sub[start:cursor]) if cursor > start else None)
    units = []
    for i, frame in enumerate(main):
        units.append(frame)
        if i < len(canvases) and canvases[i] is not None:
            units.append(canvases[i])
    return units
