"""How much media one request may carry, and how much may be in flight at once (the operator's flags).

Checked in three steps, each before the work it protects:
  1. counts (event loop, before anything is read): images and videos per request, like vLLM's
     --limit-mm-per-prompt, and the frames a request may ask for per video (max_num_frames);
  2. pixels (prepare pool, before any pixel is decoded): every image's size from its header, every
     video's frame size and frame count from its container, summed against the per-request budget;
  3. in flight: that sum is reserved from a server-wide pixel budget until the request ends; a request
     that does not fit now gets 429 (retry later), one that could never fit gets 400 from step 2.
A thousand tiny images are a 400 at step 1; a thousand requests of one huge image queue at step 3.
"""
from __future__ import annotations

import io
import threading
from dataclasses import dataclass

from ..errors import InputError

# av, PIL and the media modules are imported where they are used: `minicpmv serve --help` reads the
# defaults above and must not pay for torch (which minicpmv.processing imports).


@dataclass(frozen=True)
class MediaLimits:
    max_images: int = 32  # per request
    max_videos: int = 4  # per request
    max_frames: int = 512  # frames one video may be sampled to (max_num_frames), and the frame cap of the estimate
    max_pixels: int = 200_000_000  # per request: images + sampled video frames, at their decoded size
    max_inflight_pixels: int = 1_000_000_000  # all requests being prepared or generated together

    def __post_init__(self):
        if min(self.max_images, self.max_videos, self.max_frames, self.max_pixels, self.max_inflight_pixels) < 0:
            raise ValueError("media limits must be >= 0")

    def check_counts(self, messages: list, max_num_frames: int | None) -> None:
        counts = {"image": 0, "video": 0}
        for _, kind in media_parts(messages):
            counts[kind] += 1
        for kind, limit in (("image", self.max_images), ("video", self.max_videos)):
            if counts[kind] > limit:
                raise InputError(f"the request holds {counts[kind]} {kind}s, over this server's limit of {limit} "
                                 f"per request (--limit-mm-per-prompt)")
        if max_num_frames is not None and max_num_frames > self.max_frames:
            raise InputError(f"max_num_frames is {max_num_frames}, over this server's limit of {self.max_frames} "
                             f"frames per video (--max-video-frames)")

    def measure(self, messages: list, max_num_frames: int | None, max_bytes: int) -> tuple[list, int]:
        """(messages with inline media as bytes, decoded pixels the request's media will take). Sizes come from
        headers only; a source that cannot be read is left for the loader to report."""
        total, out = 0, []
        frame_cap = min(max_num_frames or self.max_frames, self.max_frames)
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, list):
                out.append(message)
                continue
            parts = []
            for part in content:
                kind = _kind(part)
                if kind is not None and isinstance(part.get(kind), (str, bytes)):
                    data, pixels = _probe(part[kind], kind, frame_cap, max_bytes)
                    total += pixels
                    part = {**part, kind: data}
                parts.append(part)
            out.append({**message, "content": parts})
        if total > self.max_pixels:
            raise InputError(f"the request's images and video frames hold {total} pixels, over this server's limit "
                             f"of {self.max_pixels} pixels per request (--max-request-pixels)")
        return out, total


class PixelBudget:
    """Pixels of media held by requests in flight; thread-safe."""

    def __init__(self, limit: int):
        self.limit, self.in_flight = limit, 0
        self._lock = threading.Lock()

    def acquire(self, pixels: int) -> bool:
        with self._lock:
            if pixels and self.in_flight + pixels > self.limit:
                return False
            self.in_flight += pixels
            return True

    def release(self, pixels: int) -> None:
        with self._lock:
            self.in_flight -= pixels


def media_parts(messages: list):
    """(part, "image" | "video") for every media part of the messages."""
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            kind = _kind(part)
            if kind is not None:
                yield part, kind


def _kind(part) -> str | None:
    from .media_policy import PART_KINDS

    if not isinstance(part, dict):
        return None
    kind = part.get("type") or next((k for k in PART_KINDS if k in part), None)
    kind = kind.removesuffix("_url") if isinstance(kind, str) else None
    return kind if kind in ("image", "video") else None


def _probe(source: str | bytes, kind: str, frame_cap: int, max_bytes: int) -> tuple[str | bytes, int]:
    import av
    from PIL import Image

    from ..processing.media import read_source

    error = InputError
    try:
        data = read_source(source, max_bytes=max_bytes, timeout=0, error=error)
    except InputError:
        return source, 0  # the loader reports it, with its own message
    handle = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        if kind == "image":
            with Image.open(handle) as image:  # the header only
                width, height = image.size
            return data, width * height
        with av.open(handle, mode="r") as container:
            if not container.streams.video:
                return data, 0
            stream = container.streams.video[0]
            frames = min(stream.frames or frame_cap, frame_cap)
            return data, stream.width * stream.height * frames
    except Exception:  # noqa: BLE001 - unreadable media: the loader gives the precise error
        return data, 0
