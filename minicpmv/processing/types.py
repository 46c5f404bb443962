"""Plain data passed between media loading, preprocessing and the engine."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from minicpmv.errors import InputError


@dataclass
class ProcessedInputs:
    """One prompt, ready for the model: token ids with vision placeholders expanded, plus every
    crop packed into the strip layout (1, 3, P, L*P) with one (h, w) patch-grid row per crop."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None  # (1, 3, P, L*P) float32
    target_sizes: torch.Tensor | None = None  # (num_crops, 2) int32
    pixel_values_videos: torch.Tensor | None = None
    target_sizes_videos: torch.Tensor | None = None
    num_images: int = 0
    num_videos: int = 0
    downsample_mode: str = "16x"  # the mode the placeholder counts assume; the vision tower must use it too


@dataclass(frozen=True)
class VideoMeta:
    """What frame sampling needs to know before any pixel is decoded."""

    fps: float
    duration: float  # seconds, = total_num_frames / fps (as transformers' PyAV reader defines it)
    total_num_frames: int
    width: int = 0
    height: int = 0


@dataclass
class Video:
    """Decoded frames keyed by their frame number in the source, so a sampler can ask for any
    subset of what was decoded (a full decode, or exactly the frames a sampler chose)."""

    frames: np.ndarray  # (T, H, W, 3) uint8, row k holds source frame `indices[k]`
    indices: list[int]  # sorted, unique
    meta: VideoMeta

    @classmethod
    def from_frames(cls, frames: np.ndarray, fps: float) -> "Video":
        """Wrap an already decoded clip (every frame, in order)."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise InputError(f"video frames must be a (T, H, W, 3) uint8 array, got {frames.dtype} {frames.shape}")
        total = len(frames)
        meta = VideoMeta(fps=float(fps), duration=total / fps, total_num_frames=total,
                         width=frames.shape[2], height=frames.shape[1])
        return cls(frames=frames, indices=list(range(total)), meta=meta)

    def frames_at(self, wanted: list[int]) -> np.ndarray:
        """Rows for the requested source frame numbers, in request order (repeats allowed)."""
        row_of = {idx: row for row, idx in enumerate(self.indices)}
        missing = [i for i in wanted if i not in row_of]
        if missing:
            raise InputError(f"video frames {missing[:5]} were requested but not decoded")
        return self.frames[[row_of[i] for i in wanted]]
