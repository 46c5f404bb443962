"""The AVX-512 few-row kernels for bf16, int8 and int4 matrices (cpu/csrc/quant_gemv.cpp), built
on first use.

Decode multiplies one row (a few, batched) by every per-token matrix, so it streams the weights:
torch's int8/int4 CPU kernels are compute-bound there and its bf16 GEMV leaves bandwidth unused
(docs/performance.md); this extension reads the same stored bytes faster (software prefetch where
the plan says so; VNNI for int8 and int4 with the activations rounded to int8 per 32 inputs; bf16
exact on fp32 activations, or on vdpbf16ps with them rounded to bf16 where the plan says so:
cpu/csrc/bf16_dot.cpp). It is compiled with torch's
cpp_extension (a C++ compiler is needed once, ~1-2 min on 2 cores) into
`<cache>/native-<hash>/`, keyed by the source, torch's version and the CPU's flags, and reused
by every later load. Where it cannot be used (no AVX-512, no compiler, a failed build,
$MINICPMV_NATIVE=0) the loader keeps torch's kernels and says why (`describe()`).

CPUs with AVX2 + FMA but no AVX-512 (most laptops, AMD Zen 1-3) get a second, small module
(cpu/csrc/avx2_gemv.cpp, `avx2_kernels`): the few-row int8 / int4 products and the int4 widening,
with the same calls and arithmetic, built and cached the same way (`describe_avx2()`). Both
modules hold the decode helpers (norms, DeltaNet conv and rule) and the fused decode layers
(cpu/csrc/decode_rows.cpp, decode_layers.cpp), one source on simd.h's vectors built for each ISA.
Built at load time, never inside a request."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import time
from functools import lru_cache
from pathlib import Path

import torch

from .isa import CpuInfo

log = logging.getLogger("minicpmv.cpu")

ENV = "MINICPMV_NATIVE"  # "0" keeps torch's kernels
CSRC = Path(__file__).with_name("csrc")
# the decode helpers and fused decode layers, written on simd.h's vectors: built into both modules
DECODE = (CSRC / "decode_layers.cpp", CSRC / "decode_rows.cpp", CSRC / "decode.h", CSRC / "simd.h",
          CSRC / "rows_common.h")
SOURCES = (CSRC / "quant_gemv.cpp", CSRC / "bf16_dot.cpp", CSRC / "flash_attn.cpp")
HEADERS = (CSRC / "kernels.h",)  # what the sources include (hashed with them)
NEEDS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512vbmi")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx512vbmi", "-mfma",
         "-fopenmp"]
# Up to this many rows the extension runs; beyond, torch's kernels (up to the plan's kernel rows),
# then dequantize + GEMM. On the AMX Xeon, 2 threads: 1.2-1.7x torch's at 1 row, 1.1-1.4x at 8.
ROWS = 8
# The vision tower's attention runs the extension's kernel from this many keys (cpu/plan.py:
# `vision_flash`); it works in blocks of 64 keys, so the 2x2 windows of 4.6's merger stay on SDPA
FLASH_MIN_KEYS = 64


def unusable(cpu: CpuInfo) -> str | None:
    """Why the extension cannot serve this CPU and setting, or None when it can."""
    return _why_not(cpu, "avx512", NEEDS)


def _why_not(cpu: CpuInfo, level: str, needs: tuple[str, ...]) -> str | None:
    """Why a module needing CPU level `level` and flags `needs` cannot serve `cpu`, or None."""
    if os.environ.get(ENV, "1") == "0":
        return f"disabled by {ENV}=0"
    if cpu.forced and not cpu.at_least(level):
        return f"level forced to {cpu.level}"
    missing = [f for f in needs if f not in cpu.flags or f not in _host_flags()]
    if missing:
        return "the CPU lacks " + ", ".join(missing)
    if sys.platform != "linux":
        return "built on Linux only"
    return None


@lru_cache(maxsize=1)
def _host_flags() -> frozenset:
    """The flags of the CPU this process runs on (a plan may be made for a described CPU); read once."""
    from .isa import _read_cpuinfo

    return _read_cpuinfo()[1]


def describe() -> str:
    """What the few-row bf16/int8/int4 products run, for the plan's printout."""
    return _AVX512.describe()


def quant_kernels(cpu: CpuInfo, progress: bool = True):
    """The built extension module (bf16_mm, int8_mm, int4_mm), or None with `describe()` saying why."""
    return _AVX512.get(cpu, progress)


