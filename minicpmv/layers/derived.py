"""Small tensors derived from parameters, computed once instead of on every call.

A decode step runs each layer on a single row, where every extra tensor op costs a few
microseconds of dispatch and nothing else; terms like Qwen3.5's norm scale (1 + w) or the
DeltaNet decay rate -exp(A_log) are the same on every call. They are recomputed whenever the
parameter is replaced or written in place (loading, tests that copy weights in)."""
from __future__ import annotations

from collections.abc import Callable

import torch


class Derived:
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn
        self.key = None
        self.value = None

    def __call__(self, param: torch.Tensor) -> torch.Tensor:
        key = (param.data_ptr(), param._version, param.dtype)
        if key != self.key:
            with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable in any mode
                self.value = self.fn(param.detach())
            self.key = key
        return self.value
