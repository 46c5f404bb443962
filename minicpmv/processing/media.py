"""Turn whatever a caller hands us (PIL image, path, URL, bytes, data URL) into pixels, failing with
an error that names the source and the problem. Limits are checked before pixels are decoded:
an image header tells its size, a video container tells its frame count."""
from __future__ import annotations

import base64
import binascii
import io
import os
import pathlib
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Union

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from minicpmv.errors import ImageError, InputError, VideoError
from minicpmv.processing.types import Video, VideoMeta

MediaSource = Union[str, pathlib.Path, bytes, bytearray, memoryview]

DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_TIMEOUT_S = 30.0


def _av_reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)


def _describe(src) -> str:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    text = str(src)
    if text.startswith("data:"):
        return f"data URL ({text[:30]}..., {len(text)} chars)"
    return text if len(text) <= 200 else text[:200] + "..."


def fetch_url(url: str, *, max_bytes: int, timeout: float, error: type[InputError]) -> bytes:
    """GET with a byte cap and an overall deadline (urllib's timeout is per socket read only)."""
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"User-Agent": "minicpmv"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise error(f"{url}: response is {int(declared)} bytes, over the limit of {max_bytes} bytes")
            chunks, size = [], 0
            while chunk := response.read(1 << 16):
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise error(f"{url}: response is over the limit of {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise error(f"{url}: download took longer than {timeout:g} s")
    except urllib.error.HTTPError as e:
        raise error(f"{url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise error(f"{url}: could not be fetched ({getattr(e, 'reason', e)})") from e
    return b"".join(chunks)


def decode_data_url(url: str, *, max_bytes: int, error: type[InputError]) -> bytes:
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise error(f"{_describe(url)}: malformed data URL (no comma)")
    if len(payload) * 3 // 4 > max_bytes:
        raise error(f"{_describe(url)}: payload is over the limit of {max_bytes} bytes")
    if header.endswith(";base64"):
        try:
            return base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise error(f"{_describe(url)}: invalid base64 payload ({e})") from e
    return urllib.parse.unquote_to_bytes(payload)


def read_source(src: MediaSource, *, max_bytes: int, timeout: float, error: type[InputError]) -> bytes | str:
    """Bytes for URLs, data URLs and byte buffers; a checked file path for local files."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    if isinstance(src, str) and src.startswith(("http://", "https://")):
        return fetch_url(src, max_bytes=max_bytes, timeout=timeout, error=error)
    if isinstance(src, str) and src.startswith("data:"):
        return decode_data_url(src, max_bytes=max_bytes, error=error)
    if isinstance(src, str) and src[:7].lower() == "file://":
        parts = urllib.parse.urlsplit(src)
        if parts.netloc not in ("", "localhost"):
            raise error(f"{_describe(src)}: file:// URLs must name a local file (file:///path), not host "
                        f"{parts.netloc!r}")
        src = urllib.parse.unquote(parts.path)
    if isinstance(src, (str, pathlib.Path)):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise error(f"{_describe(src)}: no such file")
        if os.path.getsize(path) > max_bytes:
            raise error(f"{path}: file is {os.path.getsize(path)} bytes, over the limit of {max_bytes} bytes")
        return path
    raise error(f"unsupported media source of type {type(src).__name__}")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (what transformers does for PIL input)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _check_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageError(f"{name}: image is {width}x{height} = {width * height} pixels, "
                         f"over the limit of {max_pixels} pixels")


def load_image(src: Image.Image | MediaSource, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_bytes: int = DEFAULT_MAX_BYTES, timeout: float = DEFAULT_TIMEOUT_S) -> Image.Image:
    """An RGB PIL image from a PIL image, path, file:// or http(s) URL, raw bytes or data URL."""
    name = _describe(src) if not isinstance(src, Image.Image) else "PIL image"
    if isinstance(src, Image.Image):
        _check_pixels(name, *src.size, max_pixels)
        return to_rgb(ImageOps.exif_transpose(src))
    data = read_source(src, max_bytes=max_bytes, timeout=timeout, error=ImageError)
    try:
        # Image.open only parses the header: the size is known before any pixel is decoded.
        image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: image is too large to decode safely ({e})") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: not a recognizable image file ({e})") from e
    _check_pixels(name, *image.size, max_pixels)
    try:
        image.load()
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: image is too large to decode safely ({e})") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ... on bad data
        raise ImageError(f"{name}: image data is corrupt or truncated ({e})") from e
    return to_rgb(ImageOps.exif_transpose(image))


def _probe(container, name: str) -> VideoMeta:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise VideoError(f"{name}: contains no video stream (streams: {', '.join(kinds)})")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise VideoError(f"{name}: video stream has no frame rate")
    total = stream.frames
    if not total:
        # Some containers (webm, mkv) do not store a frame count: count packets, no decoding.
        total = sum(1 for packet in container.demux(stream) if packet.size)
        container.seek(0)
    if not total:
        raise VideoError(f"{name}: video stream holds no frames")
    fps = float(rate)
    return VideoMeta(fps=fps, duration=total / fps, total_num_frames=int(total),
                     width=stream.width, height=stream.height)


def load_video(src: MediaSource | Video, *,
               frame_indices: list[int] | Callable[[VideoMeta], list[int]] | None = None,
               max_bytes: int = DEFAULT_MAX_BYTES, timeout: float = DEFAULT_TIMEOUT_S) -> Video:
    """Decode the frames a sampler asks for (all frames when frame_indices is None).

    frame_indices may be a callable that picks indices from the metadata, so only the chosen
    frames are ever converted to RGB and kept; decoding stops after the last one. Frame numbers
    count decoded frames from the start, as transformers' PyAV reader does."""
    if isinstance(src, Video):
        return src
    name = _describe(src)
    data = read_source(src, max_bytes=max_bytes, timeout=timeout, error=VideoError)
    if (len(data) if isinstance(data, bytes) else os.path.getsize(data)) == 0:
        raise VideoError(f"{name}: video is empty (0 bytes)")
    try:
        container = av.open(io.BytesIO(data) if isinstance(data, bytes) else data, mode="r")
    except av.FFmpegError as e:
        raise VideoError(f"{name}: not a readable video container ({_av_reason(e)})") from e
    with container:
        try:
            meta = _probe(container, name)
        except av.FFmpegError as e:
            raise VideoError(f"{name}: could not read the video stream ({_av_reason(e)})") from e
        wanted = frame_indices(meta) if callable(frame_indices) else frame_indices
        wanted = sorted(set(range(meta.total_num_frames) if wanted is None else wanted))
        frames = _decode(container, wanted, name)
    return Video(frames=frames, indices=wanted, meta=meta)


def _decode(container, wanted: list[int], name: str) -> np.ndarray:
    if not wanted:
        raise VideoError(f"{name}: no frames were selected")
    keep, decoded, last = set(wanted), {}, None
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    try:
        for i, frame in enumerate(container.decode(stream)):
            if i in keep:
                decoded[i] = frame.to_ndarray(format="rgb24")
            last = frame
            if i >= wanted[-1]:
                break
    except av.FFmpegError as e:
        raise VideoError(f"{name}: corrupt video data ({_av_reason(e)})") from e
    if last is None:
        raise VideoError(f"{name}: no decodable video frames")
    # The declared frame count can exceed what decodes; repeat the last frame for the missing tail.
    tail = last.to_ndarray(format="rgb24")
    return np.stack([decoded.get(i, tail) for i in wanted])
