"""LLaVA-UHD slicing as MiniCPM-V 4.0/4.5 do it: an overview crop plus an optional cols x rows grid
of slices, every side a multiple of the 14-px patch, resized with PIL's bicubic filter.

It differs from 4.6's (image_slicing.py) in ways that change pixels, so it is not shared: sizes are
(width, height) and snapped to one patch instead of a 2x2/4x4 merge window, resizing is PIL BICUBIC
on the PIL image (not torch's antialiased uint8 kernel), and a grid tie keeps the first candidate in
(count, columns) order. Normalisation is float32 (x / 255 - mean) / std, as the reference does it
through numpy. ensure_divide and the strip layout (patchify) are the same and are reused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .image_slicing import ensure_divide, patchify


@dataclass(frozen=True)
class SliceConfigV4x:
    max_slice_nums: int = 9
    scale_resolution: int = 448
    patch_size: int = 14
    slice_mode: bool = True
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)


def find_best_resize(size: tuple[float, float], scale_resolution: int, patch_size: int,
                     allow_upscale: bool = False) -> tuple[int, int]:
    """(width, height) of a crop: scaled to an area of ~scale_resolution^2 when larger (or always when
    upscaling is allowed) keeping the aspect ratio, then snapped to the patch size."""
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        aspect = width / height
        height = int(scale_resolution / math.sqrt(aspect))
        width = int(height * aspect)  # from the truncated height, as the reference does
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def get_refine_size(size: tuple[int, int], grid: tuple[int, int], scale_resolution: int,
                    patch_size: int) -> tuple[int, int]:
    """(width, height) of the canvas the grid is cut from: grid times the best size of one cell."""
    width, height = size
    cols, rows = grid
    cell_w = ensure_divide(width, cols) / cols
    cell_h = ensure_divide(height, rows) / rows
    best_w, best_h = find_best_resize((cell_w, cell_h), scale_resolution, patch_size, allow_upscale=True)
    return best_w * cols, best_h * rows


def get_sliced_grid(size: tuple[int, int], max_slice_nums: int, scale_resolution: int) -> tuple[int, int] | None:
    """(cols, rows) whose aspect is closest (in log) to the image's, among slice counts next to the
    image's area in units of scale_resolution^2; None when the image needs at most one crop."""
    width, height = size
    log_ratio = math.log(width / height)
    multiple = min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slice_nums)
    if multiple <= 1:
        return None
    best, best_err = None, float("inf")
    for num in (multiple - 1, multiple, multiple + 1):
        if num == 1 or num > max_slice_nums:
            continue
        for cols in range(1, num + 1):
            if num % cols:
                continue
            err = abs(log_ratio - math.log(cols / (num // cols)))
            if err < best_err:  # strict: ties keep the earlier candidate
                best, best_err = (cols, num // cols), err
    return best


def slice_image(image: Image.Image, cfg: SliceConfigV4x, max_slice_nums: int | None = None
                ) -> tuple[list[Image.Image], tuple[int, int] | None]:
    """RGB image -> ([overview, slice(0,0), slice(0,1), ...], (cols, rows) or None)."""
    if not cfg.slice_mode:
        return [image], None
    max_slice_nums = cfg.max_slice_nums if max_slice_nums is None else int(max_slice_nums)
    if max_slice_nums < 1:
        raise ValueError(f"max_slice_nums must be >= 1, got {max_slice_nums}")
    S, P = cfg.scale_resolution, cfg.patch_size
    grid = get_sliced_grid(image.size, max_slice_nums, S)
    if grid is None:  # a single crop, upscaled to ~S^2 if small
        return [image.resize(find_best_resize(image.size, S, P, allow_upscale=True), Image.Resampling.BICUBIC)], None
    overview = image.resize(find_best_resize(image.size, S, P), Image.Resampling.BICUBIC)
    refined = image.resize(get_refine_size(image.size, grid, S, P), Image.Resampling.BICUBIC)
    cell_w, cell_h = refined.size[0] // grid[0], refined.size[1] // grid[1]
    cells = [refined.crop((x, y, x + cell_w, y + cell_h))
             for y in range(0, refined.size[1], cell_h) for x in range(0, refined.size[0], cell_w)]
    return [overview] + cells, grid


def crop_to_strip(crop: Image.Image, cfg: SliceConfigV4x) -> tuple[torch.Tensor, tuple[int, int]]:
    """PIL crop -> normalised strip (3, P, h*w*P) float32 and its patch grid (h, w)."""
    pixels = np.asarray(crop, dtype=np.uint8).astype(np.float32) / 255
    pixels = (pixels - np.asarray(cfg.mean, dtype=np.float32)) / np.asarray(cfg.std, dtype=np.float32)
    chw = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
    P = cfg.patch_size
    return patchify(chw, P), (chw.shape[1] // P, chw.shape[2] // P)


def grid_placeholder(grid: tuple[int, int] | None, slice_start: str, slice_end: str, unk: str, n: int) -> str:
    """Rows of `<slice>` + n unk + `</slice>` units, rows joined by a newline (none after the last)."""
    if grid is None:
        return ""
    cols, rows = grid
    unit = slice_start + unk * n + slice_end
    return "\n".join(unit * cols for _ in range(rows))
