"""MiniCPM-V 4.0/4.5 processor: a rendered chat prompt with one `(<image>./</image>)` marker per image
(and `(<video>./</video>)` per video) plus the images -> token ids and packed crops for the engine.

Per image (k = its index among the prompt's image markers, skipped frames included, as upstream):
    [<image_id>k</image_id>]<image>{64 x unk}</image>{grid rows of <slice>{64 x unk}</slice>, joined by \\n}
With 4.5 temporal ids, frames are grouped (one group = consecutive images whose timestamp list is one
inner list): only a group's first frame gets a placeholder, the other frames' markers vanish together
with the whitespace around the text before them, and every crop position of the group is one resampler
unit (64 tokens) fed by all the group's frames.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer

from ..engine.sequence import VisionInputs
from ..errors import InputError, PromptTooLongError, PromptTruncatedWarning
# The markers the message layer renders for 4.0/4.5 (string-content templates); VIDEO_MARKER stands for a
# whole video and is expanded here into one IMAGE_MARKER per frame.
from ..prompt.messages import IMAGE_MARKER, VIDEO_MARKER
from .slicing_v4x import SliceConfigV4x, crop_to_strip, get_sliced_grid, grid_placeholder, slice_image

__all__ = ["IMAGE_MARKER", "VIDEO_MARKER", "ProcessedV4x", "ProcessorV4x", "VideoFrames"]


@dataclass
class VideoFrames:
    """A video as the 4.0/4.5 recipes hand it over: frames, and for 4.5 their timestamp groups
    (e.g. [[1, 3, 5], [7, 9, 11]] in 0.1 s units; None = frames are independent images)."""

    frames: list
    temporal_ids: list[list[int]] | None = None


@dataclass
class ProcessedV4x:
    prompt: str  # after placeholder expansion (what was tokenized)
    input_ids: list[int]
    pixel_values: torch.Tensor | None  # (1, 3, P, L*P) float32, crops in placeholder order
    target_sizes: torch.Tensor | None  # (num_crops, 2) int32 patch grids (h, w)
    temporal_ids: list[list[int]] | None  # one entry per resampler unit (None: one unit per crop)
    image_bounds: list[tuple[int, int]]  # [start, end) of each unit's placeholder run
    placeholder_id: int
    crops: list[Image.Image] = field(default_factory=list, repr=False)

    def vision_inputs(self) -> list[VisionInputs]:
        if self.pixel_values is None:
            return []
        extra = {"temporal_ids": self.temporal_ids} if self.temporal_ids is not None else {}
        return [VisionInputs(self.placeholder_id, self.pixel_values, self.target_sizes, None, extra)]


class ProcessorV4x:
    def __init__(self, tokenizer: Tokenizer, version: str, slice_cfg: SliceConfigV4x, *, use_image_id: bool = True,
                 image_feature_size: int = 64, tokens: dict[str, str] | None = None):
        self.tokenizer = tokenizer
        self.version = version
        self.slice_cfg = slice_cfg
        self.use_image_id = use_image_id
        self.image_feature_size = image_feature_size
        t = {"im_start": "<image>", "im_end": "</image>", "slice_start": "<slice>", "slice_end": "</slice>",
             "unk": "<unk>", "im_id_start": "<image_id>", "im_id_end": "</image_id>"}
        t.update(tokens or {})
        self.tokens = t
        ids = {name: tokenizer.token_to_id(text) for name, text in t.items()}
        missing = [t[name] for name, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"the tokenizer lacks the MiniCPM-V special tokens {missing}")
        self.ids = ids

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ProcessorV4x":
        """Read tokenizer.json, config.json and preprocessor_config.json of a 4.0/4.5 checkpoint; the
        preprocessor config wins where both speak (the reference asserts they agree)."""
        folder = Path(folder)
        config = _read_json(folder / "config.json")
        pre = _read_json(folder / "preprocessor_config.json")
        sc = config.get("slice_config") or {}
        slice_cfg = SliceConfigV4x(
            max_slice_nums=pre.get("max_slice_nums", sc.get("max_slice_nums", 9)),
            scale_resolution=pre.get("scale_resolution", sc.get("scale_resolution", 448)),
            patch_size=pre.get("patch_size", sc.get("patch_size", config.get("patch_size", 14))),
            slice_mode=pre.get("slice_mode", config.get("slice_mode", True)),
            mean=tuple(pre.get("norm_mean", (0.5, 0.5, 0.5))), std=tuple(pre.get("norm_std", (0.5, 0.5, 0.5))))
        tokens = {k: pre[k] for k in ("im_start", "im_end", "slice_start", "slice_end", "unk", "im_id_start",
                                      "im_id_end") if k in pre}
        return cls(Tokenizer.from_file(str(folder / "tokenizer.json")), str(config.get("version", pre.get("version"))),
                   slice_cfg, use_image_id=pre.get("use_image_id", config.get("use_image_id", True)),
                   image_feature_size=pre.get("image_feature_size", config.get("query_num", 64)), tokens=tokens)

    @property
    def placeholder_id(self) -> int:
        return self.ids["unk"]

    def image_placeholder(self, size: tuple[int, int], index: int, max_slice_nums: int | None = None,
                          use_image_id: bool | None = None) -> str:
        """Placeholder text of one image of (width, height) `size`, the index-th marker of the prompt."""
        t, n = self.tokens, self.image_feature_size
        text = t["im_start"] + t["unk"] * n + t["im_end"]
        if self.use_image_id if use_image_id is None else use_image_id:
            text = f"{t['im_id_start']}{index}{t['im_id_end']}" + text
        if self.slice_cfg.slice_mode:
            limit = self.slice_cfg.max_slice_nums if max_slice_nums is None else int(max_slice_nums)
            grid = get_sliced_grid(size, limit, self.slice_cfg.scale_resolution)
            text += grid_placeholder(grid, t["slice_start"], t["slice_end"], t["unk"], n)
        return text

    def __call__(self, prompt: str, images=(), videos=(), *, max_slice_nums: int | None = None,
                 use_image_id: bool | None = None, temporal_ids: list[list[int]] | None = None,
                 max_inp_length: int | None = None) -> ProcessedV4x:
        """prompt: the rendered chat template with IMAGE_MARKER / VIDEO_MARKER markers, in the order of
        `images` / `videos` (VideoFrames, or plain frame lists). temporal_ids: the reference's per-call
        argument (4.5), one inner list per group over ALL image markers; videos may carry their own.
        max_inp_length keeps the first tokens, as upstream does, but never cuts a placeholder."""
        prompt, images, temporal_ids = self._expand_videos(prompt, list(images), list(videos), temporal_ids)
        images = [_as_rgb(im) for im in images]
        chunks = prompt.split(IMAGE_MARKER)
        if len(chunks) - 1 != len(images):
            raise InputError(f"the prompt has {len(chunks) - 1} image markers but {len(images)} images were given")
        groups = self._groups(temporal_ids, len(images))

        crops, units, skipped = [], [], set()
        for members, unit_ids in groups:
            sliced = [slice_image(images[i], self.slice_cfg, max_slice_nums)[0] for i in members]
            if len({len(s) for s in sliced}) != 1:
                raise InputError("frames packed in one temporal group must have the same size")
            for position in range(len(sliced[0])):  # crop position g of every frame, frame after frame
                crops.extend(s[position] for s in sliced)
                units.append(unit_ids)
            skipped.update(members[1:])
        text = ""
        for i, image in enumerate(images):
            if i in skipped:  # a packed frame: no placeholder, and the text before it is stripped
                text += chunks[i].strip()
            else:
                text += chunks[i] + self.image_placeholder(image.size, i, max_slice_nums, use_image_id)
        text += chunks[-1]

        ids = self.tokenizer.encode(text).ids
        full_length = len(ids)
        if max_inp_length is not None and full_length > max_inp_length:
            ids = ids[:max_inp_length]
        bounds = self._bounds(ids)
        if len(ids) < full_length and (bounds is None or len(bounds) < len(units)):
            raise PromptTooLongError(f"the prompt is {full_length} tokens and max_inp_length={max_inp_length} would "
                                     "cut through its image placeholders; raise it, or send fewer or smaller images")
        if len(ids) < full_length:  # the reference cuts silently; say so
            warnings.warn(f"the prompt is {full_length} tokens; only its first {max_inp_length} are kept "
                          f"(max_inp_length={max_inp_length}; 8192 for 4.0 and 16384 for 4.5 by default); pass a larger "
                          f"max_inp_length to keep it all", PromptTruncatedWarning, stacklevel=3)
        if bounds is None or len(bounds) != len(units) or any(e - s != self.image_feature_size for s, e in bounds) or \
                ids.count(self.placeholder_id) != len(units) * self.image_feature_size:
            raise InputError(f"the text contains reserved image tokens ({self.tokens['unk']!r}, "
                             f"{self.tokens['im_start']!r}, {self.tokens['slice_start']!r}, ...)")

        pixel_values = target_sizes = None
        if crops:
            strips, sizes = zip(*(crop_to_strip(c, self.slice_cfg) for c in crops))
            pixel_values = torch.cat(strips, dim=-1)[None]
            target_sizes = torch.tensor(sizes, dtype=torch.int32)
        has_time = temporal_ids is not None
        return ProcessedV4x(prompt=text, input_ids=ids, pixel_values=pixel_values, target_sizes=target_sizes,
                            temporal_ids=[list(u) for u in units] if has_time and units else None,
                            image_bounds=bounds, placeholder_id=self.placeholder_id, crops=crops)

    # -- helpers ----------------------------------------------------------------------------
    def _expand_videos(self, prompt: str, images: list, videos: list, temporal_ids):
        """Turn each VIDEO_MARKER into one IMAGE_MARKER per frame (joined by newlines, as the model
        card's frames + [question] content renders) and merge the videos' timestamp groups into one
        per-call temporal_ids list ([-1] for ordinary images)."""
        parts = prompt.split(VIDEO_MARKER)
        if len(parts) - 1 != len(videos):
            raise InputError(f"the prompt has {len(parts) - 1} video markers but {len(videos)} videos were given")
        if not videos:
            return prompt, images, temporal_ids
        if temporal_ids is not None:
            raise InputError("pass timestamps with each video (VideoFrames.temporal_ids), not as temporal_ids")
        videos = [v if isinstance(v, VideoFrames) else VideoFrames(list(v)) for v in videos]
        timed = any(v.temporal_ids is not None for v in videos)
        out_text, out_images, groups = "", [], []
        image_iter = iter(images)
        for j, part in enumerate(parts):
            n_images = part.count(IMAGE_MARKER)
            for _ in range(n_images):
                out_images.append(next(image_iter, None))
                groups.append([-1])
            out_text += part
            if j < len(videos):
                video = videos[j]
                if not video.frames:
                    raise InputError(f"video {j} has no frames")
                out_text += "\n".join([IMAGE_MARKER] * len(video.frames))
                out_images.extend(video.frames)
                groups.extend(video.temporal_ids if video.temporal_ids is not None
                              else [[-1] for _ in video.frames])
        if any(im is None for im in out_images) or next(image_iter, None) is not None:
            raise InputError("the number of image markers does not match the number of images")
        return out_text, out_images, groups if timed else None

    @staticmethod
    def _groups(temporal_ids, n_images: int) -> list[tuple[list[int], list[int]]]:
        """(member images, the unit's temporal ids) per group; one group per image without ids."""
        if temporal_ids is None:
            return [([i], [-1]) for i in range(n_images)]
        temporal_ids = [[int(t) for t in group] for group in temporal_ids]
        if any(not group for group in temporal_ids):
            raise InputError("temporal_ids groups must not be empty")
        flat = sum(len(g) for g in temporal_ids)
        if flat != n_images:
            raise InputError(f"temporal_ids cover {flat} frames but the prompt has {n_images} images")
        groups, start = [], 0
        for group in temporal_ids:
            groups.append((list(range(start, start + len(group))), group))
            start += len(group)
        return groups

    def _bounds(self, ids: list[int]) -> list[tuple[int, int]] | None:
        """[start, end) of the placeholder run inside each <image>/<slice> pair; None if the tags do
        not pair up (a truncated or hand-written tag)."""
        starts = {self.ids["im_start"], self.ids["slice_start"]}
        ends = {self.ids["im_end"], self.ids["slice_end"]}
        s = [i + 1 for i, t in enumerate(ids) if t in starts]
        e = [i for i, t in enumerate(ids) if t in ends]
        if len(s) != len(e) or any(a > b for a, b in zip(s, e)):
            return None
        return list(zip(s, e))


def _as_rgb(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")  # the reference's plain convert
    if hasattr(image, "shape"):  # HWC uint8 array (a decoded video frame)
        return Image.fromarray(image).convert("RGB")
    raise InputError(f"expected a PIL image or an HxWx3 uint8 array, got {type(image).__name__}")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
