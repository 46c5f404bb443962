"""Reused scratch buffers for the engine's one compute thread: a large temporary that every call
needs (a dequantized block, an upcast weight, gathered cached keys) is written into a flat buffer
kept per purpose and grown on demand, instead of a fresh allocation per call, which costs page
faults and, for the biggest ones, more than the work written into it."""
from __future__ import annotations

import torch

_buffers: dict = {}  # (purpose, dtype, device) -> flat buffer


def scratch(purpose: str, numel: int, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """A flat tensor of `numel` elements, valid until the next call for the same purpose."""
    key = (purpose, dtype, torch.device(device))
    buf = _buffers.get(key)
    if buf is None or buf.numel() < numel:
        # a plain tensor even when first needed under inference_mode: an inference tensor could
        # not be written again by a later call made outside it (a caller using torch.no_grad)
        with torch.inference_mode(False):
            buf = _buffers[key] = torch.empty(max(numel, 1), dtype=dtype, device=device)
    return buf[:numel]
