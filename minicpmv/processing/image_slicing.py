"""LLaVA-UHD style slicing for MiniCPM-V 4.6: one overview crop plus an optional rows x cols grid of
slices, each resized to a multiple of the merge window, normalized and cut into the patch strip.

Numbers follow transformers 5.23's torchvision image processor bit for bit: Python float math for
sizes (int() truncation, round() half-to-even), torch's native uint8 bicubic antialias resize, and
normalization fused into (x - mean*255) / (std*255) on float32 pixel values."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SliceConfig:
    max_slice_nums: int = 9
    scale_resolution: int = 448
    patch_size: int = 14
    slice_mode: bool = True
    downsample_mode: str = "16x"  # "16x": two 2x2 merges (crop sides multiple of 4 patches); "4x": one
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    @property
    def tokens_per_patch_divisor(self) -> int:
        return 4 if self.downsample_mode == "4x" else 16


def ensure_divide(length: float, divisor: int) -> int:
    # Python round(): half-to-even, as the reference uses
    return max(round(length / divisor) * divisor, divisor)


def find_best_resize(size: tuple[float, float], scale_resolution: int, patch_size: int,
                     downsample_mode: str, allow_upscale: bool = False) -> tuple[int, int]:
    """(height, width) for a crop: area scaled to ~scale_resolution^2 when too big (or always when
    upscaling is allowed), keeping the aspect ratio, then snapped to the merge window."""
    height, width = size
    if height * width > scale_resolution * scale_resolution or allow_upscale:
        aspect = width / height
        height = int(scale_resolution / math.sqrt(aspect))
        width = int(height * aspect)  # from the truncated height, as the reference does
    window = patch_size * (2 if downsample_mode == "4x" else 4)
    return ensure_divide(height, window), ensure_divide(width, window)


def get_refine_size(size: tuple[int, int], grid: tuple[int, int], scale_resolution: int,
                    patch_size: int, downsample_mode: str) -> tuple[int, int]:
    """Size of the whole sliced canvas: grid * best size of one (fractional) cell."""
    height, width = size
    rows, cols = grid
    cell_h = ensure_divide(height, rows) / rows
    cell_w = ensure_divide(width, cols) / cols
    best_h, best_w = find_best_resize((cell_h, cell_w), scale_resolution, patch_size, downsample_mode,
                                      allow_upscale=True)
    return best_h * rows, best_w * cols


def get_sliced_grid(size: tuple[int, int], max_slice_nums: int, scale_resolution: int) -> tuple[int, int] | None:
    """(rows, cols) whose aspect best matches the image, or None when the image needs no slicing."""
    height, width = size
    log_ratio = math.log(width / height)
    multiple = min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slice_nums)
    if multiple <= 1:
        return None
    best, best_err = (1, 1), float("inf")
    for num in (multiple - 1, multiple, multiple + 1):
        if num == 1 or num > max_slice_nums:
            continue
        for rows in range(1, num + 1):
            if num % rows:
                continue
            err = abs(log_ratio - math.log((num // rows) / rows))
            # exact ties go to the grid with more rows
            if err < best_err or (err == best_err and rows > best[0]):
                best, best_err = (rows, num // rows), err
    return best


def resize_uint8(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic antialiased resize of (C, H, W) uint8. torch's native uint8 kernel rounds inside the
    filter; a float resize + round differs by up to 21 levels, so keep uint8 end to end."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image  # torchvision returns the input untouched for a same-size resize
    return F.interpolate(image[None], size=list(size), mode="bicubic", antialias=True, align_corners=False)[0]


def slice_image(image: torch.Tensor, cfg: SliceConfig) -> tuple[list[torch.Tensor], tuple[int, int] | None]:
    """(C, H, W) uint8 -> [overview, slice_0_0, slice_0_1, ...] uint8 crops and the grid (None if unsliced)."""
    size = tuple(image.shape[-2:])
    grid = get_sliced_grid(size, cfg.max_slice_nums, cfg.scale_resolution) if cfg.slice_mode else None
    overview_size = find_best_resize(size, cfg.scale_resolution, cfg.patch_size, cfg.downsample_mode,
                                     allow_upscale=grid is None)
    crops = [resize_uint8(image, overview_size)]
    if grid is not None:
        refine_h, refine_w = get_refine_size(size, grid, cfg.scale_resolution, cfg.patch_size, cfg.downsample_mode)
        refined = resize_uint8(image, (refine_h, refine_w))
        rows, cols = grid
        cell_h, cell_w = refine_h // rows, refine_w // cols
        for r in range(rows):
            for c in range(cols):
                crops.append(refined[:, r * cell_h:(r + 1) * cell_h, c * cell_w:(c + 1) * cell_w])
    return crops, grid


def normalize(crop: torch.Tensor, cfg: SliceConfig) -> torch.Tensor:
    """Rescale and normalize in one step, with the constants built exactly like the reference
    (float32 mean/std multiplied by 1/rescale_factor), so results match to the last bit."""
    mean = torch.tensor(cfg.image_mean) * (1.0 / cfg.rescale_factor)
    std = torch.tensor(cfg.image_std) * (1.0 / cfg.rescale_factor)
    return (crop.to(torch.float32) - mean[:, None, None]) / std[:, None, None]


def patchify(crop: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(C, h*P, w*P) -> (C, P, h*w*P): patch i (row-major over the h x w grid) fills columns [i*P, (i+1)*P)."""
    c, height, width = crop.shape
    h, w = height // patch_size, width // patch_size
    patches = crop.reshape(c, h, patch_size, w, patch_size).permute(0, 2, 1, 3, 4)
    return patches.reshape(c, patch_size, h * w * patch_size)


def pack_crops(crops: list[torch.Tensor], cfg: SliceConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 crops -> pixel strip (1, C, P, L*P) float32 and target sizes (N, 2) int32."""
    p = cfg.patch_size
    strip = torch.cat([patchify(normalize(crop, cfg), p) for crop in crops], dim=-1)[None]
    sizes = torch.tensor([[crop.shape[-2] // p, crop.shape[-1] // p] for crop in crops], dtype=torch.int32)
    return strip, sizes
