"""Routed MoE experts stored int8 or int4 (the formats of layers/weight_formats.py), quantized
while the checkpoint streams in: each expert's matrices are rounded as their tensors are read,
so a 16-bit MoE checkpoint larger than memory (the 35B-A3B: ~64 GB of bf16 experts) loads into
its 4-bit size with one layer's stored tensor as the only 16-bit staging.

Storage per projection is stacked over experts in the kernels' layouts (int4: codes [E, n_pad,
K/2] + scale/offset pairs [E, K/g, n_pad, 2]; int8: codes [E, N, K] + scales [E, N]), so expert
e's matrix is a view. Compute is grouped by expert like the 16-bit experts (layers/moe.py): the
tokens routed to one expert go through the quantized kernel on the stored bytes when they are few
(decode), through a dequantized copy and a GEMM in `gemm_dtype` when they are many (prompts)."""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from .moe import GroupedExperts
from .weight_formats import (KERNEL_ROWS, int4_buffers, int4_dequantize, int4_group, int4_quantize, int4_torch_mm,
                             int4_widened_product, int8_dequantize, int8_quantize)

PIECE = re.compile(r"^(\d+)\.(gate_proj|up_proj|down_proj)$")


class QuantExperts(GroupedExperts):
    """E SwiGLU experts (gate_up [2I, D] rows gate then up, down [D, I]) in `fmt` ("int8" or
    "int4", group `group`). Filled by `load_stream` with the checkpoint's fused tensors
    (`gate_up_proj` [E, 2I, D], `down_proj` [E, D, I]) or per-expert ones (`{e}.gate_proj` ...)."""

    gemm_dtype = torch.float32
    kernel_rows = KERNEL_ROWS  # set per format by the CPU plan (cpu/apply.py)
    native, native_rows = None, 0  # cpu/native.py's kernels and their row limit, as on QuantLinear

    def __init__(self, num_experts: int, hidden: int, intermediate: int, fmt: str, group: int = 64):
        super().__init__()
        if fmt not in ("int8", "int4"):
            raise ValueError(f"expert format must be int8 or int4, got {fmt!r}")
        self.num_experts, self.fmt = num_experts, fmt
        self.shapes = {"gate_up_proj": (2 * intermediate, hidden), "down_proj": (hidden, intermediate)}
        self.groups = {}
        for name, (n, k) in self.shapes.items():
            if fmt == "int4":
                g = int4_group(k, group)
                if g is None:
                    raise ValueError(f"int4 experts need widths that are multiples of 32; {name} has {k} inputs")
                self.groups[name] = g
                packed, sz = int4_buffers(n, k, g)
                self.register_buffer(f"{name}_q", packed.unsqueeze(0).repeat(num_experts, 1, 1))
                self.register_buffer(f"{name}_s", sz.unsqueeze(0).repeat(num_experts, 1, 1, 1))
            else:
                self.register_buffer(f"{name}_q", torch.empty(num_experts, n, k, dtype=torch.int8))
                self.register_buffer(f"{name}_s", torch.empty(num_experts, n, dtype=torch.bfloat16))
        self._loaded = {name: torch.zeros(num_experts, dtype=torch.bool) for name in self.shapes}
        self._pending: dict[int, dict[str, torch.Tensor]] = {}  # expert -> gate/up piece waiting for its pair

    # -- loading ------------------------------------------------------------------------------

    def load_stream(self, attr: str, tensor: torch.Tensor) -> None:
        """Quantize one checkpoint tensor into place: a fused stack or one expert's projection."""
        if attr in self.shapes:
            want = (self.num_experts, *self.shapes[attr])
            if tuple(tensor.shape) != want:
                raise ValueError(f"{attr}: checkpoint shape {tuple(tensor.shape)} != expected {want}")
            for e in range(self.num_experts):
                self._store(attr, e, tensor[e])
            return
        m = PIECE.match(attr)
        if m is None:
            raise KeyError(f"unexpected expert tensor {attr!r}")
        e, proj = int(m.group(1)), m.group(2)
        if e >= self.num_experts:
            raise KeyError(f"{attr}: expert {e} but the config has {self.num_experts} experts")
        n2, k = self.shapes["gate_up_proj"] if proj != "down_proj" else self.shapes["down_proj"]
        want = (n2 // 2, k) if proj != "down_proj" else (n2, k)
        if tuple(tensor.shape) != want:
            raise ValueError(f"{attr}: checkpoint shape {tuple(tensor.shape)} != expected {want}")
        if proj == "down_proj":
            self._store("down_proj", e, tensor)
            return
        pair = self._pending.setdefault(e, {})
        pair[proj] = tensor
        if len(pair) == 2:  # gate rows then up rows, quantized as one matrix
            del self._pending[e]
            self._store("gate_up_proj", e, torch.cat([pair["gate_proj"], pair["up_proj"]]))

    def _store(self, name: str, e: int, w: torch.Tensor) -> None:
        q, s = getattr(self, f"{name}_q")[e], getattr(self, f"{name}_s")[e]
        if self.fmt == "int4":
            int4_quantize(w, self.groups[name], q, s)
        else:
            int8_quantize(w, q, s)
        self._loaded[name][e] = True

    def stream_missing(self) -> str | None:
        """What the checkpoint did not provide (None when every expert matrix arrived)."""
        for name, done in self._loaded.items():
            if not bool(done.all()):
                missing = (~done).nonzero().flatten().tolist()
                return f"{name} of {len(missing)} experts (e.g. {missing[:3]})"
        return None

    # -- compute ------------------------------------------------------------------------------

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self._matmul("gate_up_proj", e, x).chunk(2, dim=-1)
        return self._matmul("down_proj", e, F.silu(gate) * up)

    def _matmul(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        n, k = self.shapes[name]
        q, s = getattr(self, f"{name}_q")[e], getattr(self, f"{name}_s")[e]
        if x.shape[0] <= self.native_rows and self.native is not None:
            xf = x.float().contiguous()
            y = (self.native.int4_mm(xf, q, s, self.groups[name])[:, :n] if self.fmt == "int4"
                 else self.native.int8_mm(xf, q, s))
            return y.to(x.dtype)
        if x.shape[0] <= self.kernel_rows:
            xb = x.to(torch.bfloat16)
            if self.fmt == "int4":
                y = int4_torch_mm(xb, q, self.groups[name], s, n)[:, :n]
            else:
                y = torch._weight_int8pack_mm(xb, q, s)
            return y.to(x.dtype)
        dt = self.gemm_dtype
        if self.fmt == "int4" and self.native is not None and dt in (torch.bfloat16, torch.float32):
            return int4_widened_product(self.native, x.to(dt), q, s, self.groups[name], 0, n).to(x.dtype)
        w = (int4_dequantize(q, s, self.groups[name], 0, n, dt) if self.fmt == "int4"
             else int8_dequantize(q, s, dt))
        return F.linear(x.to(dt), w).to(x.dtype)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def extra_repr(self) -> str:
        fmt = self.fmt if self.fmt == "int8" else f"int4 groups {sorted(set(self.groups.values()))}"
        return f"num_experts={self.num_experts}, {fmt}"
