"""What the operator decides at `minicpmv serve` time (one dataclass, filled by the CLI)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..processing.media import DEFAULT_MAX_PIXELS
from .media_limits import MediaLimits


@dataclass
class ServeConfig:
    served_model_names: list[str]
    api_key: str | None = None
    max_concurrency: int = 32  # sequences decoded together in one batch
    max_queue: int = 128  # sequences admitted beyond that, waiting; more is answered 429
    allow_url_fetch: bool = False
    allowed_local_media_path: Path | None = None
    media_max_bytes: int = 64 << 20
    media_fetch_timeout_s: float = 10.0
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_request_bytes: int = 100 << 20
    encoder_cache_bytes: int = 512 << 20
    prepare_threads: int = 2  # media decoding / templating off the event loop
    media_limits: MediaLimits = field(default_factory=MediaLimits)
    web_chat: bool = True  # the chat page at / (--no-web-chat turns it off)
    unescape_newlines: bool = False  # default of the request field of that name (--unescape-newlines)

    def __post_init__(self):
        if self.max_concurrency < 1 or self.max_queue < 0:
            raise ValueError("--max-concurrency must be >= 1 and --max-queue >= 0")
