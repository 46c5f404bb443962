"""Small tensors derived from parameters, computed once instead of on every call.

A decode step runs each layer on a single row, where every extra tensor op costs a few
microseconds of dispatch and nothing else; terms like Qwen3.5's norm scale (1 + w) or the
DeltaNet decay rate -exp(A_log) are the same on every call. They are recomputed whenever the
parameter is replaced (another tensor object, even one reusing the old memory), or its storage
swapped or written in place (loading, dtype changes, tests that copy weights in)."""
from __future__ import annotations

import weakref
from collections.abc import Callable

import torch


class Derived:
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn
        self.source = None  # weak reference to the parameter the value was computed from
        self.key = None
        self.value = None

    def __call__(self, param: torch.Tensor) -> torch.Tensor:
        key = (param.data_ptr(), param._version, param.dtype)
        if self.source is None or self.source() is not param or key != self.key:
            with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable in any mode
                self.value = self.fn(param.detach())
            self.source, self.key = weakref.ref(param), key
        return self.value
