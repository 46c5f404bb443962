"""MiniCPM-V 4.6 processor: a rendered prompt plus images/videos -> token ids and pixel strips.

Each `<|image_pad|>` / `<|video_pad|>` in the prompt stands for one item. It is expanded into the
marker layout the model was trained on, with one pad token per vision token that the vision tower
will produce for each crop (h*w/16 in "16x" mode, h*w/4 in "4x"):

    [<image_id>k</image_id>] <image> pad*N0 </image> <slice> pad*N </slice><slice>...</slice> \n <slice>...

Defaults come from preprocessor_config.json (transformers reads the same file for its image and
video processors); call keywords override them."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, fields, replace

import numpy as np
import tokenizers
import torch
from PIL import Image

from minicpmv.errors import InputError, ModelNotFoundError
from minicpmv.processing.image_slicing import SliceConfig, pack_crops, slice_image
from minicpmv.processing.media import load_image, load_video, to_rgb
from minicpmv.processing.types import ProcessedInputs, Video
from minicpmv.processing.video_sampling import build_units, sample_frame_indices


@dataclass(frozen=True)
class MarkerTokens:
    """Marker strings, named as in tokenizer_config.json's extra_special_tokens."""

    image_token: str = "<|image_pad|>"
    video_token: str = "<|video_pad|>"
    image_start_token: str = "<image>"
    image_end_token: str = "</image>"
    slice_start_token: str = "<slice>"
    slice_end_token: str = "</slice>"
    image_id_start_token: str = "<image_id>"
    image_id_end_token: str = "</image_id>"


def slice_config(config: dict) -> SliceConfig:
    known = {f.name for f in fields(SliceConfig)}
    values = {k: v for k, v in config.items() if k in known and v is not None}
    for key in ("image_mean", "image_std"):
        if key in values:
            values[key] = tuple(values[key])
    return SliceConfig(**values)


