"""Normalize chat messages (model-card or OpenAI style) into what the chat templates expect.

Media are not loaded here: images and videos are replaced by placeholders and their sources are returned in prompt
order, so the k-th image placeholder in the rendered prompt belongs to `images[k]` (likewise for videos).
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from minicpmv.errors import InputError

# What 4.0/4.5's processor looks for in the prompt: one marker per image (their templates only concatenate strings).
IMAGE_MARKER = "(<image>./</image>)"
# 4.0/4.5 have no video token; the model card passes frames as images. This marker stands for one whole video until
# the processor knows its frames (and 4.5's temporal groups) and expands it.
VIDEO_MARKER = "(<video>./</video>)"

_ROLES = {"system", "user", "assistant", "tool"}
_KEPT_KEYS = ("name", "tool_call_id")
# Dict part keys that identify the part's kind when `type` is missing, in priority order.
_TYPE_BY_KEY = ("image_url", "image", "video_url", "video", "text")


class NormalizedMessages(NamedTuple):
    messages: list[dict]  # template-ready messages
    images: list[Any]  # image sources in prompt order: PIL images, arrays, bytes, paths, URLs, data URLs
    videos: list[Any]  # video sources in prompt order: paths, URLs, or lists of frames


def normalize_messages(messages: list[dict], *, content_format: str = "list") -> NormalizedMessages:
    """content_format "list" (4.6 templates: typed parts) or "string" (4.0/4.5: text with IMAGE_MARKER/VIDEO_MARKER).

    Take it from `ChatTemplate.content_format`.
    """
    if content_format not in ("list", "string"):
        raise ValueError(f"content_format must be 'list' or 'string', got {content_format!r}")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages must be a non-empty list")
    images, videos, out = [], [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InputError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        role = message.get("role")
        role = "system" if role == "developer" else role  # OpenAI's newer name for the system role
        if role not in _ROLES:
            raise InputError(f"messages[{i}]: unknown role {message.get('role')!r} (expected one of {sorted(_ROLES)})")
        if role == "system" and i != 0:
            raise InputError(f"messages[{i}]: a system message is only allowed first")
        parts = _content_parts(message.get("content"), role, f"messages[{i}]")
        if role == "system" and any(kind != "text" for kind, _ in parts or ()):
            raise InputError(f"messages[{i}]: a system message cannot contain images or videos")
        for kind, value in parts or ():
            if kind == "image":
                images.append(value)
            elif kind == "video":
                videos.append(value)
        norm = {"role": role, "content": _render_parts(message.get("content"), parts, content_format)}
        norm.update({k: message[k] for k in _KEPT_KEYS if message.get(k) is not None})
        if role == "assistant":
            norm.update(_assistant_extras(message, f"messages[{i}]"))
        out.append(norm)
    return NormalizedMessages(out, images, videos)


def _content_parts(content: Any, role: str, where: str) -> list[tuple[str, Any]] | None:
    """(kind, value) pairs, kind in text/image/video; None for plain string content (kept verbatim)."""
    if isinstance(content, str):
        return None
    if content is None:
        if role in ("assistant", "tool"):  # an assistant turn that only calls tools has content None
            return []
        raise InputError(f"{where}: a {role} message needs content")
    if not isinstance(content, (list, tuple)):
        raise InputError(f"{where}: content must be a string or a list, got {type(content).__name__}")
    return [_part(item, f"{where}.content[{j}]") for j, item in enumerate(content)]


def _part(item: Any, where: str) -> tuple[str, Any]:
    if isinstance(item, str):  # model-card style: bare strings are text
        return "text", item
    if not isinstance(item, dict):
        if _is_image_object(item):  # model-card style: bare PIL images (or arrays / encoded bytes)
            return "image", item
        raise InputError(f"{where}: unsupported content item of type {type(item).__name__}")
    kind = item.get("type") or next((k for k in _TYPE_BY_KEY if k in item), None)
    if kind == "text":
        if not isinstance(item.get("text"), str):
            raise InputError(f"{where}: a text part needs a string 'text'")
        return "text", item["text"]
    if kind in ("image", "video"):
        source = next((item[k] for k in (kind, "url", "path") if item.get(k) is not None), None)
        if source is None:
            raise InputError(f"{where}: an {kind} part needs '{kind}', 'url' or 'path'")
        return kind, source
    if kind in ("image_url", "video_url"):
        value = item.get(kind)
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str) or not url:
            raise InputError(f"{where}: '{kind}' must be a URL string or {{'url': ...}}")
        return kind.removesuffix("_url"), url
    raise InputError(f"{where}: unknown content part type {kind!r}")


def _is_image_object(item: Any) -> bool:
    if isinstance(item, (bytes, bytearray)):
        return True
    if hasattr(item, "shape") and hasattr(item, "dtype"):  # numpy array / tensor of pixels
        return True
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(item, Image.Image)


def _render_parts(content: Any, parts: list[tuple[str, Any]] | None, content_format: str) -> Any:
    if parts is None:
        return content  # string content as given
    if content_format == "list":
        return [{"type": "text", "text": v} if kind == "text" else {"type": kind} for kind, v in parts]
    markers = {"image": IMAGE_MARKER, "video": VIDEO_MARKER}
    return "\n".join(v if kind == "text" else markers[kind] for kind, v in parts)  # model-card chat() joins by "\n"


def _assistant_extras(message: dict, where: str) -> dict:
    extras = {}
    reasoning = next((message[k] for k in ("reasoning_content", "reasoning") if message.get(k) is not None), None)
    if reasoning is not None:
        if not isinstance(reasoning, str):
            raise InputError(f"{where}: reasoning_content must be a string")
        # 4.6 templates read `reasoning_content`, the 4.5 template reads `reasoning`.
        extras["reasoning_content"] = extras["reasoning"] = reasoning
    calls = message.get("tool_calls")
    if calls:
        if not isinstance(calls, (list, tuple)):
            raise InputError(f"{where}: tool_calls must be a list")
        extras["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
    return extras


def _tool_call(call: Any, where: str) -> dict:
    """OpenAI tool call -> {"id", "type": "function", "function": {"name", "arguments": dict}}.

    Arguments become a dict because the 4.6 template iterates them as `arguments|items` (one <parameter> each).
    """
    if not isinstance(call, dict):
        raise InputError(f"{where}: a tool call must be a dict")
    function = call.get("function", call)  # also accept the flat {"name", "arguments"} form
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise InputError(f"{where}: a tool call needs a function name")
    arguments = function.get("arguments")
    if arguments is None or arguments == "":
        arguments = {}
    elif isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: arguments are not valid JSON: {e}") from e
    if not isinstance(arguments, dict):
        raise InputError(f"{where}: arguments must be a JSON object")
    out = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call.get("id") is not None:
        out = {"id": call["id"], **out}
    return out
