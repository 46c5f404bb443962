"""GPTQLinear: a GPTQ-quantized linear layer whose buffers carry the checkpoint's names
(`qweight`, `qzeros`, `scales`, `g_idx`, optional `bias`), so `load_weights` fills it like any
other module. After loading, `prepare()` builds the runtime form once per layer:

* "cpu_int4" (CPU, 4-bit): the int4 weights multiplied as transformers + gptqmodel 7.7 do on the CPU
  at hand (`cpu_int4_math`, from cpu/isa.py's level; docs/findings.md has the measurements). torch's
  CPU int4 weight-only kernel (`_convert_weight_to_int4pack_for_cpu` + `_weight_int4pack_mm_for_cpu`)
  computes x @ ((q - 8) * scale + zero)^T, so GPTQ's (q - z) * s becomes zero = (8 - z) * s.
  Which arithmetic follows the kernel gptqmodel picks for the layer there:
  - BF16_SCALES (AVX2 CPUs; gptqmodel's TorchAtenLinear): the kernel in the activation dtype, its
    scale/zero table rounded to bf16 (or fp16 for fp16 activations). fp32 activations are cast to
    `kernel_dtype` (bf16) and the result cast back. fp16 stays fp16, a ~25x slower path on AVX2.
  - FP32_SCALES (AVX512-BF16 CPUs; gptqmodel's TorchCpuAvx512Linear): per group g, the fp32 dot
    product of the activations with the integers (q - z), then y = fma(that, s_g, y) in fp32 over the
    groups in order, the bias added in fp32, one rounding of y to bf16 (the kernel's own order; an
    unfactored sum over x * s * (q - z) rounds ~1 output in 2e4 to the neighbouring bf16). The codes
    are kept unpacked (1 byte per weight, grouped order) and multiplied per group by one batched
    fp32 GEMM. fp32 activations take the same arithmetic unrounded (no bf16 anywhere). fp16
    activations, which that kernel refuses, meet the fp16-rounded weight s * (q - z), laid out [K, N],
    in an fp16 matmul, as gptqmodel then does.
  Act-order (a non-trivial g_idx) permutes the input rows once so every group is contiguous,
  and each forward gathers x's columns in that order. Group sizes the kernel lacks (-1, 512, ...)
  are split into kernel groups of 256/128/64/32 that repeat the same scale and zero.
* "cuda_int4" (CUDA, 4-bit): torch's tinygemm kernel (`_convert_weight_to_int4pack` +
  `_weight_int4pack_mm`, bf16 activations, same (q - 8) * scale + zero form). This machine has
  no GPU, so the path is unverified here: `prepare` runs one probe product per layer against
  the dequantized weight and falls back to "dequant" (with a warning) if they disagree.
* "dequant": anything else (2/8-bit, out_features not a multiple of 16): the weight is
  dequantized per call from 8-bit codes kept for the layer (CPU) or straight from `qweight`
  (GPU), then an ordinary F.linear in the activation dtype. Memory stays at the packed size.
* "dense": opt-in; dequantize once and keep the float weight (fast prefill, 4-8x the memory).
* "fp16_weight": what a model loaded with dtype float32 uses: exactly the math of transformers +
  gptqmodel in fp32, whose kernels dequantize each weight in the scales' dtype, s * (q - z) rounded
  once to fp16, and multiply in fp32. The fp16 weight is dequantized once and kept in fbgemm's
  packed fp16 form (fp32 arithmetic, layers/fp16_packed.py) where torch has fbgemm, else as a plain
  fp16 tensor upcast per call. 4x the memory of the int4 kernels; no bf16 anywhere.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import fp16_packed
from .gptq_format import GPTQSpec, default_g_idx, unpack_gptq

_KERNEL_GROUPS = (256, 128, 64, 32)
BACKENDS = ("auto", "cpu_int4", "cuda_int4", "dequant", "dense", "fp16_weight")
# how "cpu_int4" multiplies half-precision activations (see the module docstring)
BF16_SCALES, FP32_SCALES = "bf16-scales", "fp32-scales"


def cpu_int4_math(layer: "GPTQLinear", isa: str | None = None) -> str:
    """The arithmetic transformers + gptqmodel 7.7 use for this layer's half-precision activations
    on this CPU: its AVX512-BF16 kernel (fp32 scales) where the CPU has AVX512-BF16 and the layer fits
    that kernel (out_features % 32 == 0, whole groups), else torch's int4 kernel (bf16 scales).
    `isa` (or $MINICPMV_CPU_ISA) lowers the level, e.g. "avx2" brings back the AVX2 arithmetic."""
    from ..cpu.isa import detect

    fits = layer.out_features % 32 == 0 and layer.in_features % layer.spec.group_len(layer.in_features) == 0
    return FP32_SCALES if fits and detect(isa).at_least("avx512_bf16") else BF16_SCALES


def _has_cpu_int4_kernel() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


class GPTQLinear(nn.Module):
    """y = x @ dequant(qweight)^T (+ bias), with GPTQ's packed int layout."""

    def __init__(self, in_features: int, out_features: int, spec: GPTQSpec, bias: bool = False,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        shapes = spec.shapes(in_features, out_features)
        self.register_buffer("qweight", torch.zeros(shapes["qweight"], dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(shapes["qzeros"], dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(shapes["scales"], dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.zeros(shapes["g_idx"], dtype=torch.int32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device))
        else:
            self.bias = None
        self.backend: str | None = None
        # BF16_SCALES math: activation dtype fed to the CPU int4 kernel for fp32/bf16 inputs (bf16 is
        # its fast path; float32 is exact but ~25-40x slower on AVX2). fp16 inputs always run in fp16.
        self.kernel_dtype = torch.bfloat16
        self._rt: dict[str, torch.Tensor] = {}

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, "
                f"group_size={s.group_size}, sym={s.sym}, desc_act={s.desc_act}, format={s.format}, "
                f"backend={self.backend}")

    # -- weights ---------------------------------------------------------------------------
    def codes_and_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [K, N], true zero points [G, N]) as int32, unpacked from the buffers."""
        return unpack_gptq(self.qweight, self.qzeros, self.spec.bits, self.spec.format)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [N, K] this layer represents (fp32 math, then `dtype`)."""
        codes, zeros = self.codes_and_zeros()
        g = self.g_idx.long()
        wt = self.scales.float()[g] * (codes.float() - zeros.float()[g])
        return wt.t().contiguous().to(dtype)

    def _contiguous_groups(self) -> tuple[torch.Tensor | None, int] | None:
        """(input permutation or None, group length) making every group a contiguous run of
        equal length; None when g_idx does not allow that."""
        K, gl = self.in_features, self.spec.group_len(self.in_features)
        if K % gl:
            return None
        g = self.g_idx.long().cpu()
        if torch.equal(g, torch.arange(K) // gl):
            return None, gl
        perm = torch.argsort(g, stable=True)
        if not torch.equal(g[perm], torch.arange(K) // gl):
            return None
        return perm, gl

    def _int4_plan(self, device_type: str):
        """(input permutation or None, group length, kernel group) when torch's int4 kernel for
        `device_type` can run this layer on its current device, else None."""
        if self.spec.bits != 4 or self.qweight.device.type != device_type:
            return None
        if device_type == "cpu":
            if self.out_features % 16 or not _has_cpu_int4_kernel():
                return None
        elif device_type == "cuda":
            if self.out_features % 8 or self.in_features % 32 or not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
                return None
        else:
            return None
        groups = self._contiguous_groups()
        if groups is None:
            return None
        perm, gl = groups
        kg = next((k for k in _KERNEL_GROUPS if gl % k == 0), None)
        return None if kg is None else (perm, gl, kg)

    def _cpu_int4_plan(self):
        return self._int4_plan("cpu")

    def choose_backend(self, backend: str = "auto") -> str:
        if backend not in BACKENDS:
            raise ValueError(f"GPTQ backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "auto":
            if self._int4_plan("cpu") is not None:
                return "cpu_int4"
            if self._int4_plan("cuda") is not None:
                return "cuda_int4"
            return "dequant"
        if backend == "cuda_int4" and self._int4_plan("cuda") is None:
            raise ValueError(f"the CUDA int4 kernel cannot run this layer ({self.extra_repr()})")
        if backend == "cpu_int4" and self._cpu_int4_plan() is None:
            raise ValueError(f"the CPU int4 kernel cannot run this layer ({self.extra_repr()}): it needs 4 bits, "
                             f"weights on the CPU, out_features % 16 == 0 and equal contiguous groups of a "
                             f"multiple of 32 inputs")
        return backend

    def finish_loading(self) -> None:
        """After the checkpoint loaded: a g_idx older checkpoints omit becomes the trivial one; a
        missing bias is an error."""
        if self.g_idx.is_meta:
            self.g_idx = default_g_idx(self.in_features, self.spec.group_size).to(self.qweight.device)
        if self.bias is not None and self.bias.is_meta:
            raise ValueError("the checkpoint lacks the bias of a GPTQ linear that has one")

    @torch.no_grad()
    def prepare(self, backend: str = "auto", isa: str | None = None) -> "GPTQLinear":
        """Build the runtime form from the loaded buffers (call once, after loading). `isa` lowers
        the CPU level the "cpu_int4" arithmetic is chosen for (see `cpu_int4_math`)."""
        self.finish_loading()
        backend = self.choose_backend(backend)
        self._rt = {}
        codes, zeros = self.codes_and_zeros()  # [K, N], [G, N]
        if backend in ("cpu_int4", "cuda_int4"):
            perm, gl, kg = self._int4_plan(backend[:-5])
            g = self.g_idx.long()
            if perm is not None:
                codes = codes[perm]
                self._rt["perm"] = perm.to(self.qweight.device)
                g = g[perm]
            if backend == "cpu_int4" and cpu_int4_math(self, isa) == FP32_SCALES:
                # gptqmodel's grouped fp32 arithmetic: codes [K, N] in grouped order, one (zero, scale)
                # row per group of gl inputs
                self._rt["math"] = FP32_SCALES
                self._rt["gcodes"] = codes.to(torch.uint8).contiguous()
                self._rt["gzeros"] = zeros[g[::gl]].float().contiguous()
                self._rt["gscales"] = self.scales[g[::gl]].float().contiguous()
                if perm is not None:
                    self._rt["unperm"] = torch.argsort(perm)
                self.backend = backend
                return self
            # one (scale, zero) row per kernel group of kg inputs; the kernel's own dtype is set
            # per call (see _sz)
            rows = g[::kg]
            self._rt["s"] = self.scales[rows].contiguous()
            self._rt["z"] = zeros[rows].to(torch.int16).contiguous()
            self._rt["group"] = kg
            if backend == "cpu_int4":
                self._rt["math"] = BF16_SCALES
                self._rt["packed"] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous(), 1)
            else:
                # tinygemm takes [N, K/2] uint8 with the even input in the high nibble
                q = codes.t().contiguous()
                u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
                tiles = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)
                self._rt["packed"] = torch.ops.aten._convert_weight_to_int4pack(u8, tiles)
                if not self._cuda_probe():  # never run an unverified kernel layout
                    warnings.warn(f"CUDA int4 kernel disagrees with the dequantized weight for {self.extra_repr()}; "
                                  f"using per-call dequantization")
                    return self.prepare("dequant")
        elif backend == "dequant" and self.qweight.device.type == "cpu":
            self._rt["codes"] = codes.t().to(torch.uint8 if self.spec.bits <= 8 else torch.int16).contiguous()
            self._rt["zeros"] = zeros.t().float().contiguous()  # [N, G]
            self._rt["scales"] = self.scales.t().float().contiguous()
        elif backend == "dense":
            self._rt["weight"] = self.dequantize(torch.float32)
        elif backend == "fp16_weight":
            w16 = self.dequantize(torch.float32).half()  # s * (q - z) is exact in fp32: one rounding, as gptqmodel
            if self.qweight.device.type == "cpu" and fp16_packed.available():
                self._rt["packed"] = fp16_packed.PackedFP16Linear(w16, self.bias)
            else:
                self._rt["weight16"] = w16
        self.backend = backend
        return self

    def _cuda_int4_mm(self, x2: torch.Tensor) -> torch.Tensor:
        rt = self._rt
        if "perm" in rt:
            x2 = x2.index_select(1, rt["perm"])
        return torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), rt["packed"], rt["group"],
                                                  self._sz(torch.bfloat16))

    def _cuda_probe(self) -> bool:
        """One random product through the CUDA kernel against the dequantized weight."""
        try:
            x = torch.randn(3, self.in_features, device=self.qweight.device, dtype=torch.bfloat16)
            y = self._cuda_int4_mm(x).float()
        except RuntimeError:
            return False
        ref = x.float() @ self.dequantize(torch.float32).t()
        return bool(((y - ref).norm() / ref.norm().clamp_min(1e-12)) < 2e-2)

    def _sz(self, dtype: torch.dtype) -> torch.Tensor:
        """The kernel's [groups, N, 2] (scale, zero) table in `dtype`: scales are first rounded to
        `dtype`, then zero = (8 - z) * scale in that dtype (as GPTQModel's aten path does)."""
        key = f"sz_{dtype}"
        if key not in self._rt:
            s = self._rt["s"].to(dtype)
            self._rt[key] = torch.stack([s, (8 - self._rt["z"]).to(dtype) * s], dim=-1).contiguous()
        return self._rt[key]

    def _dequant_now(self, dtype: torch.dtype) -> torch.Tensor:
        rt = self._rt
        if "codes" not in rt:  # GPU: unpack from the packed buffers on the device
            return self.dequantize(dtype)
        g = self.g_idx.long()
        w = (rt["codes"].float() - rt["zeros"][:, g]).mul_(rt["scales"][:, g])
        return w.to(dtype)

    def _fp32_scales_mm(self, x2: torch.Tensor) -> torch.Tensor:
        """FP32_SCALES: y = sum over groups g, in order, of fma(x_g . (q - z)_g, s_g, y) in fp32, the
        bias added in fp32, one rounding to x2's dtype (gptqmodel's AVX512-BF16 kernel factors each
        group's scale out of its integer dot product the same way); fp16 x2 meets the fp16-rounded
        weight s * (q - z) in an fp16 matmul, as gptqmodel does for fp16 activations."""
        rt = self._rt
        G, N = rt["gscales"].shape[0], self.out_features
        d = rt["gcodes"].float().view(G, -1, N).sub_(rt["gzeros"].unsqueeze(1))  # (q - z) per group, exact
        if x2.dtype == torch.float16:
            w = (d * rt["gscales"].unsqueeze(1)).view(-1, N)  # s * (q - z) [K, N], exact in fp32
            if "unperm" in rt:
                w = w.index_select(0, rt["unperm"])
            # one rounding to fp16, laid out [K, N] as gptqmodel's (the fp16 GEMM's result depends on the
            # weight's layout: F.linear on the [N, K] weight differs in ~1e-3 of the outputs)
            y = torch.matmul(x2, w.half())
            return y if self.bias is None else y + self.bias.half()
        xf = x2.float()
        if "perm" in rt:
            xf = xf.index_select(1, rt["perm"])
        M = xf.shape[0]
        s64 = rt["gscales"].double()
        out = torch.empty(M, N, dtype=torch.float32)
        for r in range(0, M, 256):  # bounded [G, rows, N] partial products
            part = torch.bmm(xf[r:r + 256].view(-1, G, d.shape[1]).transpose(0, 1), d)
            acc = torch.zeros(part.shape[1], N, dtype=torch.float64)
            for j in range(G):  # fp32 fma: the product is exact in fp64, then one rounding to fp32
                acc = (part[j].double() * s64[j] + acc).float().double()
            out[r:r + 256] = acc
        if self.bias is not None:
            out += self.bias.float()
        return out.to(x2.dtype)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend is None:
            self.prepare()
        shape = x.shape
        if self.backend == "cpu_int4" and self._rt["math"] == FP32_SCALES:
            y = self._fp32_scales_mm(x.reshape(-1, self.in_features))
            return y.view(*shape[:-1], self.out_features)
        if self.backend == "cpu_int4":
            rt = self._rt
            x2 = x.reshape(-1, self.in_features)
            if "perm" in rt:
                x2 = x2.index_select(1, rt["perm"])
            kd = torch.float16 if x.dtype == torch.float16 else self.kernel_dtype
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(kd).contiguous(), rt["packed"], rt["group"],
                                                          self._sz(kd))
            y = y.to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
            return y.view(*shape[:-1], self.out_features)
        if self.backend == "cuda_int4":
            y = self._cuda_int4_mm(x.reshape(-1, self.in_features)).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
            return y.view(*shape[:-1], self.out_features)
        if self.backend == "fp16_weight":
            if "packed" in self._rt and x.dtype == torch.float32:
                y = self._rt["packed"](x.reshape(-1, self.in_features))
                return y.view(*shape[:-1], self.out_features)
            w = self._rt["weight16"].to(x.dtype) if "weight16" in self._rt else self.dequantize(torch.float32).half()
            w = w.to(x.dtype)
        elif self.backend == "dense":
            w = self._rt["weight"]
            if w.dtype != x.dtype:
                w = self._rt["weight"] = w.to(x.dtype)
        else:
            w = self._dequant_now(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], spec: GPTQSpec, in_features: int,
                     out_features: int) -> "GPTQLinear":
        """A layer holding the checkpoint tensors of `pack_gptq` (mostly for tests and tools)."""
        layer = cls(in_features, out_features, spec, bias="bias" in tensors, device="cpu")
        for name, t in tensors.items():
            setattr(layer, name, t.clone())
        return layer
