"""A short probe that times the candidate kernels on this CPU, cached on disk.

Two shapes stand for the op classes: a prompt/vision GEMM (256 x 1024 -> 2048) and a decode GEMV
(one row through 64 MB of 4096 x 2048 matrices, more than a usual L3, so it streams from memory as
decode does). Each candidate is timed as the median of a few calls (~2-4 s in all). The result is
cached per CPU model, flags, torch version and thread count in
$MINICPMV_CACHE_DIR (default $XDG_CACHE_HOME/minicpmv or ~/.cache/minicpmv), and used by every
later load on the same machine; `minicpmv info --calibrate` (or MINICPMV_CPU_CALIBRATE=1) runs it.

Timings on a shared machine are noisy: the probe picks between kernels whose speeds differ by
large factors (bf16 vs fp32 GEMM is ~8x either way depending on the CPU); close calls are
settled by the rules (a candidate must win by CLEAR_WIN to overturn them)."""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..layers import fp16_packed
from .isa import CpuInfo
from .plan import BF16, FP16_PACKED, WIDENED

ENV_CALIBRATE = "MINICPMV_CPU_CALIBRATE"
ENV_CACHE = "MINICPMV_CACHE_DIR"
CLEAR_WIN = 1.15  # a measured kernel replaces the rule's choice only when this much faster
VERSION = 3  # 3: the bf16 GEMV is the one decode runs (the extension's rows where they build)
QUANT_ROWS = (16, 24, 32, 48, 64, 96, 128, 192, 256)  # row counts probed for the int8/int4 kernel crossover


def cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minicpmv"


def cache_key(cpu: CpuInfo) -> dict:
    return {"version": VERSION, "cpu": cpu.model, "features": cpu.feature_line(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def cache_path(cpu: CpuInfo) -> Path:
    digest = hashlib.sha256(json.dumps(cache_key(cpu), sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"cpu-calibration-{digest}.json"


def wanted(calibrate: bool | None) -> bool:
    if calibrate is not None:
        return calibrate
    return os.environ.get(ENV_CALIBRATE, "").strip().lower() in ("1", "true", "yes", "on")


def _time(fn, min_s: float = 0.15, max_calls: int = 25) -> float:
    """Median milliseconds per call after one warm-up call."""
    fn()
    samples, start = [], time.perf_counter()
    while len(samples) < 3 or (time.perf_counter() - start < min_s and len(samples) < max_calls):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def probe(cpu: CpuInfo | None = None) -> dict:
    """Milliseconds per call of each candidate kernel (see the module docstring). The bf16 GEMV is
    the one the rules would give decode on `cpu` (this CPU when None): the extension's rows where
    they build, else torch's."""
    from ..layers.weight_formats import Bf16Linear, Int4Linear, Int8Linear
    from . import native
    from .apply import tune_bf16
    from .isa import detect
    from .plan import rule_plan

    plan = rule_plan(cpu or detect())
    kernels = native.quant_kernels(plan.cpu, progress=False) if plan.native_kernels else None

    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        x = torch.randn(256, 1024, generator=g)
        w = (torch.randn(2048, 1024, generator=g) * 0.03).bfloat16()
        wide = torch.empty(2048, 1024)
        gemm = {"fp32": _time(lambda: F.linear(x, wide.copy_(w))),
                "bf16": _time(lambda: F.linear(x.bfloat16(), w).float())}
        if fp16_packed.available():
            packed = fp16_packed.PackedFP16Linear(w, None)
            gemm[FP16_PACKED] = _time(lambda: packed(x))

        mats = [(torch.randn(4096, 2048, generator=g) * 0.03).bfloat16() for _ in range(4)]
        row = torch.randn(1, 2048, generator=g)
        lins = [Bf16Linear.of(m, None) for m in mats]
        for lin in lins:
            tune_bf16(lin, plan, kernels)
        gemv = {"bf16": _time(lambda: [lin(row) for lin in lins]) / len(lins)}
        del lins
        if fp16_packed.available():
            packs = [fp16_packed.PackedFP16Linear(m, None) for m in mats]
            gemv[FP16_PACKED] = _time(lambda: [p(row) for p in packs]) / len(mats)
            del packs
        q8 = [Int8Linear(m, None) for m in mats]
        gemv["int8"] = _time(lambda: [q(row) for q in q8]) / len(mats)
        del q8
        q4 = [Int4Linear(m, None, 64) for m in mats]
        gemv["int4"] = _time(lambda: [q(row) for q in q4]) / len(mats)
        q8, q4 = Int8Linear(mats[0][:2048], None), q4[0]
        q8.gemm_dtype = q4.gemm_dtype = torch.bfloat16 if gemm["bf16"] < gemm["fp32"] else torch.float32
        rows = {"int8": _crossover(q8, g), "int4": _crossover(q4, g)}
    return {"gemm_256x1024x2048_ms": gemm, "gemv_4096x2048_ms": gemv, "quant_kernel_rows": rows}


def _crossover(q, g) -> int:
    """The most rows (of QUANT_ROWS) at which q's kernel on the stored bytes still beats
    dequantize + GEMM, checked upwards until the GEMM wins."""
    best = QUANT_ROWS[0]
    for m in QUANT_ROWS:
        x = torch.randn(m, q.in_features, generator=g)
        if _time(lambda: q._kernel(x.bfloat16()), min_s=0.05) >= _time(lambda: q._gemm(x), min_s=0.05):
            break
        best = m
    return best


def load_or_run(cpu: CpuInfo, run: bool = False, force: bool = False) -> dict | None:
    """The cached calibration for this CPU and torch; when none is cached and `run`, or when
    `force`, run (and cache) one. A cache that cannot be read or written is ignored, never an
    error."""
    path = cache_path(cpu)
    if path.is_file() and not force:
        try:
            data = json.loads(path.read_text())
            if data.get("key") == cache_key(cpu):
                return data | {"path": str(path)}
        except (OSError, ValueError):
            pass
    if not (run or force):
        return None
    data = {"key": cache_key(cpu), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **probe(cpu)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))
    except OSError:
        pass
    return data | {"path": str(path)}


def apply(plan, result: dict):
    """The plan with the measured winners where they clearly beat the rule's choice."""
    gemm, gemv = result["gemm_256x1024x2048_ms"], result["gemv_4096x2048_ms"]

    def faster(a: str, b: str, table: dict) -> bool:  # a clearly faster than b
        return a in table and b in table and table[a] * CLEAR_WIN < table[b]

    vision_bf16 = faster("bf16", "fp32", gemm) or (plan.vision_bf16 and not faster("fp32", "bf16", gemm))
    gemm_dtype = torch.bfloat16 if vision_bf16 else torch.float32
    text16 = plan.text16
    if text16 == BF16 and faster(FP16_PACKED, BF16, gemv):
        text16 = FP16_PACKED
    elif text16 == FP16_PACKED and faster(BF16, FP16_PACKED, gemv) and vision_bf16:
        text16 = BF16
    elif text16 == WIDENED and vision_bf16:
        text16 = BF16
    if text16 == BF16 and not vision_bf16:
        text16 = WIDENED if not fp16_packed.available() else FP16_PACKED
    rows = result.get("quant_kernel_rows", {})
    return replace(plan, vision_bf16=vision_bf16, text16=text16, gemm_dtype=gemm_dtype,
                   int8_rows=rows.get("int8", plan.int8_rows), int4_rows=rows.get("int4", plan.int4_rows),
                   source=f"calibrated ({result['path']})")