def crop_placeholder(crops: list[torch.Tensor], grid: tuple[int, int] | None, cfg: SliceConfig,
                     pad: str, marks: MarkerTokens) -> str:
    """Placeholder text for one overview crop and its slices: one pad per vision token of each crop."""
    p = cfg.patch_size
    counts = [(c.shape[-2] // p) * (c.shape[-1] // p) // cfg.tokens_per_patch_divisor for c in crops]
    text = marks.image_start_token + pad * counts[0] + marks.image_end_token
    if grid is not None:
        rows, cols = grid
        text += "\n".join(
            "".join(marks.slice_start_token + pad * n + marks.slice_end_token
                    for n in counts[1 + r * cols:1 + (r + 1) * cols])
            for r in range(rows))
    return text


class Processor46:
    def __init__(self, tokenizer: tokenizers.Tokenizer, preprocessor_config: dict, special_tokens: dict,
                 video_config: dict | None = None):
        self.tokenizer = tokenizer
        self.marks = MarkerTokens(**{k: v for k, v in special_tokens.items()
                                     if k in {f.name for f in fields(MarkerTokens)}})
        for field in fields(MarkerTokens):
            token = getattr(self.marks, field.name)
            if tokenizer.token_to_id(token) is None:
                raise ValueError(f"tokenizer has no token {token!r} ({field.name})")
        video_config = preprocessor_config if video_config is None else video_config
        self.image_cfg = slice_config(preprocessor_config)
        self.video_cfg = slice_config(video_config)
        # transformers' processor takes the image-id default from the image processor for both media
        self.use_image_id = bool(preprocessor_config.get("use_image_id", True))
        self.max_num_frames = int(video_config.get("max_num_frames", 128))
        self.stack_frames = int(video_config.get("stack_frames", 1))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "Processor46":
        folder = os.fspath(folder)

        def read_json(name: str, required: bool = True) -> dict | None:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                if required:
                    raise ModelNotFoundError(f"{folder}: missing {name}")
                return None
            with open(path, encoding="utf-8") as f:
                return json.load(f)

        tokenizer_path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(tokenizer_path):
            raise ModelNotFoundError(f"{folder}: missing tokenizer.json")
        tokenizer = tokenizers.Tokenizer.from_file(tokenizer_path)
        special = (read_json("tokenizer_config.json", required=False) or {}).get("extra_special_tokens") or {}
        if not isinstance(special, dict):  # older files list the tokens without names: use our defaults
            special = {}
        return cls(tokenizer, read_json("preprocessor_config.json"), special,
                   read_json("video_preprocessor_config.json", required=False))

    def __call__(self, prompt: str, images=(), videos=(), *, max_slice_nums: int | None = None,
                 downsample_mode: str | None = None, use_image_id: bool | None = None,
                 slice_mode: bool | None = None, video_max_slice_nums: int | None = None,
                 video_use_image_id: bool | None = None, max_num_frames: int | None = None,
                 stack_frames: int | None = None, fps: float | None = None) -> ProcessedInputs:
        images, videos = list(images), list(videos)
        self._check_counts(prompt, len(images), len(videos))
        if downsample_mode not in (None, "16x", "4x"):
            raise InputError(f"downsample_mode must be '16x' or '4x', got {downsample_mode!r}")
        common = {k: v for k, v in (("downsample_mode", downsample_mode), ("slice_mode", slice_mode)) if v is not None}
        image_cfg = replace(self.image_cfg, **common, **_given(max_slice_nums=max_slice_nums))
        video_cfg = replace(self.video_cfg, **common,
                            **_given(max_slice_nums=_first(video_max_slice_nums, max_slice_nums)))
        image_ids = _first(use_image_id, self.use_image_id)
        video_ids = _first(video_use_image_id, image_ids)

        out = ProcessedInputs(input_ids=[], num_images=len(images), num_videos=len(videos),
                              downsample_mode=image_cfg.downsample_mode)
        image_texts, video_texts = [], []
        if images:
            image_texts, out.pixel_values, out.target_sizes = self._images(images, image_cfg, image_ids)
        if videos:
            frames_cap = _first(max_num_frames, self.max_num_frames)
            stack = _first(stack_frames, self.stack_frames)
            video_texts, out.pixel_values_videos, out.target_sizes_videos = self._videos(
                videos, video_cfg, video_ids, frames_cap, stack, 1.0 if fps is None else float(fps))
        text = self._expand(prompt, image_texts, video_texts)
        out.input_ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        return out

    def _check_counts(self, prompt: str, num_images: int, num_videos: int) -> None:
        for token, given, kind in ((self.marks.image_token, num_images, "image"),
                                   (self.marks.video_token, num_videos, "video")):
            found = prompt.count(token)
            if found != given:
                raise InputError(f"the prompt has {found} {token} placeholder(s) but {given} {kind}(s) were given")

    def _images(self, images: list, cfg: SliceConfig, with_ids: bool):
        texts, packed = [], []
        for k, image in enumerate(images):
            pixels = _to_uint8_chw(image if isinstance(image, Image.Image) else load_image(image))
            crops, grid = slice_image(pixels, cfg)
            prefix = self._image_id(k) if with_ids else ""
            texts.append(prefix + crop_placeholder(crops, grid, cfg, self.marks.image_token, self.marks))
            packed.append(pack_crops(crops, cfg))  # now, so the uint8 crops can be freed
        return (texts, *_concat(packed))

    def _videos(self, videos: list, cfg: SliceConfig, with_ids: bool, max_num_frames: int, stack_frames: int,
                sample_fps: float):
        texts, packed = [], []

        def pick(meta):
            main, sub = sample_frame_indices(meta, max_num_frames, stack_frames, sample_fps)
            return main + sub

        for k, item in enumerate(videos):
            video = item if isinstance(item, Video) else load_video(item, frame_indices=pick)
            main, sub = sample_frame_indices(video.meta, max_num_frames, stack_frames, sample_fps)
            units = build_units(_frames_to_tensor(video.frames_at(main)), _frames_to_tensor(video.frames_at(sub)),
                                video.meta.duration, max_num_frames, stack_frames)
            text = self._image_id(k) if with_ids else ""
            for unit in units:
                crops, grid = slice_image(unit, cfg)
                text += crop_placeholder(crops, grid, cfg, self.marks.video_token, self.marks)
                packed.append(pack_crops(crops, cfg))
            texts.append(text)
        return (texts, *_concat(packed))

    def _image_id(self, k: int) -> str:
        return f"{self.marks.image_id_start_token}{k}{self.marks.image_id_end_token}"

    def _expand(self, prompt: str, image_texts: list[str], video_texts: list[str]) -> str:
        # one pass over the prompt, so pads inside the replacements are never matched again
        queues = {self.marks.image_token: iter(image_texts), self.marks.video_token: iter(video_texts)}
        pattern = "|".join(re.escape(t) for t in queues)
        return re.sub(pattern, lambda m: next(queues[m.group(0)]), prompt)


def _given(**kwargs) -> dict:
    return {k: v for k, v in kwargs.items() if v is not None}


def _first(*values):
    return next((v for v in values if v is not None), None)


def _concat(packed: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([strip for strip, _ in packed], dim=-1), torch.cat([sizes for _, sizes in packed])


def _to_uint8_chw(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(to_rgb(image))).permute(2, 0, 1).contiguous()


def _frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()