# ---- the AVX2 + FMA few-row int8 / int4 products (cpu/csrc/avx2_gemv.cpp): CPUs without AVX-512 ----
AVX2_SOURCE = CSRC / "avx2_gemv.cpp"
AVX2_NEEDS = ("avx2", "fma")
AVX2_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]


def avx2_unusable(cpu: CpuInfo) -> str | None:
    """Why the AVX2 module cannot serve this CPU and setting, or None when it can."""
    return _why_not(cpu, "avx2", AVX2_NEEDS)


def describe_avx2() -> str:
    return _AVX2.describe()


def avx2_kernels(cpu: CpuInfo, progress: bool = True):
    """The AVX2 module (int8_mm, int4_mm, int4_widen_t: the AVX-512 module's calls and arithmetic;
    the decode helpers and fused layers), or None with `describe_avx2()` saying why."""
    return _AVX2.get(cpu, progress)


class _Extension:
    """One module built on first use (one attempt per process) and kept: the module, or why not."""

    def __init__(self, name: str, files: tuple[Path, ...], flags: list[str], unusable, label: str, what: str):
        self.name, self.files, self.flags, self.unusable = name, files, flags, unusable
        self.label, self.what = label, what
        self.module, self.status = None, "not built yet"

    def describe(self) -> str:
        if self.module is None and self.status == "not built yet":
            return f"minicpmv {self.label} kernel (built at the first load, then cached)"
        return self.status

    def get(self, cpu: CpuInfo, progress: bool):
        if self.module is not None:
            return self.module
        why = self.unusable(cpu)
        if why is not None:
            self.status = f"torch's kernels ({why})"
            return None
        if self.status.startswith("torch's kernels (build failed"):
            return None
        self.module, self.status = self._build(cpu, progress)
        return self.module

    def key(self, cpu: CpuInfo) -> str:
        """The build folder's key: the files, torch's version and where it is installed (two
        environments with the same torch share no folder: torch's builder would recompile on every
        switch between them, the compiler running inside the load), the CPU's flags, the compiler flags."""
        source = b"".join(p.read_bytes() for p in self.files)
        where = str(Path(torch.__file__).resolve().parent)
        parts = (torch.__version__, where, " ".join(sorted(cpu.flags)), " ".join(self.flags))
        return hashlib.sha256(source + "\n".join(parts).encode()).hexdigest()[:12]

    def _build(self, cpu: CpuInfo, progress: bool):
        """(module, status): the module built from its files (.cpp compiled, headers hashed) into
        `<cache>/native-<key>/` (`key`); a build that fails leaves (None, why)."""
        name, sources, flags, what = self.name, self.files, self.flags, self.what
        quiet = logging.getLogger("torch.utils.cpp_extension")  # its import warns about CUDA on CPU-only hosts
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            from torch.utils.cpp_extension import load
        finally:
            quiet.setLevel(level)

        from .calibrate import cache_dir

        key = self.key(cpu)
        folder = cache_dir() / f"native-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        fresh = not any(folder.glob("*.so"))
        if fresh and shutil.which(os.environ.get("CXX", "c++")) is None:
            log.warning("minicpmv: %s not built: no C++ compiler; using torch's", what)
            return None, "torch's kernels (build failed: no C++ compiler found; set CXX or install g++)"
        if fresh and progress:
            print(f"minicpmv: building the {what} once (~1-2 min) into {folder}", file=sys.stderr)
        t0 = time.perf_counter()
        try:
            module = load(f"{name}_{key}", [str(p) for p in sources if p.suffix == ".cpp"], extra_cflags=flags,
                          extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=False)
        except Exception as e:  # a broken toolchain must not stop a load: torch's kernels remain
            first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
            log.warning("minicpmv: %s not built (%s); using torch's", what, first)
            return None, f"torch's kernels (build failed: {first})"
        return module, f"minicpmv {self.label} kernel ({'built in %.0f s' % (time.perf_counter() - t0) if fresh else 'cached'})"


_AVX512 = _Extension("minicpmv_quant_gemv", SOURCES + HEADERS + DECODE, FLAGS, unusable, "AVX-512",
                     "AVX-512 decode kernels")
_AVX2 = _Extension("minicpmv_avx2_gemv", (AVX2_SOURCE,) + DECODE, AVX2_FLAGS, avx2_unusable, "AVX2",
                   "AVX2 decode kernels")
