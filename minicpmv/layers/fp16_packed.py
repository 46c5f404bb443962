"""fp16-packed weights with fp32 arithmetic (fbgemm), for the matrices that run once per token.

On x86 CPUs without native bf16 math, a decode step is a chain of GEMVs whose cost is the bytes
of weight they read. torch's bf16 GEMV is compute-bound there (AVX2: ~10-13 GB/s on 2 cores) and
MKL's fp32 GEMV runs on one core (~16 GB/s, and twice the bytes). fbgemm's fp16 GEMM keeps the
weight packed in fp16 blocks and converts it in registers (F16C) while accumulating in fp32:
measured on the 2-core AVX2 box (bench/ notes, torch 2.14.1), a 3584x1024 product at one row
takes 0.31 ms (24 GB/s) against 0.58 ms bf16 and 0.95 ms fp32, 8 rows 1.1 ms against 5.4 / 4.0
ms, and the 248k-row lm_head 28 ms against 45 / 62 ms. At hundreds of rows it reaches ~66
GFLOP/s, within ~15% of the fp32 GEMM, so prompts stay on it too.

Numerically this is fp32 math on fp16-rounded weights. Released checkpoints are bf16, whose
values convert to fp16 exactly unless they fall outside fp16's range (|w| > 65504, or below
~6e-5 where fp16 loses mantissa bits): matrices with out-of-range values are left unpacked.
"""
from __future__ import annotations

import torch
from torch import nn

FP16_MAX = 65504.0


def available() -> bool:
    """fbgemm ships in x86-64 builds of torch; ARM builds lack it (they keep the bf16 path)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


# fbgemm packs from an fp32 copy: tall matrices (the 248k-row lm_head) are packed in row blocks
# of at most this many fp32 bytes, so loading never stages a whole fp32 copy (1 GB for 4.6's
# head); a decode step pays one small concatenation of the blocks' outputs.
STAGING_BYTES = 256 << 20


class PackedFP16Linear(nn.Module):
    """y = x W^T + b with W held only in fbgemm's packed fp16 form. x and y are fp32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        rows = max(1, STAGING_BYTES // (4 * self.in_features))
        bias = None if bias is None else bias.detach().float()
        self.blocks = [torch.ops.quantized.linear_prepack_fp16(weight[i:i + rows].float(),
                                                               None if bias is None else bias[i:i + rows])
                       for i in range(0, self.out_features, rows)]
        self.block_rows = [min(rows, self.out_features - i) for i in range(0, self.out_features, rows)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x if x.dim() > 1 else x[None]  # the op wants a row dimension
        outs = [torch.ops.quantized.linear_dynamic_fp16(flat, block) for block in self.blocks]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, -1)
        return y if x.dim() > 1 else y[0]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp16 packed"


def pack_fp16(model: nn.Module, prefixes: tuple[str, ...]) -> int:
    """Replace every half-precision nn.Linear whose qualified name starts with one of `prefixes`
    by a PackedFP16Linear (in place; the unpacked weight is dropped unless something else, e.g.
    a tied embedding, still holds it). Returns how many linears were packed.

    Projections a module declares in `packed_fusions` (q/k/v, gate/up, DeltaNet's four input
    projections: they read the same input) are packed as one matrix (layers/weight_formats.py
    `swap_linears`): one GEMV instead of several saves per-call overhead, which is what decode
    is made of. One matrix at a time, so the peak stays at the model plus one matrix's fp32
    staging copy rather than two copies of every matrix."""
    from .weight_formats import swap_linears

    return swap_linears(model, prefixes, PackedFP16Linear, accept=packable)


def packable(linear: nn.Linear) -> bool:
    w = linear.weight
    return (w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16)
            and bool(w.abs().max() <= FP16_MAX))
