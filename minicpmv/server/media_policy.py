"""Which media sources an HTTP client may name, decided before anything is read.

A request is untrusted input: the media loader would happily read any local file or fetch any
URL, so every image/video part is vetted here first and rewritten to a source the loader then
reads without further judgement:
  * data: URLs always pass (the body-size limit bounds them);
  * http(s) URLs only with --allow-url-fetch; they are downloaded here, with the byte and time
    limits of the policy, and handed on as bytes;
  * file:// URLs and bare paths only inside --allowed-local-media-path (symlinks resolved
    first, so a link cannot point out of the folder);
  * anything else is refused.
Runs on a worker thread (downloads block), never on the event loop.
"""
from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ImageError, InputError, VideoError
from ..processing.media import fetch_url

# Keys that name a part's kind when "type" is missing, as prompt.messages reads them.
PART_KINDS = ("image_url", "image", "video_url", "video", "text")


@dataclass(frozen=True)
class MediaPolicy:
    allow_url_fetch: bool = False
    allowed_local_path: Path | None = None
    max_bytes: int = 64 << 20
    timeout_s: float = 10.0

    def apply(self, messages: list[dict]) -> list[dict]:
        """Messages with every media part rewritten to {"type": kind, kind: vetted source}."""
        out = []
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                message = {**message, "content": [self._part(p, f"messages[{i}].content[{j}]")
                                                  for j, p in enumerate(content)]}
            out.append(message)
        return out

    def _part(self, item: Any, where: str) -> Any:
        if not isinstance(item, dict):
            return item
        kind = item.get("type") or next((k for k in PART_KINDS if k in item), None)
        if kind in ("image_url", "video_url"):
            value = item.get(kind)
            source = value.get("url") if isinstance(value, dict) else value
            kind = kind.removesuffix("_url")
        elif kind in ("image", "video"):
            source = next((item[k] for k in (kind, "url", "path") if item.get(k) is not None), None)
        else:
            return item
        if not isinstance(source, str) or not source:
            return item  # the message normaliser reports the malformed part
        return {"type": kind, kind: self.vet(source, kind, where)}

    def vet(self, source: str, kind: str, where: str) -> str | bytes:
        error = ImageError if kind == "image" else VideoError
        scheme = urllib.parse.urlsplit(source).scheme.lower()
        if scheme == "data":
            return source
        if scheme in ("http", "https"):
            if not self.allow_url_fetch:
                raise InputError(f"{where}: fetching http(s) {kind}s is turned off on this server (the operator can "
                                 f"start it with --allow-url-fetch); send the {kind} inline as a base64 data URL")
            return fetch_url(source, max_bytes=self.max_bytes, timeout=self.timeout_s, error=error)
        if scheme == "file":
            return self._local(urllib.parse.unquote(urllib.parse.urlsplit(source).path), kind, where)
        if scheme:
            raise InputError(f"{where}: unsupported {kind} URL scheme {scheme!r}; use a data URL"
                             f"{', an http(s) URL' if self.allow_url_fetch else ''}"
                             f"{' or a file path' if self.allowed_local_path else ''}")
        return self._local(source, kind, where)

    def _local(self, path: str, kind: str, where: str) -> str:
        if self.allowed_local_path is None:
            raise InputError(f"{where}: local {kind} paths are not allowed on this server (the operator can name a "
                             f"folder with --allowed-local-media-path); send the {kind} as a base64 data URL")
        root = self.allowed_local_path.resolve()
        resolved = Path(os.path.realpath(path))
        if not resolved.is_relative_to(root):
            raise InputError(f"{where}: {path!r} is outside the allowed media folder {str(root)!r}")
        return str(resolved)
