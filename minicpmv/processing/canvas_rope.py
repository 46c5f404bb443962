"""Canvas M-RoPE position ids of MiniCPM-V 4.7 (shared/spec/v47.md section 4).

Text tokens get equal (T, H, W) = (p, p, p) positions, one step each. Every image or video frame
is laid out on a 2-D canvas: its thumbnail is stretched over the whole canvas, its slices tile
it, and the markers around them (`<image>`, `</image>`, `<slice>`, `</slice>`, the row-break
"\\n") pin the canvas's corners and edges. T stays at the frame's origin inside a frame; the
next frame or text continues from origin + max(canvas height, width) + 1."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2


@dataclass(frozen=True)
class CanvasMarkers:
    image_start: int
    image_end: int
    slice_start: int
    slice_end: int
    newline: int

    @classmethod
    def from_config(cls, config: dict) -> "CanvasMarkers | None":
        """The five marker ids config.json declares (None when it declares none of them)."""
        keys = ("image_start_id", "image_end_id", "slice_start_id", "slice_end_id", "newline_id")
        values = [config.get(k) for k in keys]
        if all(v is None for v in values):
            return None
        if any(v is None for v in values):
            missing = [k for k, v in zip(keys, values) if v is None]
            raise ValueError(f"config.json sets some canvas marker ids but not {missing}")
        return cls(*values)

    @property
    def all(self) -> frozenset:
        return frozenset((self.image_start, self.image_end, self.slice_start, self.slice_end, self.newline))


@dataclass
class Frame:
    """One picture or video frame: its thumbnail crop [start, end), the slices after it, and
    the index one past the markers that close it."""
    modality: int
    start: int
    end: int
    slices: list = field(default_factory=list)
    span_end: int = 0


def token_types(ids: list[int], image_token_id: int | None, video_token_id: int | None) -> list[int]:
    """0 text, 1 image pad, 2 video pad, per token (transformers' mm_token_type_ids)."""
    return [IMAGE if t == image_token_id else VIDEO if t == video_token_id else TEXT for t in ids]


def crops(types: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of one non-text type: (modality, start, end)."""
    runs, start = [], None
    for i, t in enumerate(types + [TEXT]):
        if start is not None and t != types[start]:
            runs.append((types[start], start, i))
            start = None
        if start is None and t != TEXT:
            start = i
    return runs


def group_frames(ids: list[int], types: list[int], markers: CanvasMarkers) -> list[list[Frame]]:
    """Crops -> frames (thumbnail + the slices that follow it) -> groups of frames that only
    markers separate (the frames of a video; images without id numbers)."""
    marks, groups, frame, prev_end = markers.all, [], None, 0
    for modality, start, end in crops(types):
        if frame is not None and ids[start - 1] == markers.slice_start:
            frame.slices.append((start, end))
        else:
            frame = Frame(modality, start, end)
            if groups and all(t in marks for t in ids[prev_end:start - 1]):
                groups[-1].append(frame)
            else:
                groups.append([frame])
        prev_end = end
    for group in groups:
        for f in group:
            end = f.slices[-1][1] if f.slices else f.end
            while end < len(ids) and ids[end] in marks:
                end += 1
            f.span_end = end
    return groups


def grid_linspace(canvas: int, n: int) -> torch.Tensor:
    """n evenly spread integer coordinates over 0..canvas-1 (torch's float32 linspace, rounded
    half to even)."""
    return torch.linspace(0, canvas - 1, n).round().long()


def columns(slices: list[tuple[int, int]]) -> int:
    """Slices per row: a row break (`</slice>` "\\n" `<slice>`) is a gap of more than 2 tokens."""
    for k in range(len(slices) - 1):
        if slices[k + 1][0] - slices[k][1] > 2:
            return k + 1
    return len(slices)


def _grid(sizes, merge: int, crop_len: int) -> tuple[int, int]:
    """The next crop's patch grid in LLM tokens, checked against the crop's placeholder count."""
    size = next(sizes, None)
    if size is None:
        raise ValueError("the prompt has more vision crops than target sizes were given")
    h, w = size[0] // merge, size[1] // merge
    if h * w != crop_len:
        raise ValueError(f"a crop of {crop_len} placeholder tokens does not match its patch grid {tuple(size)} "
                         f"(merge {merge})")
    return h, w


def canvas_positions(ids: list[int], types: list[int], image_sizes: list, video_sizes: list, merge: int,
                     markers: CanvasMarkers | None) -> tuple[torch.Tensor, int]:
    """Prompt ids with their token types and the (h, w) patch grids of every image and video crop
    in prompt order -> (position ids [3, T] long, rope_delta). merge: patches per LLM token side
    (4 in "16x", 2 in "4x"). Decode token k then sits at T = H = W = T_prompt + k + rope_delta."""
    n = len(ids)
    pos = torch.arange(n).expand(3, n).clone()
    if any(types) and markers is None:
        raise ValueError("a 4.7 prompt with images or videos needs the canvas marker ids in config.json")
    groups = group_frames(ids, types, markers) if any(types) else []
    grids = {IMAGE: iter(image_sizes), VIDEO: iter(video_sizes)}
    p = idx = 0  # running position, next unassigned token
    for group in groups:
        first = group[0].start - 1  # the group's <image>
        if first > idx:
            pos[:, idx:first] = torch.arange(first - idx) + p
            p += first - idx
        cursor = first
        for f in group:
            grid = grids[f.modality]
            frame_start = f.start - 1
            if frame_start > cursor:  # text between frames of one group (not made by the processor)
                pos[:, cursor:frame_start] = torch.arange(frame_start - cursor) + p
                p += frame_start - cursor + 1
            span_end = min(f.span_end, group[-1].span_end)
            o = p
            th, tw = _grid(grid, merge, f.end - f.start)
            ch, cw = th, tw
            slice_grids, cols, sh, sw = [], 1, 0, 0
            if f.slices:
                cols = columns(f.slices)
                rows = len(f.slices) // cols
                if rows * cols != len(f.slices):
                    rows, cols = 1, len(f.slices)
                slice_grids = [_grid(grid, merge, end - start) for start, end in f.slices]
                sh, sw = slice_grids[0]
                ch, cw = rows * sh, cols * sw
            pos[:, frame_start:span_end] = o
            pos[1:, frame_start] = max(o - 1, 0)  # <image>: the halo before the canvas
            if f.end < span_end:  # </image>: the far corner
                pos[1, f.end], pos[2, f.end] = o + ch, o + cw
            pos[1, f.start:f.end] = (o + grid_linspace(ch, th))[:, None].expand(th, tw).reshape(-1)
            pos[2, f.start:f.end] = (o + grid_linspace(cw, tw)).repeat(th)
            for k, ((start, end), (gh, gw)) in enumerate(zip(f.slices, slice_grids)):
                h0, w0 = (k // cols) * sh, (k % cols) * sw
                pos[1, start - 1], pos[2, start - 1] = o + h0, o + w0  # <slice>
                if end < span_end:  # </slice>
                    pos[1, end], pos[2, end] = o + h0 + gh - 1, o + w0 + gw - 1
                pos[1, start:end] = (o + h0 + torch.arange(gh))[:, None].expand(gh, gw).reshape(-1)
                pos[2, start:end] = (o + w0 + torch.arange(gw)).repeat(gh)
            for k in range(len(f.slices) - 1):  # the "\n" ending a row of slices
                gap_start, gap_end = f.slices[k][1], f.slices[k + 1][0]
                if gap_end - gap_start > 2:
                    pos[1, gap_start + 1:gap_end - 1] = o + (k // cols + 1) * sh - 1
                    pos[2, gap_start + 1:gap_end - 1] = o + cols * sw
            p = o + max(ch, cw) + 1
            cursor = span_end
        idx = group[-1].span_end
    pos[:, idx:] = torch.arange(n - idx) + p
    return pos, int(pos.max()) + 1 - n if n else 0
