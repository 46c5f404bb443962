"""The kernel chosen per op class on this CPU, from its level (cpu/isa.py) and, when a
calibration was run (cpu/calibrate.py), from what was measured here.

Op classes: vision GEMMs (tower, merger/resampler: run once per image), prefill GEMMs (the
per-token matrices at many rows), decode GEMVs (the same matrices at a few rows) and the
lm_head. Prefill and decode share one resident copy of each matrix, so one storage format
serves both; the decode kernel picks it (decode is where a chat spends its time), the prefill
kernel is the best one for that storage.

Rules without a calibration:
* AMX (bf16 tile units): vision and text matrices bf16, GEMMs in bf16 with fp32 accumulation
  (~6x fp32 on the Xeon of ../shared/perf.md); decode reads the bf16 copy (a bf16 GEMV).
* AVX512-BF16 without AMX, where the extension builds (cpu/native.py): vision and text matrices
  bf16, prompts' GEMMs in bf16 (vdpbf16ps, ~2.7x fp32's rate on the Zen 4 of 2026-12-02); one
  decode row multiplies bf16-rounded activations on vdpbf16ps (`bf16_dot`: ~1.1x fbgemm's fp16
  GEMV there, 1.4x the extension's exact FMA rows), the decode layers fused. Without the
  extension (or on ARM BF16 with fbgemm): the text matrices fbgemm fp16-packed (fp32 math), the
  fastest decode GEMV torch has there (a noisy 2x over torch's bf16 GEMV on a Zen 5 box).
* x86 with AVX2 (fbgemm): vision in fp32 on the bf16 weight widened per call, text matrices
  fbgemm fp16-packed with fp32 math (the AVX2-era path, measured in docs/performance.md).
* anything else: bf16 storage widened to fp32 for many rows, bf16 GEMV for few (layers/mixed.py).
With weights="int8"/"int4" the per-token matrices and the lm_head take that format whatever the
CPU, their prompt GEMMs in bf16 where the CPU has bf16 units, else fp32; their few-row products
run the AVX-512 extension, else the AVX2 module (cpu/native.py), else torch's kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layers import fp16_packed, prepacked
from ..layers.weight_formats import int4_layout_ok
from . import denormals, native
from .isa import CpuInfo, detect

# storage/kernel of the 16-bit per-token matrices
FP16_PACKED, BF16, WIDENED = "fp16-packed", "bf16", "bf16-widened"
WEIGHT_FORMATS = ("int8", "int4")
INT4_GROUP = 64
EVERY_ROW = 1 << 30  # a module row bound that every call fits
EMBEDDING_NOTE = "; a tied embedding reads it, an untied one is stored int8"
# the extension's set_prefetch modes for its decode products' weight streams, and how `minicpmv info` says them
PREFETCH = {"off": (0, "on the hardware prefetcher alone"), "l1": (1, "with software prefetch into L1"),
            "l2": (2, "with software prefetch into L2")}


@dataclass(frozen=True)
class KernelPlan:
    cpu: CpuInfo
    vision_bf16: bool          # vision GEMMs in bf16 (else fp32 on the widened weight)
    text16: str                # FP16_PACKED | BF16 | WIDENED, for 16-bit per-token matrices
    gemm_dtype: torch.dtype    # dtype of the GEMMs quantized matrices are widened to for prompts
    fused_norm: bool = False   # RMSNorms as one F.rms_norm call (layers/norm.py)
    source: str = "rules"      # "rules", or the calibration file that decided
    # up to this many rows an int8 / int4 matrix runs torch's kernel on its stored bytes; more rows
    # dequantize it and run a GEMM (the kernels' time grows with the rows, dequantizing does not)
    int8_rows: int = 16
    int4_rows: int = 16
    # few-row bf16/int8/int4 products through cpu/native.py's AVX-512 kernels (when they build)
    native_kernels: bool = False
    # prompt DeltaNet chunks with denormals flushed to zero (cpu/denormals.py), where the CPU can
    flush_denormals: bool = False
    # bf16 products of this many rows up to 16 (batched decode) on the extension's AMX tiles; 0: off
    amx_rows: int = 0
    # the bf16 vision matrices held in oneDNN's blocked layout (layers/prepacked.py), on x86 CPUs
    vision_prepacked: bool = False
    # bf16 decode rows on the extension's vdpbf16ps kernel, activations rounded to bf16 (AVX512-BF16
    # without AMX); else its FMA rows on exact fp32 activations
    bf16_dot: bool = False
    # with bf16_dot: bf16 products of up to this many rows (prompt chunks, batched decode) on those
    # vdpbf16ps rows instead of oneDNN (which reorders the plain weight inside every call)
    bf16_dot_rows: int = 0
    # with bf16_dot: the per-token bf16 matrices stored in the extension's tiles of 4 rows (one run
    # of memory per tile; the vdpbf16ps rows' layout, cpu/csrc/bf16_dot.cpp), oneDNN's prompt GEMMs
    # on a plain copy made per call
    bf16_tiles: bool = False
    # software prefetch ahead of the extension's decode streams (PREFETCH): the int8 / int4 one-row
    # walks and the int8 / vdpbf16ps tiles of several rows (and the AVX2 module's int8 / int4 rows).
    # Into L1 lifted the AMX Xeon's streams (10 -> 17-20 GB/s) and slowed the Zen 4's, where into L2
    # made int8 / int4 decode 1.16-1.24x faster than none and batched 16-bit decode 1.45x faster than
    # into L1; on a Zen 3 the AVX2 module's int8 / int4 decode ran 1.11-1.12x faster into L2 than
    # none (8 int8 sequences 1.27x)
    prefetch: str = "l1"
    # the vision tower's attention on the extension's vdpbf16ps kernel (cpu/csrc/flash_attn.cpp;
    # AVX512-BF16 without AMX: ~2x torch's bf16 SDPA on 1,024 patches on the Zen 4); else torch's SDPA
    vision_flash: bool = False
    # a prompt's causal attention in the text layers (grouped key heads, head dims up to 256) on the
    # extension's vdpbf16ps kernel in bf16, context and prompt keys in one pass; else torch's SDPA in
    # fp32 (the 16-bit plans keep activations fp32). Zen 4, 2 threads, the 4.6's 8 query / 2 key heads
    # of 256: 2.6-4.1x torch's fp32 SDPA on a fresh 512-2,048-token prompt, 1.4-2.8x its two flash calls
    # for a chunk after 512-16,384 cached tokens (casts included); prefill of 8,192 tokens 1.23x
    prompt_flash: bool = False
    # where the AVX-512 extension does not run: cpu/native.py's AVX2 module for few-row int8 / int4
    # products (and GPTQ int4; vpmaddubsw on activations rounded to int8 per 32 inputs), the norms,
    # the DeltaNet conv and rule, and the fused decode layers
    avx2_gemv: bool = False
    # up to this many rows an int8 / int4 matrix runs that module's kernel on its stored bytes (its
    # activations rounded to int8 per 32 inputs), prompts included; beyond, torch's kernel or a GEMM
    # on the widened matrix. The AVX-512 extension: 8 rows (the AMX Xeon's bf16 GEMM on widened blocks
    # wins beyond). The AVX2 module on a Zen 3, 2 threads, 6144 x 1024 matrices: int4 1.35-8x the
    # widened fp32 GEMM at 12-2,048 rows, int8 1.03-9x up to 384 rows and slower from 512
    # (docs/performance.md)
    module_int8_rows: int = native.ROWS
    module_int4_rows: int = native.ROWS

    @property
    def prepacks_vision(self) -> bool:
        return self.vision_bf16 and self.vision_prepacked and prepacked.available()

    def kernel_rows(self, fmt: str) -> int:
        return self.int4_rows if fmt == "int4" else self.int8_rows

    def module_rows(self, fmt: str) -> int:
        return self.module_int4_rows if fmt == "int4" else self.module_int8_rows

    def _module_rows_text(self, fmt: str) -> str:
        rows = self.module_rows(fmt)
        return "every row count" if rows >= EVERY_ROW else f"up to {rows} rows"

    def rows(self, weights: str | None = None, gptq: bool = False) -> list[tuple[str, str]]:
        """(op class, kernel) lines describing what a model loaded with `weights` (from a GPTQ
        checkpoint when `gptq`) runs."""
        attention = ("the extension's vdpbf16ps kernel (bf16 in, fp32 softmax and sums; torch's SDPA for "
                     f"fewer than {native.FLASH_MIN_KEYS} keys)" if self.vision_bf16 and self.vision_flash else
                     "torch's SDPA in bf16" if self.vision_bf16 else "torch's SDPA in fp32")
        vision = ("fp32 GEMM on the bf16 weights widened per call" if not self.vision_bf16 else
                  "bf16 GEMM, fp32 accumulation (bf16 weights in oneDNN's blocked layout, reordered at load)"
                  if self.prepacks_vision else "bf16 GEMM, fp32 accumulation (bf16 weights)")
        gemm = "bf16" if self.gemm_dtype == torch.bfloat16 else "fp32"
        few_rows = self.native_kernels or self.avx2_gemv  # an extension module for few-row int8 / int4 products
        described, unit = ((native.describe(), "VNNI") if self.native_kernels else (native.describe_avx2(), "vpmaddubsw"))
        if weights in WEIGHT_FORMATS:
            torch_kernel = "_weight_int8pack_mm" if weights == "int8" else "_weight_int4pack_mm_for_cpu"
            kernel_rows = self.kernel_rows(weights)
            module_rows = self._module_rows_text(weights)
            prefill = f"{weights} kernels up to {kernel_rows} rows, else widened per block + {gemm} GEMM"
            if few_rows and self.module_rows(weights) >= EVERY_ROW:
                prefill = f"the decode kernel below, {module_rows}"
            elif few_rows and self.module_rows(weights) > native.ROWS:
                prefill = f"the decode kernel below {module_rows}, else widened per block + {gemm} GEMM"
            elif few_rows and weights == "int4":  # its widening is fast: few rows stay on the kernel
                prefill = f"the extension {module_rows}, else W^T widened by it + {gemm} GEMM"
            decode = ("int8 weight-only per-channel: " if weights == "int8" else
                      f"int4 weight-only g{INT4_GROUP} asymmetric: ")
            if few_rows and (weights == "int4" or self.module_rows(weights) > native.ROWS):
                decode += f"{described}, activations rounded to int8 per 32 inputs ({unit}), {module_rows}"
            elif few_rows:
                decode += (f"{described}, activations rounded to int8 per 32 inputs ({unit}), {module_rows}, "
                           f"then torch's {torch_kernel} (bf16 activations)")
            else:
                decode += (f"torch's {torch_kernel}, bf16 activations" if weights == "int8" or int4_layout_ok() else
                           "the matrix widened per call + fp32 GEMM (torch's int4 kernel packs another layout here)")
            head = decode + EMBEDDING_NOTE
        elif self.text16 == FP16_PACKED:
            prefill = "fbgemm fp16-packed GEMM, fp32 math"
            decode = "fbgemm fp16-packed GEMV, fp32 math"
            head = decode
        elif self.text16 == BF16:
            prefill = "bf16 GEMM, fp32 accumulation"
            if self.native_kernels and self.bf16_dot and self.bf16_dot_rows:
                prefill += f" (up to {self.bf16_dot_rows} rows the decode GEMV's vdpbf16ps rows)"
            fma_rows = self.amx_rows - 1 if self.amx_rows else native.ROWS
            decode = ("bf16 GEMV, fp32 accumulation" if not self.native_kernels else
                      f"bf16 GEMV: {native.describe()} up to {max(fma_rows, self.bf16_dot_rows)} rows, activations "
                      "rounded to bf16 (AVX512-BF16 vdpbf16ps)" if self.bf16_dot else
                      f"bf16 GEMV: {native.describe()} up to {fma_rows} rows")
            if self.native_kernels and self.bf16_dot and self.bf16_tiles:
                decode += "; matrices stored in its tiles of 4 rows (oneDNN's prompt GEMMs on a plain copy per call)"
            if self.native_kernels and self.amx_rows:
                decode += f"; {self.amx_rows}-16 rows on its AMX tiles (bf16 activations)"
            head = decode
        else:
            prefill = "fp32 GEMM on the bf16 weights widened per call"
            decode = "bf16 GEMV (<= 4 rows), fp32 beyond"
            head = decode
        helpers = ("the extension" if self.native_kernels else "the AVX2 module" if self.avx2_gemv else None)
        norms = (f"one call each ({helpers}'s loop)" if helpers else
                 "F.rms_norm, one call each" if self.fused_norm else "five tensor ops each")
        # the fused layers multiply the module's formats: bf16 (AVX-512 only), int8, int4 (GPTQ moves
        # to int4), and fbgemm's fp16-packed matrices
        fused = helpers is not None and (weights in WEIGHT_FORMATS or gptq or self.text16 == FP16_PACKED
                                         or (self.native_kernels and self.text16 == BF16))
        prompt_attention = ("the extension's vdpbf16ps kernel (bf16 in, fp32 softmax and sums; cached keys and the "
                            "prompt's in one pass)" if self.prompt_flash and self.native_kernels else
                            "torch's SDPA")
        rows = [("vision GEMMs", vision), ("vision attention", attention), ("prefill GEMMs", prefill),
                ("prompt attention", prompt_attention), ("decode GEMVs", decode), ("lm_head", head),
                ("decode layers", f"one call of {helpers} per layer (norms, projections, conv + gated delta rule "
                 "or attention over the KV pool, MLP) for plain decode batches" if fused else "tensor ops"),
                ("prompt DeltaNet", f"the gated delta rule token by token in {helpers} (the decode step's "
                 "arithmetic), blocks of value columns in parallel"
                 if helpers else "the chunked gated delta rule (tensor ops)")]
        if gptq:
            rows.append(("GPTQ int4 layers", f"{described} {self._module_rows_text('int4')}"
                         + ("" if self.module_int4_rows >= EVERY_ROW else f", else W^T widened by it + {gemm} GEMM")
                         + " (codes kept, scales and offsets bf16)" if few_rows else
                         "torch's _weight_int4pack_mm_for_cpu in gptqmodel's arithmetic for this CPU"))
        if weights is not None:
            rows.append(("MoE experts", f"{weights}, quantized while loading, kernels as above; the router 16-bit"))
        why = native.unusable(self.cpu)
        extension = (f"{native.describe()}; int8 / int4 decode walks "
                     f"{PREFETCH[self.prefetch][1]}"
                     if self.native_kernels else f"off ({why or 'not chosen for this plan'})"
                     + (f"; int8 / int4 rows on {native.describe_avx2()}, {PREFETCH[self.prefetch][1]}"
                        if self.avx2_gemv else ""))
        rows += [("RMSNorms", norms), ("C++ extension", extension)]
        return rows + [("denormals", denormals.describe() if self.flush_denormals else "kept (IEEE)")]


def rule_plan(cpu: CpuInfo) -> KernelPlan:
    fbgemm = cpu.arch in ("x86_64", "AMD64") and cpu.at_least("avx2") and fp16_packed.available()
    fused_norm = cpu.at_least("avx512")  # F.rms_norm measured slower than five ops on the AVX2 box
    # int8 / int4 kernel up to these rows on AVX-512 (measured on the AMX Xeon: the int4 kernel
    # beats dequantize + bf16 GEMM up to ~100-150 rows, int8's up to ~22-26); elsewhere unmeasured: 16
    rows = {"int8_rows": 24, "int4_rows": 96} if cpu.at_least("avx512") else {}
    rows["native_kernels"] = native.unusable(cpu) is None
    rows["flush_denormals"] = denormals.supported()
    # AMX tiles for 5-16 rows: 1.1-1.3x the FMA kernel at 8 rows, 1.2x oneDNN at 12-16, slower at
    # 2-4 (AMX Xeon, 2 threads, matrices streamed from memory; docs/performance.md)
    rows["amx_rows"] = 5 if rows["native_kernels"] and cpu.at_least("amx") else 0
    # oneDNN's reordered bf16 weights: 1.1-1.5x F.linear on the vision shapes (AMX Xeon); x86 only
    rows["vision_prepacked"] = cpu.arch in ("x86_64", "AMD64")
    # vdpbf16ps for one decode row: 1.4x the FMA rows on the Zen 4 (one sequential stream per thread);
    # not on AMX machines, whose FMA rows already stream at the memory's rate (unmeasured there)
    rows["bf16_dot"] = rows["native_kernels"] and cpu.at_least("avx512_bf16") and not cpu.at_least("amx")
    # ...and for up to 96 rows: the 4.6 text matrices streamed from memory, 2 threads, Zen 5: 1.7x
    # F.linear at 16 rows, 1.56x at 32, 1.18x at 85, even at 128 (docs/performance.md)
    rows["bf16_dot_rows"] = 96 if rows["bf16_dot"] else 0
    # ...on matrices stored in tiles of 4 rows: 8 decode rows of the 4.6's matrices 1.1-1.3x the
    # plain layout's, one row the same (Zen 5, 2 threads, cold; docs/performance.md)
    rows["bf16_tiles"] = rows["bf16_dot"]
    # the same unit for the vision tower's attention (torch's bf16 SDPA leaves it idle there); AMX
    # machines keep torch's SDPA, whose bf16 products run on the tiles (~2.7x its fp32 on the Xeon)
    rows["vision_flash"] = rows["bf16_dot"]
    # ...and for a prompt's attention in the text layers (torch's SDPA on AMX machines, unmeasured there)
    rows["prompt_flash"] = rows["bf16_dot"]
    # prefetch into L2 on AMD (measured on a Zen 4), into L1 elsewhere (measured on the AMX Xeon)
    rows["prefetch"] = "l2" if cpu.model.upper().startswith("AMD") else "l1"
    # no AVX-512 extension: the AVX2 module's int8 / int4 rows, 1.7-2.5x torch's kernels at 1-8 rows
    # on a Zen 3 (docs/performance.md)
    rows["avx2_gemv"] = not rows["native_kernels"] and native.avx2_unusable(cpu) is None
    # ...whose kernels beat a GEMM on the widened matrix for prompts too (Zen 3: int4 at every row count
    # measured, int8 up to 384 rows; docs/performance.md)
    rows["module_int8_rows"], rows["module_int4_rows"] = (384, EVERY_ROW) if rows["avx2_gemv"] else (native.ROWS,) * 2
    if cpu.at_least("amx") or (cpu.fast_bf16 and (not fbgemm or rows["native_kernels"])):
        return KernelPlan(cpu, vision_bf16=True, text16=BF16, gemm_dtype=torch.bfloat16, fused_norm=fused_norm, **rows)
    if cpu.fast_bf16:
        return KernelPlan(cpu, vision_bf16=True, text16=FP16_PACKED, gemm_dtype=torch.bfloat16, fused_norm=fused_norm,
                          **rows)
    if fbgemm:
        return KernelPlan(cpu, vision_bf16=False, text16=FP16_PACKED, gemm_dtype=torch.float32, fused_norm=fused_norm,
                          **rows)
    return KernelPlan(cpu, vision_bf16=False, text16=WIDENED, gemm_dtype=torch.float32,
                      native_kernels=rows["native_kernels"], flush_denormals=rows["flush_denormals"],
                      amx_rows=rows["amx_rows"], vision_prepacked=rows["vision_prepacked"], bf16_dot=rows["bf16_dot"],
                      bf16_dot_rows=rows["bf16_dot_rows"], prefetch=rows["prefetch"], vision_flash=rows["vision_flash"],
                      prompt_flash=rows["prompt_flash"],
                      avx2_gemv=rows["avx2_gemv"], module_int8_rows=rows["module_int8_rows"],
                      module_int4_rows=rows["module_int4_rows"])


def choose(isa: str | None = None, calibrate: bool | None = None) -> KernelPlan:
    """The plan for this CPU. `isa` (or $MINICPMV_CPU_ISA) lowers the level: the rules for that
    level apply and no calibration is consulted. Otherwise a calibration cached for this CPU and
    torch is used when present; $MINICPMV_CPU_CALIBRATE=1 runs one when none is cached,
    `calibrate=True` (minicpmv info --calibrate) runs a new one."""
    from . import calibrate as cal

    cpu = detect(isa)
    plan = rule_plan(cpu)
    if cpu.forced:
        return plan
    result = cal.load_or_run(cpu, run=cal.wanted(calibrate), force=bool(calibrate))
    return plan if result is None else cal.apply(plan, result)


def check_weights(weights: str | None) -> str | None:
    if weights in (None, "auto"):
        return None
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be auto (the checkpoint's precision) or one of {', '.join(WEIGHT_FORMATS)}; got {weights!r}")
    return weights
